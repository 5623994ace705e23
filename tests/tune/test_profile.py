"""The profiler on the CPU: a tiny checkpoint's layer ops timed at a few sizes, quickly, and the
mixed step it times."""

from __future__ import annotations

import json
import math

import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.model_runner import ModelRunner, pipeline_key
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.tune.profile import Workload, mixed_plan, profile_ops
from nanoflow.tune.search import search


def _runner(path: str) -> ModelRunner:
    return ModelRunner(EngineConfig.from_args(EngineArgs(path, device="cpu", dtype="float32", num_kv_pages=64,
                                                         max_model_len=256, pipeline="off")))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_profile_a_tiny_checkpoint_on_the_cpu(tiny_model, arch) -> None:
    runner = _runner(tiny_model(arch))
    names = [op.name for op in runner.model.layer_ops[0]]
    sizes = [8, 16, 32]
    profile = profile_ops(runner, sizes, ctas=[16, 32], workload=Workload(32, 0.5, 8), layers=2, warmup=1,
                          repeats=2)
    assert profile["elapsed_s"] < 20
    profile = json.loads(json.dumps(profile))  # JSON-able as it is
    assert profile["key"] == pipeline_key(runner.config, 1) and profile["device"] == "cpu"
    assert profile["sizes"] == sizes and profile["num_layers"] == 2 and profile["layers_timed"] == [1]
    assert [b["num_decodes"] for b in profile["batches"]] == [4, 8, 16]
    assert [b["prefill_tokens"] for b in profile["batches"]] == [4, 8, 16]
    assert [o["name"] for o in profile["ops"]] == names
    assert {o["name"]: tuple(o["writes"]) for o in profile["ops"]}["decode_attention"] == ("attn@decode",)
    for name in names:
        assert len(profile["op_ms"][name]) == 3 and all(math.isfinite(t) and t > 0 for t in profile["op_ms"][name])
    assert len(profile["forward_ms"]) == 3 and all(t > 0 for t in profile["forward_ms"])
    # SM caps and the interference table need a GPU: recorded as not measured
    assert profile["ctas"] == [] and profile["decode_attention_capped_ms"] == {}
    assert profile["interference"]["needs_gpu"] is True and profile["interference"]["pairs"] == {}
    assert profile["peak_tflops"] is None and profile["timer"]["kind"] == "perf_counter"

    tuning = search(profile)  # the search takes it as it is, and its pipeline runs on this model
    tuning.pipeline.check(names)
    assert [(s.min_tokens, s.max_tokens) for s in tuning.pipeline.schedules] == [(1, 8), (9, 16), (17, 32)]
    for schedule in tuning.pipeline.schedules:
        PipelineExecutor(schedule, runner.model.layer_ops, runner.device)


def test_the_mixed_step() -> None:
    w = Workload(context_len=64, decode_fraction=0.25, prefill_chunk=10)
    plan = mixed_plan(64, w, vocab_size=300, num_pages=20, max_model_len=80)
    assert plan.num_decodes == 16
    assert [len(t) for t in plan.token_ids[16:]] == [10, 10, 10, 10, 8]  # 48 prefill tokens in chunks
    assert plan.starts[16:] == [0] * 5
    contexts = plan.seq_lens[:16]
    assert min(contexts) >= 32 and max(contexts) <= 79 and 40 <= sum(contexts) / 16 <= 80
    assert all(0 <= p < 20 for t in plan.tables for p in t)  # pages past the pool wrap around
    assert sum(map(len, plan.token_ids)) == 64

