"""The pipeline in the bench, on the CPU: `--compare nanoflow-sequential` (the same engine with the
pipeline off, the gain as a ratio from one run) and `--timeline` (one layer's ops per stream over
time, from a real forward), and the timeline pieces on their own."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import layer_op_names, pipeline_for, step_plan

from nanoflow.bench import report
from nanoflow.bench.pipeline_info import representative_step, shaped_step_plan
from nanoflow.cli import main
from nanoflow.config import PAGE_SIZE, EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.model_runner import ModelRunner
from nanoflow.pipeline.schedule import Schedule
from nanoflow.pipeline.timeline import plot_timeline, record_timeline

BUDGET = 64
CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-pages", "64", "--no-tqdm", "--peak-seconds", "0.05"]


def _check_records(records: list[dict], schedule: Schedule, layer: int) -> None:
    """Every op of the layer once per nano-batch of its partition, on the stream the schedule gives it."""
    want = {(st.op, st.part): st for st in schedule.steps}
    got = Counter((r["op"], r["nano_batch"]) for r in records)
    assert got == Counter(want.keys())
    for r in records:
        st = want[r["op"], r["nano_batch"]]
        assert (r["layer"], r["stream"], r["partition"], r["num_ctas"]) == (layer, st.stream, st.partition,
                                                                          st.num_ctas)
        assert r["resource"] in ("compute", "memory") and 0 <= r["start_ms"] <= r["end_ms"]
    assert min(r["start_ms"] for r in records) == 0
    # the CPU runs the issue order one op after another
    assert [(r["op"], r["nano_batch"]) for r in records] == [(st.op, st.part) for st in schedule.steps]


@pytest.fixture(scope="module")
def pipeline_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "pipeline.json"
    pipeline_for("llama", BUDGET).save(path)
    return path


def test_compare_nanoflow_sequential_with_a_timeline(bench_tiny_llama: str, pipeline_json: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", "32x8", "--num-requests", "6",
               "--num-warmup", "1", "--compare", "nanoflow-sequential", "--pipeline", str(pipeline_json),
               "--max-num-batched-tokens", str(BUDGET), "--timeline", "--output-dir", str(tmp_path), *CPU_ARGS])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(next(tmp_path.glob("bench_*[0-9].json")).read_text())
    assert list(result["systems"]) == ["nanoflow", "nanoflow-sequential"]
    piped, seq = result["systems"]["nanoflow"], result["systems"]["nanoflow-sequential"]
    for s in (piped, seq):
        assert s["status"] == "ok" and s["output_tokens"] == 6 * 8 and s["output_len_mismatches"] == 0
    assert piped["engine_config"]["pipeline"] == str(pipeline_json) and seq["engine_config"]["pipeline"] == "off"
    assert seq["options"] == {"enforce_eager": False, "pipeline": "off"} and seq["pipeline"] == "sequential"
    schedules = pipeline_for("llama", BUDGET).schedules
    assert piped["pipeline"] == [{"min_tokens": s.min_tokens, "max_tokens": s.max_tokens, "num_streams": 2,
                                  "partitions": {k: list(v) for k, v in s.partitions.items()},
                                  "predicted_ms": None, "decode_ctas": [8], "units": []} for s in schedules]
    ratio = piped["total_tokens_per_s"] / seq["total_tokens_per_s"]
    assert result["speedups"] == {"nanoflow/nanoflow-sequential": pytest.approx(ratio)}
    assert "speedup: nanoflow/nanoflow-sequential" in out and "pipeline (nanoflow-sequential): sequential" in out
    assert ("pipeline (nanoflow): 2-9 tokens (2 dense nano-batches split at 1, 2 attn nano-batches split at 1, "
            "2 streams, decode attention on 8 SMs)") in out
    md = report.markdown_table([result])
    assert "vs nanoflow-sequential" in md and f"| {ratio:.2f}x |" in md

    # the timeline: the nanoflow run only, one step of the run's heaviest shape, through its schedule
    tl = piped["timeline"]
    assert "timeline" not in seq and "error" not in tl, tl.get("traceback")
    assert tl["step"]["tokens"] == BUDGET == tl["step"]["decodes"] + sum(tl["step"]["prefill_chunks"])
    assert tl["schedule"]["max_tokens"] == BUDGET and tl["layer"] == 1
    _check_records(tl["records"], schedules[-1], layer=1)
    png = Path(result["files"]["timeline_png"])
    assert png == Path(tl["png"]) and png.name.endswith("_timeline.png") and png.stat().st_size > 5000


def _runner(model: str, pipeline: str) -> ModelRunner:
    return ModelRunner(EngineConfig.from_args(EngineArgs(model, device="cpu", dtype="float32", num_kv_pages=64,
                                                         max_model_len=256, max_num_batched_tokens=BUDGET,
                                                         pipeline=pipeline)))


def test_record_timeline_pipelined_and_sequential(bench_tiny_llama: str, pipeline_json: Path,
                                                  tmp_path: Path) -> None:
    plan = step_plan([20, 5, 40, 9], [(16, 17), (0, 9), (3, 20)])  # 50 tokens: the third schedule (pingpong)
    runner = _runner(bench_tiny_llama, str(pipeline_json))
    records = record_timeline(runner, plan, layer=0)
    _check_records(records, runner.executor_for(50).schedule, layer=0)
    assert {r["tokens"] for r in records if r["partition"] == "dense"} == {30, 50 - 30}
    plot_timeline(records, str(tmp_path / "piped.png"), "pipelined")
    assert (tmp_path / "piped.png").stat().st_size > 5000

    runner = _runner(bench_tiny_llama, "off")
    records = record_timeline(runner, plan, layer=1)
    ops = [op.name for op in runner.model.layer_ops[1]]
    assert [r["op"] for r in records] == ops and {(r["stream"], r["nano_batch"], r["tokens"]) for r in records} == {
        (0, 0, 50)}
    with pytest.raises(ValueError, match="layer 2 is not one of the model's 2 layers"):
        record_timeline(runner, plan, layer=2)


def test_shaped_step_fits_the_pool() -> None:
    plan = shaped_step_plan(2048, 400, 1500, num_pages=100_000, max_model_len=8192, vocab_size=1000)
    assert (plan.num_decodes, sum(map(len, plan.token_ids))) == (400, 2048)
    assert plan.seq_lens[:400] == [1500] * 400 and plan.starts[400:] == [0]
    pages = [p for t in plan.tables for p in t]
    assert len(pages) == len(set(pages)) and all(len(t) * PAGE_SIZE >= n for t, n in zip(plan.tables, plan.seq_lens,
                                                                                       strict=True))
    # a small pool: the decodes get shorter, then fewer; long prefills are cut at max_model_len
    small = shaped_step_plan(512, 40, 1000, num_pages=64, max_model_len=256, vocab_size=300)
    assert sum(map(len, small.token_ids)) == 512 and sum(map(len, small.tables)) <= 64
    assert all(len(t) <= 256 for t in small.token_ids) and 0 < small.num_decodes <= 40
    assert max(max(t) for t in small.token_ids) < 300
    with pytest.raises(ValueError, match="does not fit"):
        shaped_step_plan(2048, 0, 1, num_pages=10, max_model_len=4096, vocab_size=300)


def test_representative_step() -> None:
    timeline = {"tokens": [512, 2048, 2048, 2040, 900], "decodes": [0, 300, 400, 500, 900],
                "decode_context_tokens": [0, 300 * 600, 400 * 700, 500 * 800, 900 * 1000]}
    assert representative_step(timeline, 2048, 1024, 99) == (2048, 400, 700)  # by step count: the full ones
    assert representative_step(timeline, 2048, 350, 99) == (2048, 350, 700)
    # by GPU time: the one 900-decode step outweighs the three full ones
    assert representative_step({**timeline, "gpu_busy_ms": [5, 50, 50, 50, 200]}, 2048, 1024, 99) == (900, 900, 1000)
    assert representative_step(None, 2048, 1024, 99) == (2048, 1024, 99)


def test_a_failing_timeline_keeps_the_run(bench_tiny_llama: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import nanoflow.bench.pipeline_info as info

    def boom(*args, **kwargs):
        raise ImportError("no matplotlib (simulated)")

    monkeypatch.setattr(info, "plot_timeline", boom)
    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))  # --pipeline auto finds no tuned pipeline
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", "8x4", "--num-requests", "2", "--num-warmup", "1",
               "--timeline", "--no-plot", "--output-dir", str(tmp_path), *CPU_ARGS])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("bench_*.json")).read_text())
    tl = result["systems"]["nanoflow"]["timeline"]
    assert result["systems"]["nanoflow"]["status"] == "ok" and "simulated" in tl["error"] and tl["png"] is None
    # the sequential schedule: every op once
    assert tl["schedule"] == "sequential" and [r["op"] for r in tl["records"]] == layer_op_names("llama")
    assert "timeline_png" not in result["files"] and not list(tmp_path.glob("*.png"))
    assert "nanoflow timeline failed: ImportError: no matplotlib (simulated)" in capsys.readouterr().out
