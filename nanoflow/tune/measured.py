"""The search's choice, checked on the GPU: per bucket, whole forwards at the bucket's largest size
for the sequential schedule, the model's pick (and its cheapest candidate of each other overlap
order), and the schedules the model cannot price (each nano-batch on a stream of its own,
`pingpong_schedule`, at a few splits, each profiled SM cap and uncapped); the fastest measured one
is kept if it beats the sequential forward by min_gain, else the sequential schedule. The model
prices the candidates it knows to choose among hundreds; the measurement has the last word, so a
model error can cost a bucket its gain but not make it slower than sequential. A candidate is kept
only if its forward on its streams computes what the same schedule does on one stream (on the GPU,
over graph replays): a fast path that skips work is fast, and the gated decode kernel of 2026-11-30
won its buckets so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanoflow.pipeline.schedule import Schedule, unit_sms
from nanoflow.tune.model import PINGPONG, Candidate, split_for
from nanoflow.tune.search import BucketChoice, Tuning

# ms of one forward of `tokens` tokens through `schedule` (None: the sequential walk)
TimeForward = Callable[[int, Schedule | None], float]
# the relative error of that forward's output against the same schedule on one stream, same step
# (profile.StepForwards.error)
CheckForward = Callable[[int, Schedule], float]
# the same kernels in the same order on one stream compute the same bits (2026-11-30, one H200: ping-pong
# on two streams and on one, the same error against the sequential walk to two digits); a race or work
# left undone does not
MAX_CONCURRENCY_ERROR = 0.01
# under tensor parallelism the check is against the sequential graphs (tensor_parallel.step_error),
# which round differently where nano-batches change the GEMMs' shapes
MAX_REL_ERROR = 0.1


@dataclass(frozen=True)
class Measured:
    tuning: Tuning  # the search's, with the buckets that measurement overturned replaced
    times: dict[int, dict[str, float]]  # bucket's max_tokens -> {candidate description: ms}
    # bucket's max_tokens -> {candidate description: the output check's relative error}, for the
    # candidates checked (the fastest ones that gained, in order, until one passed)
    errors: dict[int, dict[str, float]] = field(default_factory=dict)


def measured_candidates(choice: BucketChoice, caps: Sequence[int | None], fractions: Sequence[float] = (0.5,),
                        num_sms: int | None = None, units_sms: int | None = None) -> list[Candidate]:
    """Sequential, the model's pick and its cheapest of each other overlap order, and ping-pong split
    at each fraction of the bucket's top (model.split_for) at each cap. Uneven splits matter in a
    serving step, whose decodes come first and whose prefill chunk is not cut in half. num_sms: each
    capped ping-pong also with its GEMMs as cuBLAS sized for the SMs the cap leaves (the two
    streams' kernels then fit the GPU side by side). units_sms (the GPU's SMs): each capped ping-pong
    also on execution units, nano-batch 1's stream on the cap's SMs and nano-batch 0's on the rest,
    and each capped overlap order (NanoFlow's own design: a memory unit for decode attention, a
    compute unit for the rest)."""
    out = [Candidate()]
    if choice.candidate.split is not None:
        out.append(choice.candidate)
    out += [c for c in choice.runners_up if c not in out]
    splits = sorted({s for f in fractions if (s := split_for(choice.min_tokens, choice.max_tokens, f)) is not None})
    out += [Candidate(s, c, PINGPONG) for s in splits for c in caps]
    if num_sms:
        out += [Candidate(s, c, PINGPONG, num_sms - c) for s in splits for c in caps if c]
    if units_sms:  # ping-pong's streams, and the overlap orders' compute and memory streams, on units
        out += [Candidate(s, c, PINGPONG, units=unit_sms(c, units_sms)) for s in splits for c in caps if c]
        out += [dataclasses.replace(c, units=unit_sms(c.ctas, units_sms)) for c in out[1:]
                if c.beside != PINGPONG and c.ctas and not c.units]
    return out


def measured_choice(tuning: Tuning, names: Sequence[str], caps: Sequence[int | None], time_forward: TimeForward,
                    min_gain: float, fractions: Sequence[float] = (0.5,), num_sms: int | None = None,
                    check_forward: CheckForward | None = None, units_sms: int | None = None) -> Measured:
    """The module docstring's check over every bucket of the tuning (op names: the model's layer;
    fractions, num_sms and units_sms: as measured_candidates; check_forward: the output check, None: none)."""
    buckets, schedules, times, errors, notes = [], [], {}, {}, []
    for b, schedule in zip(tuning.buckets, tuning.pipeline.schedules, strict=True):
        cands = measured_candidates(b, caps, fractions, num_sms, units_sms)
        if len(cands) == 1:  # sequential is the only choice: nothing to time
            buckets.append(b)
            schedules.append(schedule)
            continue
        ms = {c.describe(): time_forward(b.max_tokens, None if c.split is None else c.schedule(names, b.min_tokens,
                                                                                              b.max_tokens))
              for c in cands}
        times[b.max_tokens] = ms
        seq = ms[Candidate().describe()]
        best = Candidate()
        for c in sorted(cands, key=lambda c: ms[c.describe()]):  # the fastest that is right, if it gains
            if c.split is None or ms[c.describe()] >= seq * (1 - min_gain):
                break
            err = 0.0 if check_forward is None else check_forward(b.max_tokens, c.schedule(names, b.min_tokens,
                                                                                             b.max_tokens))
            errors.setdefault(b.max_tokens, {})[c.describe()] = err
            if err <= MAX_CONCURRENCY_ERROR:
                best = c
                break
            notes.append(f"{b.min_tokens}-{b.max_tokens} tokens: {c.describe()} measured "
                         f"{seq / ms[c.describe()]:.2f}x but its output is off by {err:.2g} (relative, against "
                         "the same schedule on one stream): not kept")
        if best == b.candidate:
            buckets.append(b)
            schedules.append(schedule)
            continue
        # overturned: the model priced sequential, not the schedules only measurement knows
        predicted = b.sequential_ms if best.split is None else None
        buckets.append(dataclasses.replace(b, candidate=best, predicted_ms=predicted, measured=True))
        schedules.append(dataclasses.replace(best.schedule(names, b.min_tokens, b.max_tokens), predicted_ms=predicted))
    pipeline = dataclasses.replace(tuning.pipeline, schedules=tuple(schedules))
    pipeline.check(names)
    tuning = dataclasses.replace(tuning, pipeline=pipeline, buckets=buckets, notes=[*tuning.notes, *notes])
    return Measured(tuning, times, errors)


def measure_buckets(runner: Any, profile: dict[str, Any], tuning: Tuning, workload: Any, min_gain: float,
                    fractions: Sequence[float], gemm_carveout: bool = False, execution_units: bool = False
                    ) -> Measured:
    """Whole forwards of the workload's steps (serving ones with --decode-fraction serve), timed as
    the profile timed the sequential one. On a GPU, each bucket's candidates (measured_candidates: the
    model's pick, sequential, ping-pong at each split fraction and profiled cap; gemm_carveout: also
    with its GEMMs sized for the SMs the cap leaves; execution_units: also on execution units) and
    the fastest kept (measured_choice); on the CPU, where streams run one after the other, only the
    pipelined picks."""
    import functools

    import torch

    from nanoflow.kernels.attention_common import num_sms
    from nanoflow.tune.profile import StepForwards, step_batch
    from nanoflow.tune.timing import Timer

    t = profile["timer"]
    timer = Timer(runner.device, t["warmup"], t["repeats"], graphs=True)
    names = [o["name"] for o in profile["ops"]]

    @functools.lru_cache(maxsize=1)  # the buckets are measured one after another
    def step(tokens: int) -> StepForwards:
        """One built step per bucket, shared by its candidates (building one runs a forward), with
        their executors, which the output check then reuses."""
        with torch.inference_mode():
            return StepForwards(runner, step_batch(runner, tokens, workload)[0])

    forward = lambda tokens, schedule: step(tokens).ms(timer, schedule)  # noqa: E731
    if runner.device.type == "cuda":
        caps = [*(int(c) for c in profile.get("decode_attention_capped_ms", {})), None]
        sms = num_sms(runner.device.index or 0)
        check = lambda tokens, schedule: step(tokens).error(schedule)  # noqa: E731
        return measured_choice(tuning, names, caps, forward, min_gain, fractions, sms if gemm_carveout else None,
                               check, sms if execution_units else None)
    times = {}
    for b, s in zip(tuning.buckets, tuning.pipeline.schedules, strict=True):
        if b.candidate.split is not None:
            times[b.max_tokens] = {b.candidate.describe(): forward(b.max_tokens, s)}
    return Measured(tuning, times)
