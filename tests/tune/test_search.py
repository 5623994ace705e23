"""The pipeline search on synthetic profiles: it overlaps where the profile says overlap pays, keeps
the sequential schedule where interference eats the gain, follows the executor's own waits, and
writes a pipeline that checks and round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
import synthetic_profiles as sp
import torch

from nanoflow.layers.op import Op
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.schedule import Pipeline
from nanoflow.tune.model import Candidate, CostModel, phase_ms, phases
from nanoflow.tune.search import buckets, search


def _stub_layers(ops: list, num_layers: int = 2) -> list[tuple[Op, ...]]:
    layer = tuple(Op(n, r, lambda b, t, c: None, tuple(rd), tuple(wr)) for n, r, rd, wr in ops)
    return [layer] * num_layers


def test_overlap_pays_gives_two_nano_batches() -> None:
    profile = sp.profile(op_kept=0.75, attention_kept=0.85, memory_kept=0.5)
    tuning = search(profile)
    assert tuning.solver.startswith("HiGHS") and tuning.seconds < 30
    by_top = {b.max_tokens: b for b in tuning.buckets}
    for top in (1024, 1536, 2048):
        b = by_top[top]
        c = b.candidate
        assert c.split is not None, f"{top} tokens: expected a pipeline, got {c.describe()}"
        decodes = round(top * 0.5)
        # a sensible split: inside the decodes (nano-batch 0's decode attention has work to hide), and
        # below the bucket's smallest size (no nano-batch is ever empty)
        assert 0 < c.split <= decodes and c.split < b.min_tokens
        assert c.ctas in sp.SLOWDOWN
        assert b.predicted_ms < 0.95 * b.sequential_ms
    big = tuning.pipeline.for_tokens(2048)
    assert big is not None and big.partitions["dense"] == (0, by_top[2048].candidate.split, 2048)
    assert big.predicted_ms == pytest.approx(by_top[2048].predicted_ms)
    decode_steps = [s for s in big.steps if s.op == "decode_attention"]
    assert {(s.stream, s.num_ctas) for s in decode_steps} == {(1, by_top[2048].candidate.ctas)}
    # the smallest bucket cannot be split (a nano-batch would be empty at 1 token)
    assert tuning.buckets[0].candidate.split is None


@pytest.mark.parametrize("kept", [(0.45, 0.45, None), (0.6, 0.3, None)], ids=["both-slow", "attention-starved"])
def test_interference_that_kills_the_gain_keeps_sequential(kept) -> None:
    tuning = search(sp.profile(*kept))
    assert all(b.candidate.split is None for b in tuning.buckets), [b.candidate for b in tuning.buckets]
    assert all(len(s.partitions) == 1 and s.num_streams == 1 for s in tuning.pipeline.schedules)
    assert all(b.predicted_ms == b.sequential_ms for b in tuning.buckets)


def test_no_interference_table_prices_overlap_as_serial() -> None:
    """A CPU profile measures no pairs: side by side costs what one after the other costs, so only
    a split that is cheaper by itself could win, and capped attention never is."""
    tuning = search(sp.profile(0.9, 0.9, pairs=False))
    assert all(b.candidate.split is None for b in tuning.buckets)
    assert any("no interference table" in n for n in tuning.notes)


def test_the_gain_must_exceed_min_gain() -> None:
    profile = sp.profile(0.75, 0.85, 0.5)
    best = max(search(profile).buckets, key=lambda b: b.sequential_ms / b.predicted_ms)
    gain = best.sequential_ms / best.predicted_ms - 1
    strict = search(profile, min_gain=gain + 0.01)
    assert all(b.candidate.split is None for b in strict.buckets)


def test_milp_agrees_with_pricing_every_candidate() -> None:
    for profile in (sp.profile(0.75, 0.85, 0.5), sp.profile(0.45, 0.45), sp.profile(0.7, 0.7, decode_fraction=0.8)):
        milp, enum = search(profile), search(profile, solver="enumerate")
        assert [b.candidate for b in milp.buckets] == [b.candidate for b in enum.buckets]
        assert [b.predicted_ms for b in milp.buckets] == pytest.approx([b.predicted_ms for b in enum.buckets])


def test_pipeline_checks_runs_on_the_executor_and_round_trips(tmp_path) -> None:
    profile = sp.profile(0.75, 0.85, 0.5, key={"gpu": "synthetic", "tp": 1})
    pipe = search(profile).pipeline
    pipe.check(sp.NAMES)
    for schedule in pipe.schedules:
        assert schedule.predicted_ms is not None and schedule.predicted_ms > 0
        PipelineExecutor(schedule, _stub_layers(sp.OPS), torch.device("cpu"))  # valid against the model's ops
    ranges = [(s.min_tokens, s.max_tokens) for s in pipe.schedules]
    assert ranges == buckets(profile["sizes"]) and ranges[0][0] == 1 and ranges[-1][1] == 2048
    again = Pipeline.from_json(json.loads(json.dumps(pipe.to_json())))
    assert again.schedules == pipe.schedules and again.key == pipe.key == profile["key"]
    pipe.save(tmp_path / "p.json")
    assert Pipeline.load(tmp_path / "p.json").schedules == pipe.schedules


def test_phase_time() -> None:
    assert phase_ms(1.0, 1.0, 1.0, 1.0) == pytest.approx(1.0)  # perfect overlap
    assert phase_ms(1.0, 1.0, 0.5, 0.5) == pytest.approx(2.0)  # no better than one after the other
    assert phase_ms(1.0, 1.0, 0.4, 0.4) > 2.0  # worse: overlap hurts
    # attention (0.5 ms alone) keeps 0.5 of its speed, so it runs 1 ms beside the GEMM, which keeps
    # 0.8 and does 0.8 ms of its 2 ms then; the remaining 1.2 ms run alone
    assert phase_ms(2.0, 0.5, 0.8, 0.5) == pytest.approx(2.2)
    assert phase_ms(0.0, 0.7, 0.8, 0.5) == pytest.approx(0.7)


@pytest.mark.parametrize("beside", ["qkv", "mlp"])
@pytest.mark.parametrize("ops", [sp.OPS, sp.DISJOINT_OPS], ids=["model-table", "disjoint-attention"])
def test_phases_follow_the_executor_waits(ops, beside: str) -> None:
    """No stream-0 op of a phase waits for the stream-1 op beside it (it could not run beside it),
    and every op instance of the layer is in exactly one phase."""
    model = CostModel(sp.profile(0.75, 0.85, ops=ops))
    got = phases(model.ops, beside)
    seen = [x for ph in got for x in ph.stream0] + [ph.stream1 for ph in got if ph.stream1]
    assert sorted(seen) == sorted((n, p) for n in sp.NAMES for p in (0, 1))
    layers = _stub_layers(ops)
    ex = PipelineExecutor(Candidate(1024, 44, beside).schedule(sp.NAMES, 1025, 2048), layers, torch.device("cpu"))
    index = {(i.layer, i.step.op, i.step.part): k for k, i in enumerate(ex.instances)}
    for ph in got:
        if ph.stream1 is None:
            continue
        beside = index[(1, *ph.stream1)]
        for op, part in ph.stream0:
            assert beside not in ex.waits[index[(1, op, part)]], f"{op}[{part}] waits for {ph.stream1}"


def test_disjoint_attention_overlaps_what_nanoflow_overlaps() -> None:
    """With decode and prefill attention writing their own rows, nano-batch 0's decode attention
    runs beside nano-batch 1's norm/qkv/rope, and nano-batch 1's beside nano-batch 0's FFN."""
    got = phases(CostModel(sp.profile(0.75, 0.85)).ops, "qkv")
    beside = {ph.stream1: [op for op, _ in ph.stream0] for ph in got if ph.stream1}
    assert beside[("decode_attention", 0)] == ["prefill_attention", "input_norm", "qkv", "rope_kv_write"]
    assert beside[("decode_attention", 1)] == ["prefill_attention", "o", "post_attention_norm", "gate_up", "act",
                                               "down"]


