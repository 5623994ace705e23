"""The search's model of one step: what each op of a nano-batch costs, which ops a schedule runs side
by side, and what a stretch of side-by-side work costs under interference.

- Op times come from a profile (ms per layer), interpolated: dense ops by the nano-batch's rows,
  decode attention by its decodes (at its SM cap), prefill attention by its prefill tokens. Rows
  are ordered decodes first, so a split point decides how many decodes each nano-batch gets.
- A schedule's phases come from the executor itself: a `PipelineExecutor` built over stub ops with
  the profiled reads/writes gives the real cross-stream waits, so a dependency that serialises two
  streams serialises them in the prediction too. A phase is either stream 0 alone, or one stream-1
  op (decode attention) beside the stream-0 ops that may run while it does.
- A phase of stream-0 work W0 (ms alone) beside stream-1 work W1, keeping fractions r0 and r1 of
  their speeds while both run: both run for tau = min(W0/r0, W1/r1), then the other finishes
  alone, so the phase takes W0 + W1 - (r0 + r1 - 1) * tau. Overlap pays only where r0 + r1 > 1.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch

from nanoflow.layers.op import Op
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.schedule import Schedule, overlap_schedule, pingpong_schedule, sequential_schedule

DECODE, PREFILL = "decode_attention", "prefill_attention"
PINGPONG = "pingpong"
ALIGN = 16  # split points a fraction of a bucket gives are multiples of this many rows
SERIAL = (0.5, 0.5)  # kept fractions that price side-by-side work as if run one after the other


def split_for(lo: int, hi: int, fraction: float) -> int | None:
    """The split of a bucket's rows (lo..hi tokens) at fraction of its top, on an ALIGN boundary;
    None where a step of lo tokens would leave the second nano-batch empty."""
    split = int(hi * fraction) // ALIGN * ALIGN
    return split if 0 < split < lo else None


@dataclass(frozen=True)
class Candidate:
    split: int | None = None  # None: the sequential schedule
    ctas: int | None = None  # decode attention's SM cap on stream 1
    # what decode attention overlaps (pipeline.schedule.overlap_schedule), or PINGPONG (each
    # nano-batch on a stream of its own: pingpong_schedule; measured only, the model cannot price it)
    beside: str = "qkv"
    # GEMMs as cuBLAS sized for this many SMs (pipeline.schedule.cap_gemms; measured only): ping-pong's
    # all of them, overlap's those beside the capped decode attention; None: all SMs
    gemm_ctas: int | None = None
    # per stream, the SMs of the execution unit it runs on (Schedule.units; measured only); (): none
    units: tuple[int, ...] = ()

    def schedule(self, op_names: Sequence[str], min_tokens: int, max_tokens: int) -> Schedule:
        if self.split is None:
            return sequential_schedule(op_names, max_tokens, min_tokens)
        if self.beside == PINGPONG:
            s = pingpong_schedule(op_names, max_tokens, self.split, min_tokens, self.ctas, self.gemm_ctas,
                                  cublas=True)
        else:
            s = overlap_schedule(op_names, max_tokens, self.split, min_tokens, self.ctas, beside=self.beside,
                                 gemm_ctas=self.gemm_ctas, cublas=True)
        return replace(s, units=self.units)

    def describe(self) -> str:
        if self.split is None:
            return "sequential"
        cap = f"{self.ctas} CTAs" if self.ctas else "all SMs"
        gemm = f", GEMMs sized for {self.gemm_ctas} SMs" if self.gemm_ctas else ""
        if self.units:
            gemm += f", streams on execution units of {' / '.join(map(str, self.units))} SMs"
        if self.beside == PINGPONG:
            return (f"2 nano-batches split at {self.split}, each on a stream of its own, decode attention on "
                    f"{cap}{gemm}")
        return f"2 nano-batches split at {self.split}, decode attention on {cap} beside the other's {self.beside}{gemm}"


@dataclass(frozen=True)
class Phase:
    stream0: tuple[tuple[str, int], ...]  # (op, nano-batch) run on stream 0 in this phase
    stream1: tuple[str, int] | None = None  # the op beside them on stream 1 (None: stream 0 alone)


@cache
def phases(ops: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...], beside: str | None) -> tuple[Phase, ...]:
    """One steady-state layer of the sequential schedule (beside None) or an overlap schedule as
    phases, from the waits that the executor derives for ops with these (name, resource, reads,
    writes)."""
    names = [o[0] for o in ops]
    cand = Candidate() if beside is None else Candidate(2, beside=beside)
    stubs = tuple(Op(n, r, lambda b, t, c: None, rd, wr) for n, r, rd, wr in ops)  # type: ignore[arg-type]
    ex = PipelineExecutor(cand.schedule(names, 3, 4), [stubs, stubs], torch.device("cpu"))
    if ex.schedule.num_streams > 2:
        raise ValueError("the search models two streams")
    mine = [i for i, inst in enumerate(ex.instances) if inst.layer == 1]  # layer 0 has no layer before it
    s0 = [i for i in mine if ex.instances[i].step.stream == 0]
    s1 = [i for i in mine if ex.instances[i].step.stream == 1]
    pos = {i: p for p, i in enumerate(s0)}
    label = lambda i: (ex.instances[i].step.op, ex.instances[i].step.part)
    # ready[j]: the last stream-0 op that stream-1 op j waits for; block[j]: the first stream-0 op
    # that waits for it (or for a later one, which a stream runs after it)
    ready = [max((pos[w] for w in ex.waits[a] if w in pos), default=-1) for a in s1]
    block = [min((pos[i] for i in s0 if any(w in s1[j:] for w in ex.waits[i])), default=len(s0))
             for j in range(len(s1))]
    out: list[Phase] = []
    cursor = 0
    for j, a in enumerate(s1):
        r = max(ready[j], cursor - 1)
        if cursor <= r:
            out.append(Phase(tuple(label(i) for i in s0[cursor : r + 1])))
        end = block[j] - 1
        if j + 1 < len(s1):  # the next stream-1 op starts a phase of its own once it is ready
            end = min(end, max(ready[j + 1], r))
        end = max(end, r)
        out.append(Phase(tuple(label(i) for i in s0[r + 1 : end + 1]), label(a)))
        cursor = end + 1
    if cursor < len(s0):
        out.append(Phase(tuple(label(i) for i in s0[cursor:])))
    return tuple(out)


def phase_ms(w0: float, w1: float, r0: float, r1: float) -> float:
    if w0 <= 0 or w1 <= 0:
        return w0 + w1
    return w0 + w1 - (r0 + r1 - 1) * min(w0 / r0, w1 / r1)


@dataclass(frozen=True)
class Overlap:
    w0: float  # stream-0 work of the phase, ms alone
    w1: float  # stream-1 work, ms alone at its cap
    r0: float  # fraction of speed stream 0 keeps while both run
    r1: float


@dataclass(frozen=True)
class Evaluation:
    serial_ms: float  # every op instance alone, one after the other (ms per layer)
    overlaps: tuple[Overlap, ...]

    @property
    def layer_ms(self) -> float:
        return self.serial_ms - sum(o.w0 + o.w1 - phase_ms(o.w0, o.w1, o.r0, o.r1) for o in self.overlaps)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, proportional_below: bool) -> float:
    """Piecewise linear in x; above the last point proportional to x; below the first constant (a
    small GEMM still reads all its weights) or proportional (attention's work is per token)."""
    pts: dict[float, float] = {}
    for a, b in zip(xs, ys, strict=True):
        if a > 0:
            pts.setdefault(a, b)
    if x <= 0 or not pts:
        return 0.0
    px = sorted(pts)
    if x <= px[0]:
        return pts[px[0]] * (x / px[0] if proportional_below else 1.0)
    if x >= px[-1]:
        return pts[px[-1]] * x / px[-1]
    k = bisect.bisect_right(px, x)
    x0, x1 = px[k - 1], px[k]
    return pts[x0] + (pts[x1] - pts[x0]) * (x - x0) / (x1 - x0)


class CostModel:
    def __init__(self, profile: dict[str, Any]) -> None:
        self.ops = tuple((o["name"], o["resource"], tuple(o["reads"]), tuple(o["writes"])) for o in profile["ops"])
        self.names = [o[0] for o in self.ops]
        self.resource = {o[0]: o[1] for o in self.ops}
        self.num_layers = int(profile["num_layers"])
        self.fraction = float(profile["workload"]["decode_fraction"])
        b = profile["batches"]
        self.rows = [x["num_tokens"] for x in b]
        self.decodes = [x["num_decodes"] for x in b]
        self.prefills = [x["prefill_tokens"] for x in b]
        self.op_ms = profile["op_ms"]
        self.capped = {int(c): v for c, v in profile.get("decode_attention_capped_ms", {}).items()}
        self.pairs = profile.get("interference", {}).get("pairs", {})
        self.assumed: set[str] = set()  # the (op, cap) rates that no measurement gave

    @property
    def ctas(self) -> list[int]:
        return sorted(self.capped)

    def op_time(self, name: str, rows: int, decodes: int, ctas: int | None = None) -> float:
        if name == DECODE:
            ys = self.capped[ctas] if ctas is not None else self.op_ms[name]
            return _interp(self.decodes, ys, decodes, True)
        if name == PREFILL:
            return _interp(self.prefills, self.op_ms[name], rows - decodes, True)
        return _interp(self.rows, self.op_ms[name], rows, False)

    def rates(self, name: str, ctas: int | None) -> tuple[float, float]:
        """(fraction the op keeps, fraction decode attention keeps) when they run side by side."""
        key = str(ctas)
        got = self.pairs.get(name, {}).get(key)
        if got is not None:
            return float(got["op_kept"]), float(got["attention_kept"])
        measured = [(n, v[key]) for n, v in self.pairs.items() if key in v]
        alike = [v for n, v in measured if self.resource.get(n) == self.resource.get(name)] or [v for _, v in measured]
        self.assumed.add(f"{name}@{ctas}")
        if not alike:
            return SERIAL
        return (statistics.fmean(v["op_kept"] for v in alike), statistics.fmean(v["attention_kept"] for v in alike))

    def evaluate(self, cand: Candidate, num_tokens: int) -> Evaluation:
        """Per-layer cost of a step of num_tokens tokens under the candidate (its decodes first)."""
        d = round(num_tokens * self.fraction)
        if cand.split is None:
            parts = [(num_tokens, d)]
        else:
            d0 = min(cand.split, d)
            parts = [(cand.split, d0), (num_tokens - cand.split, d - d0)]
        cost = lambda op, part: self.op_time(op, *parts[part], cand.ctas if op == DECODE else None)
        serial, overlaps = 0.0, []
        for ph in phases(self.ops, None if cand.split is None else cand.beside):
            times = [cost(op, part) for op, part in ph.stream0]
            w0 = sum(times)
            serial += w0
            if ph.stream1 is None:
                continue
            w1 = cost(*ph.stream1)
            serial += w1
            if w0 > 0 and w1 > 0:
                rates = [self.rates(op, cand.ctas) for op, _ in ph.stream0]
                r0 = w0 / sum(t / r[0] for t, r in zip(times, rates, strict=True))
                r1 = sum(t * r[1] for t, r in zip(times, rates, strict=True)) / w0
                overlaps.append(Overlap(w0, w1, r0, r1))
        return Evaluation(serial, tuple(overlaps))
