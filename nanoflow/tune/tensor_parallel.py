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

Two kinds of candidate: network overlap, and ping-pong (`pingpong_schedule`: each nano-batch's
compute on a stream of its own, its decode attention capped, every all-reduce on a third), which
also hides decode attention behind the other nano-batch's GEMMs. Graph replays run with nothing to
attend to (the capture batches hold no context), so on a GPU each run also times real steps per
bucket, decodes at `context_len` (a mixed graph's: a quarter of its tokens decodes, the rest prompt
chunks) issued by rank 0 as the engine issues a step and run by every rank (`Run.step_ms`); a
candidate is then judged by its steps against the sequential run's same steps (tune.live_steps runs
them). Without them (the CPU, or context_len 0) the graphs are compared within a run, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanoflow.config import EngineConfig
from nanoflow.executor.cuda_graph import bucket_ends, capture_sizes
from nanoflow.executor.isolated import run_isolated
from nanoflow.pipeline.schedule import Pipeline, Schedule, network_overlap_schedule, pingpong_schedule
from nanoflow.tune.measured import MAX_REL_ERROR
from nanoflow.tune.model import PINGPONG, split_for

Key = tuple[int, bool, bool]  # GraphRunner's (bucket, mixed, pipelined)
NETWORK = "network"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPCandidate:
    """A kind of schedule, split at a fraction of each bucket (pingpong: decode attention capped)."""

    kind: str = NETWORK
    fraction: float = 0.5
    decode_ctas: int | None = None
    # every GEMM as cuBLAS sized for this many SMs (pipeline.schedule.cap_gemms), so that it runs in one
    # wave beside the all-reduce or the other stream's decode attention; None: all SMs
    gemm_ctas: int | None = None
    # per stream, the SMs of its execution unit (Schedule.units: ping-pong's nano-batch 0, nano-batch 1,
    # network; network overlap's compute, network); (): plain streams
    units: tuple[int, ...] = ()

    @property
    def num_streams(self) -> int:
        """Its schedules' streams (what a --tp-units spec must list): ping-pong's two nano-batches and
        the network; network overlap's compute and the network."""
        return 3 if self.kind == PINGPONG else 2

    @property
    def label(self) -> str:
        cap = f" decode@{self.decode_ctas}" if self.kind == PINGPONG and self.decode_ctas else ""
        gemm = f" gemm@{self.gemm_ctas}" if self.gemm_ctas else ""
        units = f" units@{'/'.join(map(str, self.units))}" if self.units else ""
        return f"{self.kind} {self.fraction:g}{cap}{gemm}{units}"

    def schedule(self, op_names: Sequence[str], lo: int, hi: int) -> Schedule | None:
        """The bucket (lo, hi]'s schedule; None where the split leaves a nano-batch empty."""
        split = split_for(lo, hi, self.fraction)
        if split is None:
            return None
        if self.kind == PINGPONG:
            s = pingpong_schedule(op_names, hi, split, lo, self.decode_ctas, self.gemm_ctas, cublas=True)
        else:
            s = network_overlap_schedule(op_names, hi, split, lo, self.gemm_ctas, cublas=True)
        return replace(s, units=self.units)


@dataclass(frozen=True)
class Run:
    """One engine start: the graphs' replay times, the layer's op names, the graph buckets and (on a
    GPU) the times of real steps per (bucket, mixed)."""

    replay_ms: dict[Key, float]
    op_names: list[str]
    buckets: list[int]
    seconds: float
    step_ms: dict[tuple[int, bool], float] = field(default_factory=dict)
    # per timed step that took a pipelined graph: its logits' relative error against the same step
    # through the sequential graph (step_error)
    step_error: dict[tuple[int, bool], float] = field(default_factory=dict)


