"""CUDA graphs under tensor parallelism, on the CPU (2 gloo ranks; nothing is captured, but the graph
path runs: the runner's tables, the choice of graph per step, the static buffers and, pipelined, the
nano-batches). Every rank must replay the same graph for a step, or the collectives captured in the
graphs would pair up wrongly: both ranks choose the same keys although they measured different replay
times, a capture that fails on one rank fails on both, tables that differ are an error on both, and
greedy tokens with 2 ranks on the graph path match one process's."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import multiprocessing
import queue
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import VOCAB_SIZE, pipeline_for, step_plan

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.cuda_graph import GraphRunner
from nanoflow.executor.model_runner import ModelRunner
from nanoflow.layers.parallel import ParallelState

BUDGET = 64
# (decode context lengths, prefill (cached, new) chunks): decode-only and mixed steps of many sizes
STEPS = [([5, 9, 30], []), ([20] * 7, []), ([3] * 20, []), ([40] * 45, []), ([20, 5], [(16, 17), (0, 9)]),
         ([], [(0, 33)]), ([], [(0, 64)]), ([7] * 12, [(0, 40)]), ([9], [(0, 2)]), ([12] * 30, [(4, 20)]),
         ([33, 1, 17, 64, 2, 9, 100], [(0, 1)]), ([], [(0, 1)] * 40)]


def _graph_config(path: str, pipeline: str = "off", graph_tokens: int = BUDGET) -> EngineConfig:
    """The GPU's configuration on the CPU: Triton kernels (interpreted) and the graph runner."""
    cfg = EngineConfig.from_args(EngineArgs(model=path, max_model_len=256, max_num_batched_tokens=BUDGET,
                                            num_kv_pages=512, pipeline=pipeline, tensor_parallel_size=2))
    return dataclasses.replace(cfg, enforce_eager=False, cuda_graph_max_tokens=graph_tokens)


def _tp_pipeline(tmp_path, arch: str = "llama") -> str:
    """Two dense nano-batches (three attention ones) for every size from 2 tokens up, over the ops a
    tensor-parallel layer publishes (with its two all-reduces)."""
    path = tmp_path / "tp2.json"
    pipeline_for(arch, BUDGET, tp=True).save(path)
    return str(path)


