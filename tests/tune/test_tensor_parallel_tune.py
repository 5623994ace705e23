"""`nanoflow tune` under tensor parallelism: network overlap kept per bucket only where its measured
graphs beat the sequential ones of the same run; the whole measurement (fresh processes, 2 gloo
ranks each) on the CPU, where replay times are not measured and so nothing may win."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import layer_op_names

from nanoflow.cli import build_parser
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.cuda_graph import token_buckets
from nanoflow.pipeline.schedule import GEMM_OPS, NETWORK_OPS, Pipeline
from nanoflow.tune.tensor_parallel import (
    NETWORK,
    PINGPONG,
    Run,
    TPCandidate,
    bucket_ranges,
    candidate,
    choose,
    choose_cap,
    split_for,
    step_total_ms,
    tune_tensor_parallel,
    tuned_pipeline,
)

NAMES = layer_op_names("llama", tp=True)


def _run(times: dict[int, tuple[float, float | None]]) -> Run:
    """bucket -> (sequential ms, pipelined ms or None), as the mixed graph; the decode-only graph
    of each bucket takes half of it."""
    table = {}
    for b, (seq, piped) in times.items():
        for mixed, scale in ((True, 1.0), (False, 0.5)):
            table[(b, mixed, False)] = seq * scale
            if piped is not None:
                table[(b, mixed, True)] = piped * scale
    return Run(table, NAMES, sorted(times), 0.0)


def test_ranges_and_splits():
    assert bucket_ranges([1, 256, 320, 512, 2048], 256, 256) == [(257, 320), (321, 512), (513, 2048)]
    # the engine's graphs every 1/16 of an octave above 512: ranges end at multiples of the step there
    assert bucket_ranges(token_buckets(2048), 256, 256) == [
        (257, 320), (321, 384), (385, 448), (449, 512), (513, 768), (769, 1024), (1025, 1280), (1281, 1536),
        (1537, 1792), (1793, 2048)]
    assert split_for(1793, 2048, 0.5) == 1024
    assert split_for(257, 320, 0.5) == 160
    assert split_for(1025, 2048, 0.25) == 512
    assert split_for(513, 2048, 0.5) is None  # a 513-token batch would leave the second nano-batch empty
    assert split_for(17, 24, 0.5) is None  # 12 rows round down to 0


def test_candidate_covers_the_ranges_it_can_split():
    ranges = [(257, 320), (449, 512), (513, 2048), (1793, 2048)]
    p = candidate(NAMES, ranges, TPCandidate(), {"tp": 2})
    p.check(NAMES)
    assert [(s.min_tokens, s.max_tokens, s.partitions["dense"]) for s in p.schedules] == [
        (257, 320, (0, 160, 320)), (449, 512, (0, 256, 512)), (1793, 2048, (0, 1024, 2048))]
    for s in p.schedules:  # every all-reduce on the second stream, nothing else
        assert {st.op for st in s.steps if st.stream == 1} == set(NETWORK_OPS)
    # ping-pong: the nano-batches' compute on streams 0 and 1, the all-reduces on 2, decode capped
    pp = candidate(NAMES, ranges, TPCandidate(PINGPONG, 0.5, 66), {"tp": 2})
    pp.check(NAMES)
    assert len(pp.schedules) == 3 and all(s.num_streams == 3 for s in pp.schedules)
    for c, built in ((TPCandidate(), p), (TPCandidate(PINGPONG, 0.5, 66), pp)):  # what --tp-units specs must list
        assert {s.num_streams for s in built.schedules} == {c.num_streams}
    assert {st.num_ctas for s in pp.schedules for st in s.steps if st.op == "decode_attention"} == {66}
    assert TPCandidate(PINGPONG, 0.5, 66).label == "pingpong 0.5 decode@66" and TPCandidate().label == "network 0.5"
    # GEMMs capped: every GEMM as cuBLAS sized for the SMs given, nothing else changed
    for kind, cap in ((PINGPONG, 66), (NETWORK, None)):
        plain, capped = (candidate(NAMES, ranges, TPCandidate(kind, 0.5, cap, gemm), {"tp": 2}) for gemm in (None, 116))
        for a, b in zip(plain.schedules, capped.schedules, strict=True):
            assert [(st.num_ctas, st.cublas) for st in b.steps if st.op in GEMM_OPS] == [(116, True)] * 8
            assert [st for st in a.steps if st.op not in GEMM_OPS] == [st for st in b.steps if st.op not in GEMM_OPS]
    assert TPCandidate(PINGPONG, 0.5, 66, 66).label == "pingpong 0.5 decode@66 gemm@66"
    # execution units: each stream on its own SMs (nano-batch 0 / 1 / network), the steps unchanged
    units = candidate(NAMES, ranges, TPCandidate(PINGPONG, 0.5, 66, units=(56, 56, 16)), {"tp": 2})
    units.check(NAMES)
    assert all(s.units == (56, 56, 16) for s in units.schedules)
    assert [s.steps for s in units.schedules] == [s.steps for s in pp.schedules]
    assert TPCandidate(NETWORK, 0.5, units=(120, 8)).label == "network 0.5 units@120/8"


def test_choose_keeps_only_measured_wins():
    baseline = _run({256: (10, None), 512: (20, None), 1024: (40, None), 2048: (80, None)})
    ranges = bucket_ranges(baseline.buckets, 256, 256)
    half = _run({256: (10, None), 512: (20, 21), 1024: (40, 39.9), 2048: (80, 70)})
    quarter = _run({256: (10, None), 512: (20, 19), 1024: (41, 38), 2048: (80, 76)})
    choices = choose(baseline, {TPCandidate(fraction=0.5): half, TPCandidate(fraction=0.25): quarter}, ranges,
                     min_gain=0.01)
    by_bucket = {c.max_tokens: c for c in choices}
    assert by_bucket[512].split == 128  # the quarter split won; the half split lost
    assert by_bucket[1024].split == 256  # 38 vs its own run's 41: judged against the run beside it
    assert by_bucket[2048].split == 1024 and by_bucket[2048].gain == pytest.approx(80 / 70)
    assert by_bucket[512].sequential_ms == pytest.approx(30)  # mixed + decode-only of the baseline
    # a gain under min_gain keeps the sequential schedule
    assert choose(baseline, {TPCandidate(): half}, ranges, min_gain=0.2)[-1].split is None
    pipeline = tuned_pipeline(NAMES, choices, {"tp": 2})
    pipeline.check(NAMES)
    assert [(s.min_tokens, s.max_tokens) for s in pipeline.schedules] == [(257, 512), (513, 1024), (1025, 2048)]


def test_a_candidate_whose_steps_compute_something_else_is_refused():
    baseline = _run({256: (10, None), 512: (20, None), 1024: (40, None)})
    ranges = bucket_ranges(baseline.buckets, 256, 256)
    fast = dataclasses.replace(_run({256: (10, None), 512: (20, 15), 1024: (40, 30)}),
                               step_error={(512, False): 1e-3, (1024, False): 0.7, (1024, True): 1e-3})
    honest = _run({256: (10, None), 512: (20, 19), 1024: (40, 38)})
    choices = choose(baseline, {TPCandidate(fraction=0.5): fast, TPCandidate(fraction=0.25): honest}, ranges,
                     min_gain=0.01)
    by_bucket = {c.max_tokens: c for c in choices}
    assert by_bucket[512].chosen == TPCandidate(fraction=0.5)  # right there: the fastest stays
    assert by_bucket[1024].chosen == TPCandidate(fraction=0.25)  # off by 0.7 at 1,024: the next is kept
    assert by_bucket[1024].refused == {TPCandidate(fraction=0.5): 0.7}
    assert by_bucket[1024].to_json()["refused"] == {"network 0.5": 0.7}


def test_step_error_runs_a_pipelined_step_both_ways_on_every_rank(tiny_model, tmp_path):
    """step_error on 2 gloo ranks: the step through its pipelined graph, then through the sequential
    one (StepPlan.sequential, which the worker follows too), in fp32 on the CPU the same logits."""
    from helpers import pipeline_for, tp_step_error

    from nanoflow.executor.isolated import run_isolated

    pipeline_for("llama", 64, tp=True).save(tmp_path / "p.json")
    cfg = EngineConfig.from_args(EngineArgs(model=tiny_model("llama"), max_model_len=256, max_num_batched_tokens=64,
                                            num_kv_pages=256, tensor_parallel_size=2, skip_tokenizer_init=True,
                                            pipeline=str(tmp_path / "p.json")))
    cfg = dataclasses.replace(cfg, enforce_eager=False, cuda_graph_max_tokens=64)
    piped, plain = run_isolated(tp_step_error, cfg, 48, name="step_error test")
    assert piped is not None and piped < 1e-5
    assert plain is None  # a 1-token step takes no pipelined graph: nothing to check


def test_nccl_cap_by_the_step_total(tmp_path):
    """A cap acts on every bucket: judged by all buckets' graphs summed, less what kept splits save;
    kept only if it beats the engine's own by min_gain; carried by the pipeline JSON."""
    ranges = [(257, 512), (513, 1024)]
    own = _run({256: (10, None), 512: (20, 19), 1024: (40, 36)})
    choices = choose(own, {TPCandidate(): own}, ranges, min_gain=0.01)
    # 10 + 20 + 40 (x1.5: the decode-only graphs) less the two splits' savings (1 and 4, x1.5)
    assert step_total_ms(own, choices) == pytest.approx(1.5 * (70 - 1 - 4))
    assert choose_cap({None: 100.0, 8: 95.0, 16: 99.5}, None, 0.01) == 8
    assert choose_cap({None: 100.0, 8: 99.5}, None, 0.01) is None  # under min_gain: NCCL's own stays
    assert choose_cap({4: 100.0, None: 90.0}, 4, 0.01) is None  # the engine's own cap is just a candidate
    pipeline = tuned_pipeline(NAMES, choices, {"tp": 2}, nccl_max_ctas=8)
    pipeline.save(tmp_path / "p.json")
    assert Pipeline.load(tmp_path / "p.json").nccl_max_ctas == 8
    assert "nccl_max_ctas" not in tuned_pipeline(NAMES, choices, {"tp": 2}).to_json()