@dataclass(frozen=True)
class BucketChoice:
    min_tokens: int
    max_tokens: int
    sequential_ms: float  # the bucket's sequential graphs (mixed + decode-only), summed
    # candidate -> (its split, its pipelined time, the sequential time it is judged against)
    tried: dict[TPCandidate, tuple[int, float, float]]
    chosen: TPCandidate | None  # the one kept (None: sequential)
    # candidates left out because their steps computed something else: the largest relative error
    refused: dict[TPCandidate, float] = field(default_factory=dict)

    @property
    def split(self) -> int | None:
        return None if self.chosen is None else self.tried[self.chosen][0]

    @property
    def gain(self) -> float:
        if self.chosen is None:
            return 1.0
        _, piped, seq = self.tried[self.chosen]
        return seq / piped

    def to_json(self) -> dict[str, Any]:
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "split": self.split,
                "choice": None if self.chosen is None else self.chosen.label,
                "sequential_ms": self.sequential_ms, "gain": self.gain,
                "tried": {c.label: {"split": s, "pipelined_ms": p, "sequential_ms": q}
                          for c, (s, p, q) in self.tried.items()},
                "refused": {c.label: err for c, err in self.refused.items()}}


def bucket_ranges(buckets: Sequence[int], min_tokens: int, step: int) -> list[tuple[int, int]]:
    """(previous end + 1, end) for each graph size where a pipeline bucket ends (bucket_ends) above
    min_tokens: every batch in the range replays a graph of the range, with the range's schedule."""
    s = bucket_ends(buckets, step)
    return [(s[i - 1] + 1, b) for i, b in enumerate(s) if i > 0 and b > min_tokens]


def candidate(op_names: Sequence[str], ranges: Sequence[tuple[int, int]], cand: TPCandidate,
              key: dict[str, Any]) -> Pipeline:
    schedules = tuple(s for lo, hi in ranges if (s := cand.schedule(op_names, lo, hi)) is not None)
    return Pipeline(schedules, key, f"tune candidate: {cand.label} of each bucket")


def _bucket_ms(table: dict[Key, float], bucket: int, piped: bool) -> float:
    return sum(ms for (b, _, p), ms in table.items() if b == bucket and p == piped)


def _steps_ms(run: Run, bucket: int) -> float:
    return sum(ms for (b, _), ms in run.step_ms.items() if b == bucket)


def choose(baseline: Run, runs: dict[TPCandidate, Run], ranges: Sequence[tuple[int, int]],
           min_gain: float) -> list[BucketChoice]:
    """Per bucket, the candidate that beats the sequential schedule by the most, if by at least
    min_gain. With real steps timed (a GPU) a candidate's steps are judged against the sequential
    run's same steps; else its pipelined graphs against the sequential graphs captured beside them
    (same process, same moment). A candidate whose steps of the bucket computed something else
    than the sequential graph (step_error over MAX_REL_ERROR) is refused, however fast."""
    choices = []
    for lo, hi in ranges:
        tried: dict[TPCandidate, tuple[int, float, float]] = {}
        refused: dict[TPCandidate, float] = {}
        for cand, run in runs.items():
            split = split_for(lo, hi, cand.fraction)
            if split is None or _bucket_ms(run.replay_ms, hi, True) <= 0:
                continue  # no pipelined graph of this bucket in the run
            err = max((e for (b, _), e in run.step_error.items() if b == hi), default=0.0)
            if not err <= MAX_REL_ERROR:  # NaN too
                refused[cand] = err
                log.warning("tune: %s at %d-%d tokens computes something else than the sequential schedule "
                            "(logits off by %.2g, relative): not a candidate", cand.label, lo, hi, err)
                continue
            if run.step_ms and baseline.step_ms:
                tried[cand] = (split, _steps_ms(run, hi), _steps_ms(baseline, hi))
            else:
                tried[cand] = (split, _bucket_ms(run.replay_ms, hi, True), _bucket_ms(run.replay_ms, hi, False))
        best = min(tried, key=lambda c: tried[c][1] / tried[c][2], default=None)
        if best is not None and tried[best][1] > tried[best][2] * (1 - min_gain):
            best = None
        choices.append(BucketChoice(lo, hi, _bucket_ms(baseline.replay_ms, hi, False), tried, best, refused))
    return choices


def tuned_pipeline(op_names: Sequence[str], choices: Sequence[BucketChoice], key: dict[str, Any],
                   nccl_max_ctas: int | None = None) -> Pipeline:
    schedules = tuple(c.chosen.schedule(op_names, c.min_tokens, c.max_tokens) for c in choices
                      if c.chosen is not None)
    return Pipeline(schedules, key, "nanoflow tune (tensor parallel, measured)", nccl_max_ctas)


