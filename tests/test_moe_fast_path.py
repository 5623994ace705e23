"""A tiny Mixtral's fast path (fused MoE, Triton interpreted on the CPU) against its eager path
(the per-expert loop), whole and through the CUDA-graph runner's buckets, sequential and pipelined.

On the CPU a "graph" is a placeholder and a replay runs the forward on the static batch, so this
checks everything but the capture itself: MoE buckets exist, batches padded into them give the
eager logits. tests/gpu/test_fast_path.py-style replays on the GPU come with the H200 session.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import pipeline_for, step_plan

from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.cuda_graph import GraphRunner
from nanoflow.executor.model_runner import ModelRunner
from nanoflow.kernels.fused_moe import moe_experts_ref
from nanoflow.layers.parallel import ParallelState
from nanoflow.models.loader import build_model
from nanoflow.pipeline.executor import PipelineExecutor

MAX_TOKENS = 64
# Triton interpreted on CPU tensors; on a GPU machine tests/gpu/test_fast_path.py and
# tests/gpu/test_pipeline_gpu.py run the same comparison with real capture
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test: Triton interpreted")


@pytest.fixture(scope="module")
def mixtral(tiny_model):
    path = tiny_model("mixtral")
    cfg = EngineConfig.from_args(EngineArgs(model=path, num_kv_pages=64, max_num_batched_tokens=MAX_TOKENS,
                                            max_model_len=256, device="cpu"))
    runner = ModelRunner(cfg)  # the CPU: reference ops (the expert loop), no graphs
    torch.manual_seed(0)
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))  # contexts the new tokens attend to
    fast = build_model(path, cfg.arch, torch.float32, torch.device("cpu"), 256, ParallelState(), enforce_eager=False)
    fast.bind_kv_caches(runner.kv_caches)
    executors = [PipelineExecutor(s, fast.layer_ops, torch.device("cpu"))
                 for s in pipeline_for("mixtral", MAX_TOKENS).schedules]
    graphs = GraphRunner(fast, max_tokens=MAX_TOKENS, max_seqs=8, max_pages=16, device=torch.device("cpu"),
                         executor_for=lambda n: next((e for e in executors
                                                      if e.schedule.min_tokens <= n <= e.schedule.max_tokens), None))
    graphs.capture()
    return runner, fast, graphs


def test_moe_models_use_graphs() -> None:
    """The runner no longer leaves MoE models out of CUDA graphs, under tensor parallelism neither."""
    def use(is_moe: bool, tp: int) -> bool:
        fake = SimpleNamespace(config=SimpleNamespace(cuda_graph_max_tokens=MAX_TOKENS),
                               par=SimpleNamespace(size=tp), arch=SimpleNamespace(is_moe=is_moe))
        return ModelRunner._use_graphs.fget(fake)

    assert use(is_moe=True, tp=1) and use(is_moe=True, tp=2)


def test_moe_buckets_captured(mixtral) -> None:
    _, _, graphs = mixtral
    assert {b for b, _, _ in graphs.graphs} == set(graphs.buckets)
    assert any(piped for _, _, piped in graphs.graphs)


# Padding rows carry whatever the buffers held (nothing computes them): they may overflow in the
# norms, harmlessly, as every op is row-wise, MoE's included, and no real row reads them.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("decodes,prefills,pipelined", [
    ([20, 5, 40], [], True),
    ([20, 5], [(16, 17), (0, 9)], True),  # mixed; the nano-batch bounds cut the MoE's rows
    ([], [(0, 33)], False),  # the sequential graph of bucket 48 (pipelined from 41 tokens only)
    ([9], [], False),  # one decode token
])
def test_fast_path_logits_equal_eager(mixtral, decodes, prefills, pipelined) -> None:
    runner, fast, graphs = mixtral
    batch = fast.prepare(runner._build_batch(step_plan(decodes, prefills)))
    key = graphs.select(batch)
    assert key is not None and key[2] == pipelined, "a MoE batch that fits a bucket replays a graph"
    with torch.inference_mode():
        ref = runner.model.compute_logits(runner.model(batch))  # eager: the per-expert loop
        whole = fast.compute_logits(fast(batch))
        replayed = fast.compute_logits(graphs.run(batch, key))
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed, ref, rtol=1e-4, atol=1e-4)


def test_padding_rows_are_routed_to_no_expert(mixtral) -> None:
    """A graph's padding rows (slot -1) get expert id E, held by no rank: the align drops their
    pairs, so the grouped GEMMs do no work for them, and the live rows' output is unchanged."""
    _, fast, _ = mixtral
    moe = fast.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(12, moe.router.weight.shape[1])
    slots = torch.where(torch.arange(12) < 7, torch.arange(12), -1)
    live = slots >= 0
    weights, ids = torch.empty(12, moe.top_k), torch.empty(12, moe.top_k, dtype=torch.int64)
    moe.route(x, weights, ids, slots)
    assert (ids[~live] == moe.num_experts).all() and (ids[live] < moe.num_experts).all()
    out, ref = torch.empty(12, x.shape[1]), torch.empty(7, x.shape[1])
    with torch.inference_mode():
        moe.experts(x, weights, ids, out)
        moe_experts_ref(x[:7], moe.w13, moe.w2, weights[:7], ids[:7], ref)
    torch.testing.assert_close(out[:7], ref, rtol=1e-5, atol=1e-5)
