"""GPU only: the nano-batch pipeline on real streams, inside CUDA graphs, against the sequential schedule."""

import random

import pytest
import torch
from helpers import layer_op_names, pipeline_for

from nanoflow import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pingpong_half_the_sms(arch: str, max_tokens: int, units: bool = False):
    """Ping-pong over every size from 2 tokens, each nano-batch's decode attention on half the SMs:
    the two capped decode kernels launch a few us apart on two streams, as the tuned pipelines run.
    units: each stream on a green context of half the SMs (Schedule.units)."""
    import dataclasses

    from nanoflow.kernels.attention_common import num_sms
    from nanoflow.pipeline.schedule import Pipeline, pingpong_schedule, unit_sms

    names, half = layer_op_names(arch), num_sms(0) // 2
    schedules = (pingpong_schedule(names, 49, 1, 2, decode_ctas=half),
                 pingpong_schedule(names, max_tokens, 48, 50, decode_ctas=half))
    if units:
        schedules = tuple(dataclasses.replace(s, units=unit_sms(half, num_sms(0))) for s in schedules)
    return Pipeline(schedules, {"test": arch}, "tests")


def green_contexts_or_skip() -> None:
    from nanoflow.pipeline.executor import green_context

    try:
        green_context(8, torch.device("cuda"))
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager-launch"])
@pytest.mark.parametrize("kind", ["mixed", "pingpong-half", "pingpong-units"])
def test_pipeline_matches_sequential_fp32(tiny_model, tmp_path, arch, graphs, kind):
    """Two streams, decode attention capped (pingpong-units: each stream on a green context of half
    the SMs): the same greedy tokens as the sequential schedule (fp32; the same kernels run on each
    row either way)."""
    path = tiny_model(arch)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 380) for _ in range(rng.randrange(5, 200))]}
               for _ in range(24 if kind == "mixed" else 96)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    pipeline = tmp_path / "pipeline.json"
    if kind == "pingpong-units":
        green_contexts_or_skip()
    (pipeline_for(arch, 256) if kind == "mixed" else
     pingpong_half_the_sms(arch, 256, units=kind == "pingpong-units")).save(pipeline)
    runs = {}
    for name in ("off", str(pipeline)):
        llm = LLM(path, dtype="float32", max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048,
                  pipeline=name, cuda_graph_max_tokens=None if graphs else 0)
        if name != "off":
            assert llm.engine.runner.executors
            if graphs:
                assert llm.engine.runner.graphs.executors
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert runs["off"] == runs[str(pipeline)]


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_a_step_is_queued_without_waiting_for_the_gpu(tiny_model, tmp_path, pipelined):
    """Launching a step (batch build, the nano-batches' metadata and copies, the graph replay, the
    sampler) never synchronises with the device: the host must stay ahead of the GPU, or the GPU
    idles between steps (docs/pipeline_history.md: the pipelined runs' 2-12 ms gaps)."""
    from nanoflow.executor.step_plan import StepPlan

    pipeline = tmp_path / "pipeline.json"
    pipeline_for("llama", 256).save(pipeline)
    llm = LLM(tiny_model("llama"), max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048,
              pipeline=str(pipeline) if pipelined else "off")
    runner = llm.engine.runner
    plan = StepPlan.synthetic([40] * 100 + [300] * 20, [(0, 100)], runner.arch.vocab_size)
    runner.launch(plan).result()  # warm: kernels compiled, pinned buffers cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        inflight = runner.launch(plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    inflight.result()
    assert runner.graphs is not None and runner.graphs.num_replays >= 2