def step_total_ms(sequential: Run, choices: Sequence[BucketChoice]) -> float:
    """Every bucket's graphs (mixed + decode-only) summed: sequential, less what the kept
    candidates save against what they were judged by. One number to compare NCCL CTA caps by,
    which act on every bucket at once (the cap is the communicator's, not a schedule's). With real
    steps timed, the total is theirs."""
    total = sum(sequential.step_ms.values()) if sequential.step_ms else \
        sum(_bucket_ms(sequential.replay_ms, b, False) for b in sequential.buckets)
    kept = [c.tried[c.chosen] for c in choices if c.chosen is not None]
    return total - sum(seq - piped for _, piped, seq in kept)


def choose_cap(totals: dict[int | None, float], default: int | None, min_gain: float) -> int | None:
    """The cap whose step total is least, if it beats the engine's own (default) by min_gain."""
    best = min(totals, key=lambda c: totals[c])
    return best if totals[best] < totals[default] * (1 - min_gain) else default


def measure(config: EngineConfig, pipeline: Pipeline | None, workdir: Path, context_len: int = 0,
            sizes: Sequence[int] = (), timeout_s: float = 1800.0) -> Run:
    """Starts the tensor-parallel ranks with the pipeline (None: sequential) in a fresh process and
    returns the replay-time table of their graphs and, on a GPU with context_len, the times of real
    steps of the graph sizes in `sizes` (time_steps)."""
    spec = "off"
    if pipeline is not None:  # the workers read it too
        path = workdir / f"candidate_{len(list(workdir.glob('candidate_*.json')))}.json"
        pipeline.save(path)
        spec = str(path)
    config = dataclasses.replace(config, args=dataclasses.replace(config.args, pipeline=spec))
    return run_isolated(_measure_run, config, context_len, list(sizes), timeout_s=timeout_s,
                        name="tensor-parallel measurement")


def _measure_run(config: EngineConfig, context_len: int, sizes: list[int]) -> Run:
    from nanoflow.tune.live_steps import engine_runner, time_steps

    t0 = time.perf_counter()
    with engine_runner(config) as runner:
        graphs = runner.graphs
        if graphs is None:
            raise ValueError("tensor-parallel tuning measures CUDA graph replays: CUDA graphs are off "
                             "(--enforce-eager or --cuda-graph-max-tokens 0)")
        on_gpu = runner.device.type == "cuda"
        steps, errors = time_steps(runner, context_len, sizes) if on_gpu and context_len else ({}, {})
        return Run(dict(graphs.replay_ms), [op.name for op in runner.model.layer_ops[0]], list(graphs.buckets),
                   time.perf_counter() - t0, steps, errors)


@dataclass
class TensorParallelTuning:
    pipeline: Pipeline
    choices: list[BucketChoice]
    baseline: Run  # the sequential graphs at the chosen cap
    runs: dict[TPCandidate, Run]  # the candidates' runs at the chosen cap
    cap_totals: dict[int | None, float]  # NCCL CTA cap (None: NCCL's own) -> step_total_ms

    def to_json(self) -> dict[str, Any]:
        how = "real steps with context per bucket, against the sequential run's" if self.baseline.step_ms else \
            "whole-iteration graph replays (max over ranks), against the same run's sequential graphs"
        return {"method": f"measured: {how}",
                "buckets": [c.to_json() for c in self.choices],
                "runs_s": {"sequential": self.baseline.seconds, **{c.label: r.seconds for c, r in self.runs.items()}},
                "sequential_step_ms": {f"{b} {'mixed' if m else 'decode'}": ms
                                       for (b, m), ms in self.baseline.step_ms.items()},
                "nccl_max_ctas": {str(c): ms for c, ms in self.cap_totals.items()},
                "pipeline": self.pipeline.to_json()}