def test_mlp_order_puts_decode_attention_beside_the_other_mlp() -> None:
    """beside="mlp": nano-batch 0's decode attention overlaps nano-batch 1's o and FFN (and nano-batch
    0's own prefill attention), the work a decode-heavy step has most of."""
    got = phases(CostModel(sp.profile(0.75, 0.85)).ops, "mlp")
    beside = {ph.stream1: [(op, part) for op, part in ph.stream0] for ph in got if ph.stream1}
    assert beside[("decode_attention", 0)] == [
        ("prefill_attention", 1), ("o", 1), ("post_attention_norm", 1), ("gate_up", 1), ("act", 1), ("down", 1),
        ("prefill_attention", 0)]


def test_a_schedule_on_one_stream_keeps_its_steps_in_order() -> None:
    """The output check's reference (tune.profile.StepForwards.error): the same kernels, caps and issue
    order, all on the forward's stream, and still a valid order for the executor."""
    from nanoflow.pipeline.schedule import pingpong_schedule

    two = pingpong_schedule(sp.NAMES, 1024, 384, 513, decode_ctas=44)
    one = two.on_one_stream()
    assert two.num_streams == 2 and one.num_streams == 1
    assert [(s.op, s.part, s.num_ctas) for s in one.steps] == [(s.op, s.part, s.num_ctas) for s in two.steps]
    assert one.partitions == two.partitions and one.min_tokens == two.min_tokens
    PipelineExecutor(one, _stub_layers(sp.OPS), torch.device("cpu"))


def test_execution_units_round_trip_and_check(tmp_path) -> None:
    """Schedule.units (per stream, the SMs of its green context) survive the JSON, must name every
    stream, and leave the CPU's in-order run as it is."""
    from nanoflow.pipeline.schedule import pingpong_schedule, sequential_schedule, unit_sms

    assert unit_sms(66, 132) == (64, 64) and unit_sms(44, 132) == (88, 40)
    two = dataclasses.replace(pingpong_schedule(sp.NAMES, 1024, 384, 513, decode_ctas=44), units=(88, 40))
    pipe = Pipeline((sequential_schedule(sp.NAMES, 512), two), {"gpu": "synthetic"})
    data = json.loads(json.dumps(pipe.to_json()))
    assert "units" not in data["schedules"][0] and data["schedules"][1]["units"] == [88, 40]
    assert Pipeline.from_json(data).schedules == pipe.schedules
    with pytest.raises(ValueError, match="one positive SM count per stream"):
        dataclasses.replace(two, units=(88,)).check(sp.NAMES)
    ex = PipelineExecutor(two, _stub_layers(sp.OPS), torch.device("cpu"))
    assert ex.units == [] and ex.unit_streams == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU may give green contexts")
def test_execution_units_without_green_contexts_fail_clearly() -> None:
    from nanoflow.pipeline.executor import green_context

    with pytest.raises(RuntimeError, match="execution units need a CUDA green context of 40 SMs"):
        green_context(40, torch.device("cuda", 0))
