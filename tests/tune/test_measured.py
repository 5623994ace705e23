"""tune.measured: the search's pick checked against whole-forward timings (here a fake clock), with
the ping-pong schedules the model cannot price among the candidates."""

from __future__ import annotations

import synthetic_profiles as sp

from nanoflow.pipeline.schedule import GEMM_OPS, Schedule, unit_sms
from nanoflow.tune.measured import measured_candidates, measured_choice
from nanoflow.tune.model import PINGPONG
from nanoflow.tune.search import search

SIZES = [256, 512, 1024]


def _tuning(op_kept: float, attention_kept: float):
    profile = sp.profile(op_kept, attention_kept, sizes=SIZES)
    return search(profile), [o["name"] for o in profile["ops"]]


def _clock(seq_ms: float, model_ms: float, pingpong_ms: dict[int | None, float]):
    """A fake time_forward: by the schedule's shape, and for ping-pong by its decode cap."""
    calls: list[tuple[int, Schedule | None]] = []

    def time_forward(tokens: int, schedule: Schedule | None) -> float:
        calls.append((tokens, schedule))
        if schedule is None:
            return seq_ms
        decode = next(s for s in schedule.steps if s.op == "decode_attention")
        pingpong = {s.stream for s in schedule.steps if s.part == 1} == {1}  # all of nano-batch 1 on stream 1
        return pingpong_ms[decode.num_ctas] if pingpong else model_ms

    return time_forward, calls


