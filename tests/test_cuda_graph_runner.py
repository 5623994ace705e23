"""The CUDA-graph runner's static buffers and padding against the plain forward of the same batch.

A graph replays the forward of its static batch; on the CPU nothing is captured and the runner
runs that same forward on the same buffers (Triton interpreted), so everything but the capture is
checked here: bucket choice, copying and padding a batch in, the device-side decode count, idle
prefill tiles. tests/gpu/test_fast_path.py checks real replays against the eager path.
"""

from __future__ import annotations

import pytest
import torch
from helpers import pipeline_for, step_plan

from nanoflow.config import EngineConfig, graph_sizes
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.cuda_graph import GraphRunner, pads_acceptably, token_buckets
from nanoflow.executor.model_runner import ModelRunner
from nanoflow.layers.parallel import ParallelState
from nanoflow.model_arch import ModelArch
from nanoflow.models.loader import build_model
from nanoflow.pipeline.executor import PipelineExecutor


@pytest.fixture(scope="module")
def runner_and_graphs(tiny_model):
    path = tiny_model("llama")
    cfg = EngineConfig.from_args(EngineArgs(model=path, num_kv_pages=64, max_num_batched_tokens=64,
                                            max_model_len=256))
    runner = ModelRunner(cfg)  # the CPU: reference ops, no graphs
    torch.manual_seed(0)
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))  # contexts the new tokens attend to
    fast = build_model(path, cfg.arch, torch.float32, torch.device("cpu"), 256, ParallelState(), enforce_eager=False)
    fast.bind_kv_caches(runner.kv_caches)
    graphs = GraphRunner(fast, max_tokens=64, max_seqs=8, max_pages=16, device=torch.device("cpu"))
    graphs.capture()
    return runner, fast, graphs


# Padding rows carry whatever attention's output buffer held (nothing computes them): they may
# overflow in the norms, harmlessly, as every op is row-wise and no real row reads them.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("decodes,prefills,bucket,mixed", [
    ([20, 5, 40], [], 4, False),
    ([20, 5], [(16, 17), (0, 9)], 32, True),
    ([], [(0, 33)], 48, True),
    ([33, 1, 17, 64, 2, 9, 100], [(0, 1)], 8, True),
])
def test_replay_equals_forward(runner_and_graphs, decodes, prefills, bucket, mixed) -> None:
    runner, fast, graphs = runner_and_graphs
    batch = fast.prepare(runner._build_batch(step_plan(decodes, prefills)))
    key = graphs.select(batch)
    assert key == (bucket, mixed, False)
    with torch.inference_mode():
        want = fast(batch)
        got = graphs.run(batch, key)
        ref = runner.model(batch)  # the plain PyTorch path
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_batches_that_fit_no_graph_run_eagerly(runner_and_graphs) -> None:
    runner, fast, graphs = runner_and_graphs
    too_many_seqs = fast.prepare(runner._build_batch(step_plan([3] * 9, [])))
    assert graphs.select(too_many_seqs) is None
    # 40 one-token prefill chunks need more prefill tiles than a graph keeps spare
    many_chunks = fast.prepare(runner._build_batch(step_plan([], [(0, 1)] * 40 + [(0, 2)])))
    assert graphs.select(many_chunks) is None


def test_a_slower_small_bucket_is_skipped(runner_and_graphs) -> None:
    """cuBLAS can be slower at 448 rows than at 512: the batch pads up to the faster bucket."""
    runner, fast, graphs = runner_and_graphs
    batch = fast.prepare(runner._build_batch(step_plan([20, 5, 40], [])))
    saved = graphs.replay_ms[(4, False, False)]
    try:
        graphs.replay_ms[(4, False, False)] = 100.0
        assert graphs.select(batch) == (8, False, False)
    finally:
        graphs.replay_ms[(4, False, False)] = saved


def test_padding_rule_weighs_what_a_padding_row_costs() -> None:
    # small buckets always; above 512 tokens a dense model pads by at most 1/16 of its rows
    assert pads_acceptably(512, 1, 1.0)
    assert pads_acceptably(768, 724, 1.0) and not pads_acceptably(768, 597, 1.0)
    # Mixtral's padding rows skip the experts (1/8 of a row's work): a 597-token step takes the 768 graph
    mixtral = ModelArch(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope={},
                        max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=False, o_bias=False,
                        sliding_window=None, num_experts=8, experts_per_token=2)
    assert 0.1 < mixtral.padding_row_cost() < 0.15
    assert pads_acceptably(768, 597, mixtral.padding_row_cost()) and not pads_acceptably(1024, 597, 0.125)


def test_token_buckets() -> None:
    assert token_buckets(48) == [1, 2, 4, 8, 16, 24, 32, 48]
    big = token_buckets(2048)
    assert big[18:21] == [512, 544, 576] and big[33:37] == [992, 1024, 1088, 1152] and big[-1] == 2048
    assert big == sorted(set(big)) and len(big) == 19 + 16 + 16
    assert token_buckets(600)[-3:] == [544, 576, 600]
    # every batch from 1 to the budget has a graph it pads acceptably (dense steps have no eager fallback)
    for n in range(1, 2049):
        assert pads_acceptably(next(b for b in big if b >= n), n, padding_row_cost=1.0)