def test_tune_on_two_gloo_ranks_measures_and_keeps_sequential(tiny_model):
    """The whole search on the CPU: a sequential run and a candidate run, each a fresh process with
    its own worker. CPU replay times are the bucket sizes (nothing is timed), so no candidate wins."""
    path = tiny_model("llama")
    cfg = EngineConfig.from_args(EngineArgs(model=path, max_model_len=256, max_num_batched_tokens=64,
                                            num_kv_pages=256, tensor_parallel_size=2, skip_tokenizer_init=True))
    cfg = dataclasses.replace(cfg, enforce_eager=False, cuda_graph_max_tokens=64)  # the GPU's graph path
    t = tune_tensor_parallel(cfg, {"test": "tp2"}, (TPCandidate(), TPCandidate(PINGPONG, 0.5, 4)), min_tokens=16)
    assert t.baseline.op_names == NAMES and not t.baseline.step_ms  # real steps: on a GPU only
    assert [(c.min_tokens, c.max_tokens) for c in t.choices] == [(17, 24), (25, 32), (33, 48), (49, 64)]
    assert all(c.split is None for c in t.choices) and [len(c.tried) for c in t.choices] == [0, 2, 2, 2]
    for run in t.runs.values():  # pipelined graphs were built, for both kinds
        assert any(p for (_, _, p) in run.replay_ms)
    assert t.pipeline.schedules == ()