def test_candidates_per_bucket() -> None:
    tuning, _ = _tuning(0.9, 0.9)  # overlap pays: the model splits the larger buckets
    first, *rest = tuning.buckets
    assert [c.split for c in measured_candidates(first, [44, None])] == [None]  # 1-256: no split fits
    for b in rest:
        cands = measured_candidates(b, [44, None])
        assert cands[0].split is None and cands[1] == b.candidate
        # the model's cheapest of the other overlap order, then ping-pong at each cap
        (other,) = b.runners_up
        assert other.beside != b.candidate.beside and cands[2] == other
        assert [(c.split, c.ctas, c.beside) for c in cands[3:]] == [(b.max_tokens // 2, 44, PINGPONG),
                                                                   (b.max_tokens // 2, None, PINGPONG)]
    # uneven splits (rounded to 16 rows), each at every cap; none that the bucket's smallest step
    # would leave a nano-batch empty with (513-1024: 512 fits, 640 and 768 do not)
    last = tuning.buckets[-1]
    cands = measured_candidates(last, [44], fractions=(0.375, 0.5, 0.625, 0.75))
    assert [(c.split, c.ctas) for c in cands if c.beside == PINGPONG] == [(384, 44), (512, 44)]
    # with the SM count: each capped ping-pong again, its GEMMs as cuBLAS sized for the SMs left
    cands = measured_candidates(last, [44, None], num_sms=132)
    assert [(c.split, c.ctas, c.gemm_ctas) for c in cands if c.beside == PINGPONG] == [
        (512, 44, None), (512, None, None), (512, 44, 88)]
    gemms = [st for st in cands[-1].schedule(sp.NAMES, last.min_tokens, last.max_tokens).steps if st.op in GEMM_OPS]
    assert len(gemms) == 8 and {(st.num_ctas, st.cublas) for st in gemms} == {(88, True)}
    assert cands[-1].describe().endswith("decode attention on 44 CTAs, GEMMs sized for 88 SMs")
    # with execution units: each capped ping-pong again, its streams on green contexts of the cap's
    # SMs (nano-batch 1's) and the rest, in multiples of 8
    cands = measured_candidates(last, [44, None], units_sms=132)
    unit, *overlaps = [c for c in cands if c.units]
    # and the model's overlap picks: decode attention's stream a memory unit, the other a compute unit
    assert [(c.beside, c.units) for c in overlaps] == [(c.beside, unit_sms(c.ctas, 132)) for c in cands[1:3]]
    assert {c.beside for c in overlaps} == {"qkv", "mlp"}
    assert (unit.split, unit.ctas, unit.units) == (512, 44, (88, 40))
    schedule = unit.schedule(sp.NAMES, last.min_tokens, last.max_tokens)
    assert schedule.units == (88, 40) and schedule.on_one_stream().units == ()
    assert unit.describe().endswith("decode attention on 44 CTAs, streams on execution units of 88 / 40 SMs")


def test_measurement_overturns_the_model() -> None:
    tuning, names = _tuning(0.9, 0.9)
    # ping-pong on 44 SMs measures fastest, the model's pick slower than sequential
    clock, calls = _clock(10.0, 10.5, {44: 8.0, None: 9.9})
    m = measured_choice(tuning, names, [44, None], clock, min_gain=0.01)
    assert [t for t, _ in calls] == [512] * 5 + [1024] * 5  # 1-256: sequential the only choice, not timed
    for b, s in zip(m.tuning.buckets[1:], m.tuning.pipeline.schedules[1:], strict=True):
        assert (b.candidate.beside, b.candidate.ctas, b.measured, b.predicted_ms) == (PINGPONG, 44, True, None)
        assert s.num_streams == 2 and s.predicted_ms is None and m.times[b.max_tokens][b.candidate.describe()] == 8.0
    m.tuning.pipeline.check(names)
    assert m.tuning.buckets[0] == tuning.buckets[0]


def test_no_gain_by_the_margin_keeps_sequential() -> None:
    tuning, names = _tuning(0.9, 0.9)
    clock, _ = _clock(10.0, 9.95, {44: 9.99, None: 10.2})  # 0.5% faster: under min_gain
    m = measured_choice(tuning, names, [44, None], clock, min_gain=0.01)
    assert all(b.candidate.split is None for b in m.tuning.buckets)
    assert all(s.num_streams == 1 for s in m.tuning.pipeline.schedules)
    assert [b.measured for b in m.tuning.buckets] == [b.candidate.split is not None for b in tuning.buckets]
    # and where the model's pick measures fastest, it stays, priced as the model priced it
    clock, _ = _clock(10.0, 8.0, {44: 9.0, None: 9.0})
    m = measured_choice(tuning, names, [44, None], clock, min_gain=0.01)
    assert m.tuning.buckets == tuning.buckets and m.tuning.pipeline == tuning.pipeline


def test_a_fast_candidate_whose_output_is_off_is_not_kept() -> None:
    tuning, names = _tuning(0.9, 0.9)
    clock, _ = _clock(10.0, 10.5, {44: 8.0, None: 9.0})
    checked: list[int | None] = []

    def check(tokens: int, schedule: Schedule) -> float:
        """Ping-pong on 44 SMs computes something else (as the gated kernel did); uncapped is right."""
        cap = next(s.num_ctas for s in schedule.steps if s.op == "decode_attention")
        checked.append(cap)
        return 0.8 if cap == 44 else 1e-3

    m = measured_choice(tuning, names, [44, None], clock, min_gain=0.01, check_forward=check)
    assert checked == [44, None, 44, None]  # per bucket: the fastest, then the next; sequential never
    for b in m.tuning.buckets[1:]:
        assert (b.candidate.beside, b.candidate.ctas) == (PINGPONG, None)
    assert sum("off by 0.8" in n and "not kept" in n for n in m.tuning.notes) == 2
    assert [sorted(e.values()) for e in m.errors.values()] == [[1e-3, 0.8]] * 2  # every check, by bucket
    # a wrong candidate that is the only one gaining leaves the bucket sequential
    clock, _ = _clock(10.0, 10.5, {44: 8.0, None: 10.2})
    m = measured_choice(tuning, names, [44, None], clock, min_gain=0.01, check_forward=check)
    assert all(b.candidate.split is None for b in m.tuning.buckets)