def test_cuda_graph_sizes_flag(tiny_model) -> None:
    """--cuda-graph-sizes (vLLM's name) replaces the buckets: those up to the largest graph, and it."""
    path = tiny_model("llama")
    args = lambda **kw: EngineArgs(model=path, max_model_len=256, max_num_batched_tokens=64, **kw)  # noqa: E731
    cfg = EngineConfig.from_args(args(cuda_graph_sizes=(8, 96, 24, 8)))
    assert cfg.cuda_graph_sizes is None  # the CPU runs eagerly: no graphs, no sizes
    assert graph_sizes((8, 96, 24, 8), 64) == (8, 24, 64) and graph_sizes(None, 64) is None
    for bad in ((), (0,), (-8,), (True,)):
        with pytest.raises(ValueError, match="cuda_graph_sizes"):
            EngineConfig.from_args(args(cuda_graph_sizes=bad))
    fast = build_model(path, cfg.arch, torch.float32, torch.device("cpu"), 256, ParallelState(),
                       enforce_eager=False)
    graphs = GraphRunner(fast, max_tokens=64, max_seqs=8, max_pages=16, device=torch.device("cpu"),
                         buckets=(8, 24, 64))
    assert graphs.buckets == [8, 24, 64]
    with pytest.raises(ValueError, match="must end at the largest"):
        GraphRunner(fast, max_tokens=64, max_seqs=8, max_pages=16, device=torch.device("cpu"), buckets=(8, 24))


@pytest.fixture(scope="module")
def pipelined_graphs(runner_and_graphs):
    """The same buckets captured through a two-stream pipeline (pipeline_for): every bucket of two
    tokens or more replays its nano-batches, copied in one by one."""
    runner, fast, _ = runner_and_graphs
    executors = [PipelineExecutor(s, fast.layer_ops, torch.device("cpu")) for s in pipeline_for("llama", 64).schedules]
    graphs = GraphRunner(fast, max_tokens=64, max_seqs=8, max_pages=16, device=torch.device("cpu"),
                         executor_for=lambda n: next((e for e in executors
                                                      if e.schedule.min_tokens <= n <= e.schedule.max_tokens), None))
    graphs.capture()
    return graphs


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("decodes,prefills,pipelined", [
    ([20, 5, 40], [], True),
    ([20, 5], [(16, 17), (0, 9)], True),
    # 33 tokens: the buckets that hold it (48, 64) are pipelined for 41 tokens or more only
    ([], [(0, 33)], False),
    ([33, 1, 17, 64, 2, 9, 100], [(0, 1)], True),
])
def test_pipelined_replay_equals_forward(runner_and_graphs, pipelined_graphs, decodes, prefills, pipelined) -> None:
    runner, fast, _ = runner_and_graphs
    batch = fast.prepare(runner._build_batch(step_plan(decodes, prefills)))
    key = pipelined_graphs.select(batch)
    assert key[2] == pipelined
    with torch.inference_mode():
        want = fast(batch)
        got = pipelined_graphs.run(batch, key)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pipelined_false_selects_the_sequential_graph(runner_and_graphs, pipelined_graphs) -> None:
    """StepPlan.sequential (the TP tune's output check): the same step through the sequential graph
    of the bucket that a pipelined graph would otherwise take."""
    runner, fast, _ = runner_and_graphs
    batch = fast.prepare(runner._build_batch(step_plan([33, 1, 17, 64, 2, 9, 100], [(0, 1)])))
    piped, seq = pipelined_graphs.select(batch), pipelined_graphs.select(batch, pipelined=False)
    assert piped[2] and not seq[2] and (seq[0], seq[1]) == (piped[0], piped[1])
    with torch.inference_mode():
        torch.testing.assert_close(pipelined_graphs.run(batch, seq), pipelined_graphs.run(batch, piped),
                                   rtol=1e-5, atol=1e-5)


def test_a_batch_too_small_for_a_pipelined_bucket_takes_another(pipelined_graphs, runner_and_graphs) -> None:
    runner, fast, _ = runner_and_graphs
    one = fast.prepare(runner._build_batch(step_plan([9], [])))
    assert pipelined_graphs.select(one) == (1, False, False)  # a pipeline's nano-batches would be empty


def test_warm_logits_runs_every_row_count(runner_and_graphs, monkeypatch) -> None:
    """After capture the runner runs the eager logits GEMM once at each row count a step can sample
    (a kernel's first use held the host until the GPU drained: ModelRunner.warm_logits)."""
    runner = runner_and_graphs[0]
    rows: list[int] = []
    real = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: rows.append(h.shape[0]) or real(h))
    runner.warm_logits(20)
    assert rows == [8, 16, 24]  # the row counts ModelRunner.forward pads to (LOGITS_ROW_MULTIPLE)


def test_forward_pads_logits_rows(runner_and_graphs) -> None:
    """ModelRunner.forward computes the logits of a multiple of LOGITS_ROW_MULTIPLE rows and returns
    the step's own: the same values as the unpadded GEMM."""
    runner = runner_and_graphs[0]
    batch = runner.model.prepare(runner._build_batch(step_plan([20, 5, 40], [(0, 9)])))
    n = batch.logits_indices.shape[0]
    assert n % 8
    with torch.inference_mode():
        got = runner.forward(batch)
        want = runner.model.compute_logits(runner.model(batch)[batch.logits_indices])
    assert got.shape == want.shape == (n, runner.arch.vocab_size)
    torch.testing.assert_close(got, want)
