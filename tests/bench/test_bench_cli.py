"""End-to-end `nanoflow bench` on the CPU with a tiny checkpoint: every system, JSON, PNG, markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoflow.bench import report
from nanoflow.bench.throughput import parse_compare
from nanoflow.cli import main, parse_args

REPO = Path(__file__).resolve().parents[2]
CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-pages", "64", "--no-tqdm",
            "--peak-seconds", "0.05"]


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_parser_knows_the_options() -> None:
    args = parse_args(["bench", "--dummy", "llama3-8b", "--workload", "trace:x.csv", "--compare", "hf,sequential",
                       "--num-requests", "7", "--max-num-seqs", "64"])
    assert (args.dummy, args.workload, args.compare, args.num_requests, args.max_num_seqs) == (
        "llama3-8b", "trace:x.csv", "hf,sequential", 7, 64)
    assert args.output_dir == "bench-results" and args.hf_max_batch is None
    assert (args.hf_num_requests, args.hf_max_seconds) == (None, 60.0)
    args = parse_args(["bench", "--hf-num-requests", "64", "--hf-max-seconds", "0"])
    assert (args.hf_num_requests, args.hf_max_seconds) == (64, 0.0)
    assert parse_compare("hf,hf-mean,sequential,hf") == ["hf", "hf-mean", "sequential"]
    assert parse_compare("nanoflow-sequential,sequential") == ["nanoflow-sequential", "sequential"]
    assert not args.timeline and parse_args(["bench", "--timeline"]).timeline
    with pytest.raises(ValueError, match="--compare accepts"):
        parse_compare("hf,median")


def test_cli_end_to_end(bench_tiny_llama: str, tmp_path: Path) -> None:
    """The real entry point in a fresh interpreter, as the GPU script runs it."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "nanoflow.cli", "bench", "--model", bench_tiny_llama, "--workload", "32x16",
           "--num-requests", "8", "--compare", "hf,sequential", "--output-dir", str(out), *CPU_ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "total tok/s" in proc.stdout and "speedup: nanoflow/hf" in proc.stdout

    result = json.loads(_only(out, "bench_bench-tiny-llama*_32x16_CPU-*.json").read_text())
    assert _only(out, "*[0-9].png").stat().st_size > 5000
    assert _only(out, "*_steps.png").stat().st_size > 5000  # the per-step timeline of the nanoflow run
    assert result["schema"] == "nanoflow-bench/1"
    assert list(result["systems"]) == ["nanoflow", "hf", "sequential"]
    assert set(result["speedups"]) == {"nanoflow/hf", "nanoflow/sequential"}
    assert result["peak"]["kind"] == "cpu-small" and result["optimum_tokens_per_s"] > 0
    assert result["model"]["num_parameters"] == result["model"]["active_parameters"] > 0
    assert result["workload"]["num_requests"] == 8 and result["workload"]["num_skipped_too_long"] == 0
    assert result["settings"]["dtype_resolved"] == "float32" and result["environment"]["torch"]
    for name, s in result["systems"].items():
        assert s["status"] == "ok", (name, s)
        assert s["num_requests"] == 8 and s["output_tokens"] == 8 * 16 and s["input_tokens"] == 8 * 32
        assert s["output_len_mismatches"] == 0
        tokens = s["input_tokens"] + s["output_tokens"]
        assert s["total_tokens_per_s"] == pytest.approx(tokens / s["elapsed_s"])
        assert 0 < s["fraction_of_optimum"]
        if name != "hf":  # the timed run's wall-clock window, where a GPU's power samples would lie
            assert s["window"][1] - s["window"][0] == pytest.approx(s["elapsed_s"], abs=1e-3)
            assert "power" not in s  # nothing sampled on the CPU
            assert set(s["gc"]) == {"0", "1", "2"}  # the collector's pauses during the timed run
    for name in ("nanoflow", "sequential"):
        s = result["systems"][name]
        assert s["kv_pool"] == {"pages": 64, "tokens": 1024, "page_bytes": s["kv_pool"]["page_bytes"],
                                "gib": pytest.approx(64 * s["kv_pool"]["page_bytes"] / 2**30)}
        assert s["num_preemptions"] == 0 and s["warmup"]["num_requests"] == 8
        timeline = s["step_timeline"]
        assert sum(timeline["tokens"]) == 8 * (32 + 16 - 1)  # the last token is sampled, never fed back
        assert len(timeline["tokens"]) == s["step_stats"]["steps"] and max(timeline["tokens"]) <= 512
        # the host's side of each step: time to queue it, time waiting for its result
        assert all(t > 0 for t in timeline["host_launch_ms"]) and all(t >= 0 for t in timeline["host_wait_ms"])
        assert timeline["host_graph_launch_ms"] == [0.0] * len(timeline["tokens"])  # no graph launched on the CPU
        assert s["sync_calls"] == {"count": 0, "sites": {}} and s["gc_heap"]["end"]["tracked"] > 0
        assert s["allocator"] == {}  # the CUDA allocator's driver calls: none off a GPU
    assert result["systems"]["sequential"]["options"] == {"enforce_eager": True, "pipeline": "off"}
    # fp32 on the CPU, both eager: the same greedy tokens, request by request
    assert all(len(h) == report.OUTPUT_HEAD for h in result["systems"]["nanoflow"]["output_heads"])
    assert result["agreement"] == {"sequential": {"requests": 8, "first_token": 1.0, "first_tokens": 1.0,
                                                  "by_position": [1.0] * 8}}
    assert "outputs: sequential starts as nanoflow in 100.0% of 8 requests (first token), 100.0% (first 8)" \
        in proc.stdout
    hf = result["systems"]["hf"]
    assert (hf["batch_sizes"], hf["shape"], hf["padding_efficiency"]) == ([8], "requests", 1)
    assert hf["padded_tokens"] == 8 * (32 + 16) and "hf: 1 batch of up to 8, 100% of the computed" in proc.stdout

    md = report.markdown_table([result])
    assert md.count("\n") == 1 + 3 and "| bench_tiny_llama" in md


