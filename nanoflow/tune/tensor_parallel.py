"""`nanoflow tune` under tensor parallelism: the network-overlap pipeline, chosen by measurement.

What overlap hides under TP is the all-reduce, and how much a GEMM slows beside NCCL's kernels
depends on the link, NCCL's channel count and the GEMM's tiles: nothing a one-GPU op profile
predicts. So this search measures whole iterations. The engine's ranks capture every token bucket's
graph sequentially and, where the candidate pipeline covers the bucket, with its schedule too
(`network_overlap_schedule`: two nano-batches split at a fraction of the bucket, each all-reduce on
a second stream beside the other nano-batch's ops), and time the replays; the table is the maximum
over the ranks (`GraphRunner.replay_ms`), the step time every rank lives with. Per bucket, the split
whose graphs (mixed and decode-only together) beat the sequential ones of the same run by
`min_gain` is kept; elsewhere the sequential schedule stays, so it is always a candidate.

Each run is a fresh process holding a tensor-parallel engine's ranks, started and shut down as the
engine does it: candidates share no state, and a process group that fails to close cannot hold up
the next. The first run (no pipeline) gives the layer's op names and the sequential baseline.

NCCL's CTA cap (NCCL_MAX_CTAS: fewer SMs for the all-reduce, more for the GEMMs beside it, a slower
all-reduce alone) is the communicator's, set when it is made, so it acts on every bucket at once:
with `nccl_ctas`, every run is repeated at each cap, the cap whose buckets sum to the least step
time is kept (step_total_ms), and the engine starts its communicator with it (Pipeline.nccl_max_ctas).

Replays run with nothing to attend to (the capture batches hold no context), so attention's share
of a real step is missing on both sides alike: the GEMMs, the all-reduces and their interference
are what is timed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoflow.config import EngineConfig
from nanoflow.pipeline.schedule import Pipeline, network_overlap_schedule

Key = tuple[int, bool, bool]  # GraphRunner's (bucket, mixed, pipelined)
ALIGN = 16  # split points are multiples of this many rows


@dataclass(frozen=True)
class Run:
    """One engine start: the graphs' replay times, the layer's op names and the graph buckets."""

    replay_ms: dict[Key, float]
    op_names: list[str]
    buckets: list[int]
    seconds: float


@dataclass(frozen=True)
class BucketChoice:
    min_tokens: int
    max_tokens: int
    sequential_ms: float  # the bucket's sequential graphs (mixed + decode-only), summed
    tried: dict[int, tuple[float, float]]  # split -> (its pipelined graphs, the same run's sequential ones)
    split: int | None  # the one kept (None: sequential)

    @property
    def gain(self) -> float:
        if self.split is None:
            return 1.0
        piped, seq = self.tried[self.split]
        return seq / piped

    def to_json(self) -> dict[str, Any]:
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "split": self.split,
                "sequential_ms": self.sequential_ms, "gain": self.gain,
                "tried": {str(s): {"pipelined_ms": p, "sequential_ms": q} for s, (p, q) in self.tried.items()}}


def bucket_ranges(buckets: Sequence[int], min_tokens: int) -> list[tuple[int, int]]:
    """(previous bucket + 1, bucket) for each graph bucket above min_tokens: a batch of that many
    tokens replays the bucket's graph."""
    s = sorted(buckets)
    return [(s[i - 1] + 1, b) for i, b in enumerate(s) if i > 0 and b > min_tokens]


def split_for(lo: int, hi: int, fraction: float) -> int | None:
    """The split of a bucket's rows at fraction, on an ALIGN boundary; None where a batch of lo tokens
    would leave the second nano-batch empty."""
    split = int(hi * fraction) // ALIGN * ALIGN
    return split if 0 < split < lo else None


def candidate(op_names: Sequence[str], ranges: Sequence[tuple[int, int]], fraction: float,
              key: dict[str, Any]) -> Pipeline:
    schedules = tuple(network_overlap_schedule(op_names, hi, split, lo) for lo, hi in ranges
                      if (split := split_for(lo, hi, fraction)) is not None)
    return Pipeline(schedules, key, f"tune candidate: network overlap, split at {fraction:g} of each bucket")


def _bucket_ms(table: dict[Key, float], bucket: int, piped: bool) -> float:
    return sum(ms for (b, _, p), ms in table.items() if b == bucket and p == piped)