# --- two ranks started by the test itself (so that each can be patched on its own) --------------
def _rank_main(target: Callable[..., Any], rank: int, port: int, results: Any, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = target(ParallelState(rank, 2), *args)
    except Exception as e:  # the parent asserts on it
        out = f"{type(e).__name__}: {e}"
    results.put((rank, out))
    dist.destroy_process_group()


def _on_two_ranks(target: Callable[..., Any], *args: Any, timeout_s: float = 240) -> list[Any]:
    """target(par, *args) on ranks 0 and 1 (spawned, gloo); each rank's return value, or its error as
    "Type: message". A rank that hangs fails the test after timeout_s."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(target, rank, port, results, args), daemon=True)
             for rank in range(2)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=timeout_s) for _ in procs)
    except queue.Empty:
        pytest.fail(f"a rank did not finish within {timeout_s} s (a hang)")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[0], out[1]]


def _select_steps(par: ParallelState, path: str, pipeline: str) -> tuple[list, list, list]:
    # Replay times that disagree: rank 0 measured the large buckets fast, rank 1 the small ones.
    GraphRunner._replay_time = lambda self, key: 1000.0 / key[0] if par.rank == 0 else float(key[0])
    runner = ModelRunner(_graph_config(path, pipeline), par)
    graphs = runner.graphs
    chosen, own, eager = [], [], []
    for decodes, prefills in STEPS:
        batch = runner.build(step_plan(decodes, prefills))
        key = graphs.select(batch)
        chosen.append(key)
        eager.append(key is not None and graphs.nano_batches(batch, key) is None)  # run's eager fallback
        agreed, graphs.replay_ms = graphs.replay_ms, graphs.local_replay_ms
        own.append(graphs.select(batch))  # what this rank would pick from its own timings
        graphs.replay_ms = agreed
    return chosen, own, eager


@pytest.mark.parametrize("pipelined", [False, True])
def test_ranks_select_the_same_graphs(tiny_model, tmp_path, pipelined):
    pipeline = _tp_pipeline(tmp_path) if pipelined else "off"
    (chosen0, own0, eager0), (chosen1, own1, eager1) = _on_two_ranks(_select_steps, tiny_model("llama"), pipeline)
    assert chosen0 == chosen1 and eager0 == eager1
    assert own0 != own1  # left to their own timings, the ranks would have replayed different graphs
    assert all(key is not None for key in chosen0[:-1]) and chosen0[-1] is None  # 40 chunks fit no graph
    assert any(key[2] for key in chosen0[:-1]) == pipelined


def _errors(par: ParallelState, path: str) -> list[str]:
    """Each rank's error: rank 1's 4th capture fails; then rank 1 captures fewer buckets than rank 0."""
    out = []
    capture, calls = GraphRunner._capture_one, itertools.count()

    def failing(self: GraphRunner, key: Any, pool: Any) -> None:
        if next(calls) == 3:
            raise RuntimeError("injected capture failure")
        capture(self, key, pool)

    for graph_tokens, patched in ((BUDGET, failing), (BUDGET if par.rank == 0 else 32, capture)):
        GraphRunner._capture_one = patched if par.rank == 1 else capture
        try:
            ModelRunner(_graph_config(path, graph_tokens=graph_tokens), par)
            out.append("no error")
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def test_failures_fail_every_rank(tiny_model):
    """No rank waits for a peer that gave up: a capture that fails on one rank, or graph tables that
    differ between the ranks, raise on both."""
    (failed0, differ0), (failed1, differ1) = _on_two_ranks(_errors, tiny_model("llama"))
    assert failed1 == "RuntimeError: injected capture failure"
    assert failed0.startswith("RuntimeError: CUDA graph capture of (")
    assert "failed on another tensor-parallel rank" in failed0
    for out in (differ0, differ1):
        assert out.startswith("ValueError: the CUDA graph tables") and "differ between the tensor-parallel ranks" in out


# --- the engine: rank 0 here, rank 1 spawned by it ----------------------------------------------
# Padding rows carry whatever the buffers held (nothing computes them): they may overflow, harmlessly.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("arch, ep", [("llama", False), ("mixtral", True)], ids=["llama", "mixtral-ep"])
def test_graph_path_two_ranks_match_one(tiny_model, tmp_path, monkeypatch, arch, ep):
    """Greedy tokens over the graph path (static buffers, bucket padding, pipelined nano-batches), with
    2 ranks and with one process. mixtral-ep: each rank's fused MoE (Triton, interpreted) over its
    2 whole experts of 4, the other rank's pairs dropped in the align."""
    from_args = EngineConfig.from_args.__func__
    monkeypatch.setattr(EngineConfig, "from_args", classmethod(  # the workers get rank 0's config
        lambda cls, args: dataclasses.replace(from_args(cls, args), enforce_eager=False,
                                              cuda_graph_max_tokens=BUDGET)))
    path = tiny_model(arch)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(3, 41))]}
               for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    settings = dict(max_model_len=256, max_num_batched_tokens=BUDGET)

    def greedy(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    one = LLM(path, **settings)
    expected = greedy(one)
    assert one.engine.runner.graphs.num_replays > 0
    llm = LLM(path, tensor_parallel_size=2, pipeline=_tp_pipeline(tmp_path, arch), enable_expert_parallel=ep,
              **settings)
    try:
        assert llm.engine.runner.par.expert_parallel == ep
        graphs = llm.engine.runner.graphs
        assert graphs is not None and graphs.executors  # pipelined graphs too
        assert greedy(llm) == expected
        assert graphs.num_replays > 0
        if not ep:
            # the timeline's eager forward of a step no graph matches exactly (50 tokens: the 64-token
            # graph would pad it): the worker runs it eagerly too, so both ranks' all-reduces pair up
            from nanoflow.pipeline.timeline import record_timeline

            replays = graphs.num_replays
            records = record_timeline(llm.engine.runner, step_plan([20, 5, 40, 9], [(16, 17), (0, 9), (3, 20)]))
            assert {r["op"] for r in records} >= {"attn_all_reduce", "ffn_all_reduce"}
            assert graphs.num_replays == replays
            assert greedy(llm) == expected  # the ranks are still in step
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()
