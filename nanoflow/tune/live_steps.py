"""Real steps on a live engine's ranks, as `nanoflow tune -tp` and benchmarks/tp_step_profile.py run
them: the ranks started and stopped as the engine does it (engine_runner), a step plan issued by
rank 0 and run by every rank, timed back to back (time_plan), per graph size (time_steps), and
checked against the same step through the sequential graphs (step_error)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from nanoflow.config import EngineConfig
from nanoflow.tune.timing import relative_error

log = logging.getLogger(__name__)


@contextlib.contextmanager
def engine_runner(config: EngineConfig) -> Iterator[Any]:
    """Rank 0's ModelRunner, the other ranks started as the engine starts them (tensor parallel size
    1: the runner alone); after a clean exit its graphs are released, and the ranks always stop."""
    from nanoflow.executor.distributed import TensorParallelGroup
    from nanoflow.executor.model_runner import ModelRunner

    group = TensorParallelGroup.start(config) if config.tensor_parallel_size > 1 else None
    try:
        runner = ModelRunner(group.config, group.par) if group else ModelRunner(config)
        yield runner
        runner.release_graphs()
    finally:
        if group:
            group.shutdown()


def time_steps(runner: Any, context_len: int, sizes: Sequence[int], warmup: int = 2, repeats: int = 5
               ) -> tuple[dict[tuple[int, bool], float], dict[tuple[int, bool], float]]:
    """GPU ms of a real step per graph (bucket, mixed) of the given sizes: decodes at context_len
    (spread as tune.profile's; a mixed graph's step a quarter decodes, the rest prompt chunks),
    timed by time_plan; and, for the steps that took a pipelined graph, step_error. The graph that
    runs a step is the engine's own choice (a pipelined one where the pipeline covers the bucket)."""
    from nanoflow.tune.profile import Workload, mixed_plan

    times, errors = {}, {}
    for bucket, mixed in sorted({(b, m) for b, m, _ in runner.graphs.graphs if b in sizes}):
        w = Workload(context_len, 0.25 if mixed else 1.0)
        plan = mixed_plan(bucket, w, runner.arch.vocab_size, runner.num_pages, runner.config.max_model_len)
        times[(bucket, mixed)], eager = time_plan(runner, plan, warmup, repeats)
        if eager:  # an eager step's time is its launches'
            log.warning("tune: %d of %d timed %d-token %s steps ran eagerly, not from a graph", eager, repeats,
                        bucket, "mixed" if mixed else "decode")
        if (err := step_error(runner, plan)) is not None:
            errors[(bucket, mixed)] = err
    return times, errors


def step_error(runner: Any, plan: Any) -> float | None:
    """The relative error of the step's logits through the graph the engine picks for it against
    the same step through the sequential graph (StepPlan.sequential), each issued by rank 0 and run
    by every rank; None where the engine picks no pipelined graph or the step samples nothing. Why:
    a pipeline that leaves work undone is fast (the gated decode kernel of 2026-11-30 did, unseen)."""
    import torch

    batch = runner.build(plan)
    key = runner.graphs.select(batch) if runner.graphs is not None else None
    if key is None or not key[2]:
        return None

    def logits(p: Any, built: Any) -> torch.Tensor | None:  # a fresh tensor (compute_logits), float32
        runner.par.broadcast_object(p.for_workers())
        return runner.forward(built, sequential=p.sequential)

    with torch.inference_mode():
        sequential = dataclasses.replace(plan, sequential=True)
        # a build of its own for each forward, as every worker builds each plan it reads (a build can
        # hold a collective: the broadcast of in-flight tokens)
        got, want = logits(plan, batch), logits(sequential, runner.build(sequential))
    if got is None or want is None:
        return None
    return relative_error(got, want)


def time_plan(runner: Any, plan: Any, warmup: int, repeats: int,
              around: AbstractContextManager[Any] | None = None) -> tuple[float, int]:
    """(ms a step, steps not replayed from a graph) of `repeats` steps of the plan, issued by rank
    0 as the engine issues a step and run by every rank, so the time holds the all-reduces' waits;
    issued back to back, as the engine does: a step timed alone would also hold a worker's time to
    read, build and launch its plan, which the engine hides behind the step before (rank 0 waits on
    it at the first all-reduce). CUDA events on a GPU, the wall clock on the CPU. around: a context
    entered around the timed steps only (benchmarks/tp_step_profile.py's profiler)."""
    import torch

    def issue(n: int) -> None:
        for _ in range(n):
            runner.par.broadcast_object(plan.for_workers())
            runner.forward(runner.build(plan))

    on_gpu = runner.device.type == "cuda"
    def replays() -> int:
        return runner.graphs.num_replays if runner.graphs is not None else 0

    with torch.inference_mode():  # the graphs' static inputs are inference tensors
        issue(warmup)
        if on_gpu:
            torch.cuda.synchronize(runner.device)
        before = replays()
        with around or contextlib.nullcontext():
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            issue(repeats)
            if on_gpu:
                end.record()
                end.synchronize()
            ms = start.elapsed_time(end) if on_gpu else (time.perf_counter() - t0) * 1000
    return ms / repeats, repeats - (replays() - before)