def test_trace_run_in_process(bench_tiny_llama: str, trace_csv: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", f"trace:{trace_csv}",
               "--output-dir", str(out), "--no-plot", "--num-warmup", "2", *CPU_ARGS])
    assert rc == 0
    result = json.loads(_only(out, "bench_*_trace-trace_*.json").read_text())
    w = result["workload"]
    counts = (w["num_rows"], w["num_requests"], w["num_skipped_too_long"], w["num_skipped_invalid"])
    assert counts == (6, 4, 1, 1)
    s = result["systems"]["nanoflow"]
    assert s["output_tokens"] == 8 + 30 + 100 + 1 and s["input_tokens"] == 40 + 12 + 100 + 7
    assert s["warmup"]["num_requests"] == 2 and result["speedups"] == {} and result["files"]["png"] is None
    assert "skipped 1 over max_model_len=256, 1 empty" in capsys.readouterr().out


def test_fp8_kv_system(bench_tiny_llama: str, tmp_path: Path) -> None:
    """--compare nanoflow-fp8: the same engine with the KV cache in fp8, on the same requests."""
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", "16x8", "--num-requests", "4", "--compare",
               "nanoflow-fp8", "--output-dir", str(tmp_path), "--no-plot", "--num-warmup", "1", *CPU_ARGS])
    assert rc == 0
    result = json.loads(_only(tmp_path, "bench_*.json").read_text())
    fp8, base = result["systems"]["nanoflow-fp8"], result["systems"]["nanoflow"]
    assert fp8["engine_config"]["kv_cache_dtype"] == "fp8" and base["engine_config"]["kv_cache_dtype"] == "auto"
    assert fp8["kv_pool"]["page_bytes"] * 4 == base["kv_pool"]["page_bytes"]  # fp32 model on the CPU
    assert fp8["output_tokens"] == 4 * 8 and fp8["output_len_mismatches"] == 0
    assert result["speedups"] == {}


def test_a_failing_system_keeps_the_others(bench_tiny_llama: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import nanoflow.bench.hf_baseline as hf

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(hf, "run_hf_baseline", boom)
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", "16x4", "--num-requests", "3",
               "--compare", "hf", "--output-dir", str(tmp_path), *CPU_ARGS])
    assert rc == 1
    result = json.loads(_only(tmp_path, "*.json").read_text())
    assert result["systems"]["nanoflow"]["status"] == "ok"
    assert result["systems"]["hf"]["status"] == "error" and "simulated" in result["systems"]["hf"]["error"]
    assert result["speedups"] == {}
    assert _only(tmp_path, "*[0-9].png").is_file()  # the chart shows what did finish
    assert "hf failed: RuntimeError" in report.format_table(result)