def choose(baseline: Run, runs: dict[float, Run], ranges: Sequence[tuple[int, int]],
           min_gain: float) -> list[BucketChoice]:
    """Per bucket, the split whose pipelined graphs beat the same run's sequential graphs by the most,
    if by at least min_gain. Each candidate is judged against the sequential graphs captured beside
    it (same process, same moment), not against another run's."""
    choices = []
    for lo, hi in ranges:
        tried: dict[int, tuple[float, float]] = {}
        for fraction, run in runs.items():
            split = split_for(lo, hi, fraction)
            piped = _bucket_ms(run.replay_ms, hi, True)
            if split is not None and piped > 0:
                tried[split] = (piped, _bucket_ms(run.replay_ms, hi, False))
        best = min(tried, key=lambda s: tried[s][0] / tried[s][1], default=None)
        if best is not None and tried[best][0] > tried[best][1] * (1 - min_gain):
            best = None
        choices.append(BucketChoice(lo, hi, _bucket_ms(baseline.replay_ms, hi, False), tried, best))
    return choices


def tuned_pipeline(op_names: Sequence[str], choices: Sequence[BucketChoice], key: dict[str, Any],
                   nccl_max_ctas: int | None = None) -> Pipeline:
    schedules = tuple(network_overlap_schedule(op_names, c.max_tokens, c.split, c.min_tokens)
                      for c in choices if c.split is not None)
    return Pipeline(schedules, key, "nanoflow tune (tensor parallel, measured)", nccl_max_ctas)


def step_total_ms(sequential: Run, choices: Sequence[BucketChoice]) -> float:
    """Every bucket's graphs (mixed + decode-only) summed: sequential, less what the kept splits save
    against the sequential graphs of their own run. One number to compare NCCL CTA caps by, which act
    on every bucket at once (the cap is the communicator's, not a schedule's)."""
    total = sum(_bucket_ms(sequential.replay_ms, b, False) for b in sequential.buckets)
    return total - sum(c.tried[c.split][1] - c.tried[c.split][0] for c in choices if c.split is not None)


def choose_cap(totals: dict[int | None, float], default: int | None, min_gain: float) -> int | None:
    """The cap whose step total is least, if it beats the engine's own (default) by min_gain."""
    best = min(totals, key=lambda c: totals[c])
    return best if totals[best] < totals[default] * (1 - min_gain) else default


def measure(config: EngineConfig, pipeline: Pipeline | None, workdir: Path, timeout_s: float = 1800.0) -> Run:
    """Starts the tensor-parallel ranks with the pipeline (None: sequential) in a fresh process and
    returns the replay-time table of their graphs."""
    spec = "off"
    if pipeline is not None:  # the workers read it too
        path = workdir / f"candidate_{len(list(workdir.glob('candidate_*.json')))}.json"
        pipeline.save(path)
        spec = str(path)
    config = dataclasses.replace(config, args=dataclasses.replace(config.args, pipeline=spec))
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    # not a daemon: it spawns the tensor-parallel workers itself
    p = ctx.Process(target=_measure_main, args=(config, send), name="nanoflow-tune-tp")
    p.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise RuntimeError(f"tensor-parallel measurement gave no result within {timeout_s:.0f} s")
        result = recv.recv()
    except EOFError:
        p.join(60)
        result = RuntimeError(f"the tensor-parallel measurement process died (exit code {p.exitcode}); "
                              "its error is printed above")
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
    if isinstance(result, BaseException):
        raise result
    return result


def _measure_main(config: EngineConfig, conn: Any) -> None:
    from nanoflow.executor.distributed import TensorParallelGroup
    from nanoflow.executor.model_runner import ModelRunner

    t0 = time.perf_counter()
    try:
        group = TensorParallelGroup.start(config)
        try:
            runner = ModelRunner(group.config, group.par)
            graphs = runner.graphs
            if graphs is None:
                raise ValueError("tensor-parallel tuning measures CUDA graph replays: CUDA graphs are off "
                                 "(--enforce-eager or --cuda-graph-max-tokens 0)")
            run = Run(dict(graphs.replay_ms), [op.name for op in runner.model.layer_ops[0]], list(graphs.buckets),
                      time.perf_counter() - t0)
            runner.release_graphs()
        finally:
            group.shutdown()
        conn.send(run)
    except BaseException as e:  # the parent raises it (as text: not every exception pickles)
        traceback.print_exc()
        conn.send(RuntimeError(f"tensor-parallel measurement failed: {type(e).__name__}: {e}"))
    finally:
        conn.close()