def tune_tensor_parallel(config: EngineConfig, key: dict[str, Any],
                         candidates: Sequence[TPCandidate] = (TPCandidate(),), min_tokens: int = 256,
                         min_gain: float = 0.01, nccl_ctas: Sequence[int] = (), context_len: int = 0,
                         size_step: int = 128) -> TensorParallelTuning:
    """Measures the sequential schedule and each candidate, then keeps per bucket what won (see the
    module docstring). nccl_ctas: NCCL CTA caps to try besides the engine's own (--nccl-max-ctas,
    else NCCL's), each a fresh start of every run; the cap whose step total (step_total_ms) is
    least by min_gain goes into the pipeline, which the engine then starts its communicator with.
    context_len: the decodes' context in the real steps each run times on a GPU (0: none), at the
    graph sizes where buckets end (bucket_ends with size_step), the tops of the ranges judged."""
    default = config.args.nccl_max_ctas
    caps = [default, *dict.fromkeys(c for c in nccl_ctas if c != default)]
    ranges = bucket_ranges(capture_sizes(config.cuda_graph_max_tokens, config.cuda_graph_sizes), min_tokens, size_step)
    tops = [hi for _, hi in ranges]
    if context_len:  # judged by real steps at the buckets' tops: each start captures those graphs only
        config = dataclasses.replace(config, cuda_graph_sizes=tuple(tops))  # (~20, not ~250: starts 2-3x faster)
    per_cap: dict[int | None, tuple[Run, dict[TPCandidate, Run], list[BucketChoice]]] = {}
    with tempfile.TemporaryDirectory(prefix="nanoflow-tune-tp-") as tmp:
        workdir = Path(tmp)
        for cap in caps:
            cfg = dataclasses.replace(config, args=dataclasses.replace(config.args, nccl_max_ctas=cap))
            label = f" (NCCL CTA cap {cap})" if cap is not None else ""
            print(f"tune: sequential{label} ...", flush=True)
            baseline = measure(cfg, None, workdir, context_len, tops)
            runs = {}
            for cand in candidates:
                pipeline = candidate(baseline.op_names, ranges, cand, key)
                if not pipeline.schedules:
                    continue
                print(f"tune: {cand.label} of each bucket above {min_tokens} tokens{label} ...", flush=True)
                runs[cand] = measure(cfg, pipeline, workdir, context_len, tops)
            per_cap[cap] = (baseline, runs, choose(baseline, runs, ranges, min_gain))
    totals = {cap: step_total_ms(b, choices) for cap, (b, _, choices) in per_cap.items()}
    cap = choose_cap(totals, default, min_gain)
    baseline, runs, choices = per_cap[cap]
    return TensorParallelTuning(tuned_pipeline(baseline.op_names, choices, key, cap), choices, baseline, runs, totals)


def print_table(t: TensorParallelTuning) -> None:
    what = "real steps with context (decode-only + mixed)" if t.baseline.step_ms else \
        "whole-iteration graph replays (max over ranks, mixed + decode-only graphs summed)"
    print(f"\n{what} per bucket, ms: each candidate's time and gain")
    print(f"{'tokens':>12} {'sequential':>11}  " + "  ".join(f"{c.label:>24}" for c in t.runs) + "  choice")
    for c in t.choices:
        cells = []
        for cand in t.runs:
            got = c.tried.get(cand)
            cells.append(f"{got[0]:>5}: {got[1]:>9.2f} {got[2] / got[1]:>5.2f}x" if got else f"{'-':>24}")
        seq = _steps_ms(t.baseline, c.max_tokens) if t.baseline.step_ms else c.sequential_ms
        choice = "sequential" if c.chosen is None else f"{c.chosen.label}, split {c.split} ({c.gain:.2f}x)"
        print(f"{f'{c.min_tokens}-{c.max_tokens}':>12} {seq:>11.2f}  " + "  ".join(cells) + f"  {choice}")
    if len(t.cap_totals) > 1:
        print("every bucket summed, per NCCL CTA cap: " + ", ".join(
            f"{'NCCL' if c is None else c}: {ms:.2f} ms" for c, ms in t.cap_totals.items()) +
            f"; kept: {'NCCL' if t.pipeline.nccl_max_ctas is None else t.pipeline.nccl_max_ctas}")
