"""2 GPUs: tensor parallelism with whole-iteration CUDA graphs, the NCCL all-reduces captured inside
them on every rank, against the same engine without graphs (the same Triton kernels launched one by
one) and against one GPU.

In fp32 (Triton dots in IEEE mode, cuBLAS without TF32) a graph computes what the launches compute,
so greedy tokens with and without graphs must be identical. Against one GPU, or through a pipeline
(its decode attention capped to fewer CTAs splits the context differently), only the summation
order differs: the leading tokens must agree almost everywhere.
"""

from __future__ import annotations

import gc
import json
import os
import random
from collections.abc import Callable

import pytest
import torch
from helpers import pipeline_for, step_plan

from nanoflow import LLM, SamplingParams
from nanoflow.bench.dummy_models import DUMMY_CONFIGS
from nanoflow.executor.distributed import NO_MULTICAST, disable_multicast
from nanoflow.pipeline.timeline import record_timeline

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(autouse=True)
def _no_multicast():
    """The engine sets these before its process group exists and in every worker it spawns; set here
    too, so that nothing this test process does with the GPUs ever runs with NVLink multicast on."""
    disable_multicast()


def _prompts(n: int, vocab: int, max_len: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randrange(5, max_len))]}
            for _ in range(n)]


def _run(path: str, prompts: list[dict], max_tokens: int, after: Callable[[LLM], None] | None = None,
         **engine_kwargs) -> tuple[list[list[int]], int]:
    """Greedy tokens and rank 0's number of graph replays; after(llm), if given, runs once they are out."""
    llm = LLM(path, dtype="float32", **engine_kwargs)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
        if after is not None:
            after(llm)
        graphs = llm.engine.runner.graphs
        replays = graphs.num_replays if graphs is not None else 0
        if llm.engine.tp is not None:
            assert all(os.environ[k] == v for k, v in NO_MULTICAST.items())
            assert graphs is None or graphs.replay_ms  # the table every rank selects from
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], replays


def _leading_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Tokens up to each sequence's first divergence, over all tokens."""
    same = sum(next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
               for ta, tb in zip(a, b, strict=True))
    return same / sum(len(t) for t in a)


def test_tp2_graphs_match_no_graphs_and_one_gpu(tiny_model, tmp_path):
    path = tiny_model("llama")
    prompts = _prompts(40, 380, 300, seed=3)
    settings = dict(max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048)
    pipeline = tmp_path / "tp2.json"
    pipeline_for("llama", 256, tp=True).save(pipeline)
    graphs, replays = _run(path, prompts, 20, tensor_parallel_size=2, **settings)
    launches, no_replays = _run(path, prompts, 20, tensor_parallel_size=2, cuda_graph_max_tokens=0, **settings)

    def timeline(llm: LLM) -> None:
        """The timeline of a 50-token step, which no graph fits exactly: eager on both ranks, each
        holding its GPU first, their all-reduces paired (a padded graph on the worker would hang)."""
        records = record_timeline(llm.engine.runner, step_plan([20, 5, 40, 9], [(16, 17), (0, 9), (3, 20)]))
        assert {"attn_all_reduce", "ffn_all_reduce"} <= {r["op"] for r in records}
        assert max(r["end_ms"] for r in records) < 5.0  # held until queued: no launch gaps in it

    piped, piped_replays = _run(path, prompts, 20, timeline, tensor_parallel_size=2, pipeline=str(pipeline),
                                **settings)
    one_gpu, _ = _run(path, prompts, 20, **settings)
    assert replays > 0 and piped_replays > 0 and no_replays == 0
    assert graphs == launches
    assert _leading_agreement(piped, launches) >= 0.95
    assert _leading_agreement(graphs, one_gpu) >= 0.95


def test_llama3_8b_shaped_tp2_graphs(tmp_path):
    """2 layers of Llama-3-8B (random weights, the same on both runs: each rank draws its shard from
    the same seed) at the default 2048-token budget: buckets up to 2048 tokens, 16 MiB all-reduces."""
    (tmp_path / "config.json").write_text(json.dumps({**DUMMY_CONFIGS["llama3-8b"], "num_hidden_layers": 2}))
    prompts = _prompts(24, DUMMY_CONFIGS["llama3-8b"]["vocab_size"], 1500, seed=4)
    settings = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, num_kv_pages=4096,
                    tensor_parallel_size=2)
    graphs, replays = _run(str(tmp_path), prompts, 16, **settings)
    launches, _ = _run(str(tmp_path), prompts, 16, cuda_graph_max_tokens=0, **settings)
    assert replays > 0
    assert graphs == launches


def test_tp2_symm_mem_all_reduce_matches_nccl(tiny_model):
    """`--all-reduce symm-mem` (torch's two-shot all-reduce over peer memory, inside the graphs) gives
    NCCL's tokens: with two ranks each sum is one fp32 addition either way."""
    path = tiny_model("llama")
    prompts = _prompts(24, 380, 300, seed=5)
    settings = dict(max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048, tensor_parallel_size=2)
    nccl, _ = _run(path, prompts, 16, **settings)
    llm = LLM(path, dtype="float32", all_reduce="symm-mem", **settings)
    try:
        assert llm.engine.runner.par.fast_all_reduce is not None  # not the NCCL fallback
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert llm.engine.runner.graphs.num_replays > 0
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == nccl


def test_tp2_expert_parallel_graphs(tiny_model):
    """Mixtral with --enable-expert-parallel (2 whole experts of 4 per GPU): the fused MoE with the
    other GPU's pairs dropped in the align, inside graphs, equals its launches, and agrees with one GPU
    up to summation order."""
    path = tiny_model("mixtral")
    prompts = _prompts(40, 380, 300, seed=5)
    settings = dict(max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048)
    ep = dict(tensor_parallel_size=2, enable_expert_parallel=True, **settings)
    graphs, replays = _run(path, prompts, 20, **ep)
    launches, _ = _run(path, prompts, 20, cuda_graph_max_tokens=0, **ep)
    one_gpu, _ = _run(path, prompts, 20, **settings)
    assert replays > 0
    assert graphs == launches
    assert _leading_agreement(graphs, one_gpu) >= 0.95
