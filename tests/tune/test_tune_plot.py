"""The tune's chart, drawn from a search report shaped like a GPU tune's."""

from __future__ import annotations

from pathlib import Path

from nanoflow.tune.plot import plot_search


def test_the_chart_draws_the_measured_buckets(tmp_path: Path) -> None:
    report = {
        "measured_candidates_ms": {"320": {"sequential": 18.2, "ping-pong split at 160": 15.5, "qkv order": 22.6},
                                   "2048": {"sequential": 61.8, "ping-pong split at 1024": 58.0}},
        "measured_ms": {"320": 15.5, "2048": 58.0},
        "measured_workload": {"budget_decodes": 512, "budget": 2048},
    }
    path = tmp_path / "tune.png"
    assert plot_search(report, str(path), "nanoflow tune: test") and path.stat().st_size > 10_000
    # a bucket that kept the sequential schedule is drawn without a pipeline point
    report["measured_ms"] = {"2048": 58.0}
    assert plot_search(report, str(tmp_path / "kept_one.png"), "t")


def test_nothing_to_draw_without_a_measured_check(tmp_path: Path) -> None:
    # the CPU's check times the chosen schedules only; --no-verify times nothing
    assert not plot_search({"measured_candidates_ms": {"16": {"2 nano-batches": 1.0}}}, str(tmp_path / "a.png"), "t")
    assert not plot_search({}, str(tmp_path / "b.png"), "t")
    assert not list(tmp_path.iterdir())


def test_the_tensor_parallel_report_draws_the_same_way(tmp_path: Path) -> None:
    from nanoflow.tune.plot import plot_tensor_parallel
    from nanoflow.tune.tensor_parallel import PINGPONG, BucketChoice, TPCandidate

    pp, net = TPCandidate(PINGPONG, 0.5, 66), TPCandidate()
    choices = [BucketChoice(257, 512, 45.0, {pp: (256, 50.0, 55.0), net: (256, 57.0, 55.0)}, pp),
               BucketChoice(513, 1024, 90.0, {pp: (512, 99.0, 95.0)}, None)]  # kept sequential
    report = {"buckets": [c.to_json() for c in choices], "sequential_step_ms": {"512 mixed": 30.0}}
    assert plot_tensor_parallel(report, str(tmp_path / "tp.png"), "tp2")
    assert (tmp_path / "tp.png").stat().st_size > 10_000
    assert not plot_tensor_parallel({"buckets": []}, str(tmp_path / "none.png"), "tp2")