@pytest.mark.parametrize("argv, message", [
    (["--compare", "vllm"], "--compare accepts"),
    (["--workload", "512"], "--workload must be"),
    (["--dtype", "int8"], "--dtype must be"),
])
def test_bad_arguments(bench_tiny_llama: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       argv: list[str], message: str) -> None:
    rc = main(["bench", "--model", bench_tiny_llama, "--output-dir", str(tmp_path), "--device", "cpu", *argv])
    assert rc == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --model or --dummy the bench runs the built-in model (tests/test_fast_start.py); a
    model folder that does not exist is a clear error."""
    assert main(["bench", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_module_plots_and_tabulates(bench_tiny_llama: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--model", bench_tiny_llama, "--workload", "8x4", "--num-requests", "2", "--no-plot",
               "--output-dir", str(tmp_path), *CPU_ARGS])
    assert rc == 0
    path = _only(tmp_path, "*.json")
    capsys.readouterr()
    assert report.main([str(path), str(path), "--plot"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| model | workload |") and md.count("| nanoflow |") == 2
    assert path.with_suffix(".png").is_file()


def test_dummy_path_with_a_shrunken_config(tmp_path: Path, tiny_dummy) -> None:
    """--dummy: config.json written, random weights in the engine (load_format=dummy) and in HF."""
    tiny_dummy("llama3-8b")  # the config folder goes under the temp dir
    out = tmp_path / "out"
    rc = main(["bench", "--dummy", "llama3-8b", "--workload", "100x40", "--num-requests", "3",
               "--compare", "hf", "--output-dir", str(out), "--no-plot", *CPU_ARGS])
    assert rc == 0
    result = json.loads(_only(out, "bench_llama3-8b_100x40_*.json").read_text())
    assert result["model"]["load_format"] == "dummy" and result["model"]["vocab_size"] == 300
    assert result["model"]["path"].startswith(str(tmp_path))
    assert all(s["status"] == "ok" for s in result["systems"].values())


def test_expert_parallel_dummy_mixtral(tmp_path: Path, tiny_dummy) -> None:
    """--enable-expert-parallel reaches the engine (2 gloo ranks, each with 4 of the 8 random experts
    whole) and the JSON's engine_config."""
    tiny_dummy("mixtral-8x7b")
    rc = main(["bench", "--dummy", "mixtral-8x7b", "--workload", "16x8", "--num-requests", "3", "--num-warmup", "1",
               "-tp", "2", "--enable-expert-parallel", "--output-dir", str(tmp_path), "--no-plot", *CPU_ARGS])
    assert rc == 0
    s = json.loads(_only(tmp_path, "bench_*.json").read_text())["systems"]["nanoflow"]
    assert s["status"] == "ok" and s["output_tokens"] == 3 * 8
    assert s["engine_config"]["enable_expert_parallel"] is True and s["engine_config"]["tensor_parallel_size"] == 2


def test_triton_compiles_are_collected_and_the_hook_restored() -> None:
    from triton import knobs

    from nanoflow.bench.throughput import triton_compiles

    before = knobs.runtime.jit_post_compile_hook
    with triton_compiles() as found:
        knobs.runtime.jit_post_compile_hook(key=None, repr="_decode_kernel[num_warps=8](...)", fn=None,
                                            compile={}, is_manual_warmup=False, already_compiled=False)
    assert found == ["_decode_kernel[num_warps=8](...)"]
    assert knobs.runtime.jit_post_compile_hook is before


def test_tensor_parallel_systems_each_in_their_own_process(tmp_path: Path, tiny_dummy,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Two tensor-parallel systems in one bench (2 gloo ranks each): both run, and rank 0's engine
    lived in a child (the bench's own process never joined a process group). No pipeline is tuned
    for the model, so the bench says the comparison is of the sequential schedule with itself."""
    import torch.distributed as dist

    tiny_dummy("llama3-8b")
    rc = main(["bench", "--dummy", "llama3-8b", "--workload", "16x8", "--num-requests", "3", "--num-warmup", "1",
               "-tp", "2", "--compare", "nanoflow-sequential", "--output-dir", str(tmp_path), "--no-plot",
               *CPU_ARGS])
    assert rc == 0
    (path,) = tmp_path.glob("bench_*.json")
    systems = json.loads(path.read_text())["systems"]
    assert [s["status"] for s in systems.values()] == ["ok", "ok"]
    assert all(s["output_tokens"] == 3 * 8 for s in systems.values())
    assert not dist.is_initialized()
    out = capsys.readouterr().out
    note = "so nanoflow/nanoflow-sequential compares the schedule with itself"
    # said before the second system starts, and again under the table
    assert out.count(note) == 2 and out.index(note) < out.index("[bench] nanoflow-sequential: running")


def test_output_agreement_counts_requests_both_runs_completed() -> None:
    heads = [[1, 2, 3], [4, 5, 6], None, [7, 8, 9]]
    systems = {"nanoflow": {"output_heads": heads},
               "nanoflow-sequential": {"output_heads": [[1, 2, 3], [4, 0, 0], [1, 1, 1], [0, 8, 9]]},
               "hf": {"status": "ok"}}  # keeps no output tokens: not compared
    got = report.output_agreement(systems)
    assert got == {"nanoflow-sequential": {"requests": 3, "first_token": 2 / 3, "first_tokens": 1 / 3,
                                           "by_position": [2 / 3, 1 / 3, 1 / 3]}}
    # half of the requests alike at the first token part at the second: not rounding
    assert "computes something else" in report.agreement_line("nanoflow-sequential", got["nanoflow-sequential"])


def test_rounding_parts_runs_a_few_requests_a_token() -> None:
    """What the H200 showed for ping-pong against sequential on random weights: ~10% a token."""
    rounding = {"requests": 1000, "first_token": 0.948, "first_tokens": 0.405,
                "by_position": [0.948, 0.844, 0.749, 0.668, 0.590, 0.522, 0.466, 0.405]}
    line = report.agreement_line("nanoflow-sequential", rounding)
    assert "as rounding does" in line and "computes something else" not in line
    skipped = {**rounding, "first_tokens": 0.1, "by_position": [0.948, 0.2, 0.15, 0.1]}  # work undone from token 2
    assert "computes something else" in report.agreement_line("nanoflow-sequential", skipped)
    assert "part" not in report.agreement_line("x", {**rounding, "first_tokens": 0.9})