def test_real_steps_judge_against_the_sequential_runs_steps():
    """With real steps timed (a GPU), a candidate's steps are judged against the sequential run's
    same steps (its own run holds no sequential steps of the buckets it covers), and the step total
    that picks the NCCL cap is theirs."""
    ranges = [(257, 512), (513, 1024)]
    baseline = dataclasses.replace(_run({256: (10, None), 512: (20, None), 1024: (40, None)}),
                                   step_ms={(512, True): 30.0, (512, False): 25.0, (1024, True): 60.0})
    pp = dataclasses.replace(_run({256: (10, None), 512: (20, 21), 1024: (40, 45)}),
                             step_ms={(512, True): 28.0, (512, False): 22.0, (1024, True): 50.0})
    cand = TPCandidate(PINGPONG, 0.5, 66)
    choices = choose(baseline, {cand: pp}, ranges, min_gain=0.01)
    # its graphs replay slower with nothing to attend to, its real steps run faster: the steps decide
    assert [c.chosen for c in choices] == [cand, cand]
    assert choices[0].gain == pytest.approx(55 / 50) and choices[1].gain == pytest.approx(60 / 50)
    assert step_total_ms(baseline, choices) == pytest.approx(115 - 5 - 10)
    pipeline = tuned_pipeline(NAMES, choices, {"tp": 2})
    pipeline.check(NAMES)
    assert all(s.num_streams == 3 for s in pipeline.schedules)


def test_real_steps_start_each_run_with_the_bucket_tops_graphs_only(tiny_model, monkeypatch):
    """Judged by real steps (context_len, a GPU), each start captures only the graphs at the buckets'
    tops, where the steps are timed; the ranges are still the engine's buckets."""
    from nanoflow.tune import tensor_parallel as tp

    cfg = EngineConfig.from_args(EngineArgs(model=tiny_model("llama"), max_model_len=256, max_num_batched_tokens=64,
                                            num_kv_pages=256, tensor_parallel_size=2, skip_tokenizer_init=True))
    cfg = dataclasses.replace(cfg, enforce_eager=False, cuda_graph_max_tokens=64)
    seen = []

    def fake_measure(config, pipeline, workdir, context_len, sizes):
        seen.append((config.cuda_graph_sizes, context_len, list(sizes)))
        return dataclasses.replace(_run({b: (float(b), float(b)) for b in sizes}),
                                   step_ms={(b, m): float(b) for b in sizes for m in (True, False)})

    monkeypatch.setattr(tp, "measure", fake_measure)
    t = tune_tensor_parallel(cfg, {"test": "tp2"}, (TPCandidate(),), min_tokens=16, context_len=1024)
    tops = [24, 32, 48, 64]
    assert [(c.min_tokens, c.max_tokens) for c in t.choices] == [(17, 24), (25, 32), (33, 48), (49, 64)]
    assert seen == [(tuple(tops), 1024, tops)] * 2  # the sequential run and the candidate's


def test_cli_refuses_a_profile_under_tensor_parallelism(tiny_model):
    args = build_parser().parse_args(["tune", "--model", tiny_model("llama"), "--device", "cpu",
                                      "--tensor-parallel-size", "2", "--profile-only"])
    with pytest.raises(ValueError, match="measures whole iterations"):
        args.func(args)
    args = build_parser().parse_args(["tune", "--model", tiny_model("llama"), "--device", "cpu",
                                      "--tensor-parallel-size", "2"])
    with pytest.raises(ValueError, match="needs the GPU fast path with graphs"):
        args.func(args)