@dataclass
class TensorParallelTuning:
    pipeline: Pipeline
    choices: list[BucketChoice]
    baseline: Run  # the sequential graphs at the chosen cap
    runs: dict[float, Run]  # the candidates at the chosen cap, by split fraction
    cap_totals: dict[int | None, float]  # NCCL CTA cap (None: NCCL's own) -> step_total_ms

    def to_json(self) -> dict[str, Any]:
        return {"method": "measured whole-iteration graph replays (max over ranks)",
                "buckets": [c.to_json() for c in self.choices],
                "runs_s": {"sequential": self.baseline.seconds, **{f"{f:g}": r.seconds for f, r in self.runs.items()}},
                "nccl_max_ctas": {str(c): ms for c, ms in self.cap_totals.items()},
                "pipeline": self.pipeline.to_json()}


def tune_tensor_parallel(config: EngineConfig, key: dict[str, Any], fractions: Sequence[float] = (0.5,),
                         min_tokens: int = 256, min_gain: float = 0.01,
                         nccl_ctas: Sequence[int] = ()) -> TensorParallelTuning:
    """Measures the sequential graphs and, per fraction, the network-overlap candidate, then keeps
    per bucket what won (see the module docstring). nccl_ctas: NCCL CTA caps to try besides the
    engine's own (--nccl-max-ctas, else NCCL's), each a fresh start of every run; the cap whose
    step total (step_total_ms) is least by min_gain goes into the pipeline, which the engine then
    starts its communicator with."""
    default = config.args.nccl_max_ctas
    caps = [default, *dict.fromkeys(c for c in nccl_ctas if c != default)]
    per_cap: dict[int | None, tuple[Run, dict[float, Run], list[BucketChoice]]] = {}
    with tempfile.TemporaryDirectory(prefix="nanoflow-tune-tp-") as tmp:
        workdir = Path(tmp)
        for cap in caps:
            cfg = dataclasses.replace(config, args=dataclasses.replace(config.args, nccl_max_ctas=cap))
            label = f" (NCCL CTA cap {cap})" if cap is not None else ""
            print(f"tune: sequential graphs{label} ...", flush=True)
            baseline = measure(cfg, None, workdir)
            ranges = bucket_ranges(baseline.buckets, min_tokens)
            runs = {}
            for f in fractions:
                pipeline = candidate(baseline.op_names, ranges, f, key)
                if not pipeline.schedules:
                    continue
                print(f"tune: network overlap, split at {f:g} of each bucket above {min_tokens} tokens{label} ...",
                      flush=True)
                runs[f] = measure(cfg, pipeline, workdir)
            per_cap[cap] = (baseline, runs, choose(baseline, runs, ranges, min_gain))
    totals = {cap: step_total_ms(b, choices) for cap, (b, _, choices) in per_cap.items()}
    cap = choose_cap(totals, default, min_gain)
    baseline, runs, choices = per_cap[cap]
    return TensorParallelTuning(tuned_pipeline(baseline.op_names, choices, key, cap), choices, baseline, runs, totals)


def print_table(t: TensorParallelTuning) -> None:
    print("\nwhole-iteration graph replays per bucket (ms, max over ranks, mixed + decode-only graphs summed)")
    print(f"{'tokens':>12} {'sequential':>11}  " + "  ".join(f"{'split ' + f'{f:g}':>18}" for f in t.runs) + "  choice")
    for c in t.choices:
        cells = []
        for f in t.runs:
            s = split_for(c.min_tokens, c.max_tokens, f)
            cells.append(f"{s:>5}: {c.tried[s][0]:>6.2f} {c.tried[s][1] / c.tried[s][0]:>4.2f}x"
                         if s in c.tried else f"{'-':>18}")
        choice = "sequential" if c.split is None else f"network overlap, split {c.split} ({c.gain:.2f}x)"
        print(f"{f'{c.min_tokens}-{c.max_tokens}':>12} {c.sequential_ms:>11.2f}  " + "  ".join(cells) + f"  {choice}")
    if len(t.cap_totals) > 1:
        print("every bucket's graphs, summed, per NCCL CTA cap: " + ", ".join(
            f"{'NCCL' if c is None else c}: {ms:.2f} ms" for c, ms in t.cap_totals.items()) +
            f"; kept: {'NCCL' if t.pipeline.nccl_max_ctas is None else t.pipeline.nccl_max_ctas}")

