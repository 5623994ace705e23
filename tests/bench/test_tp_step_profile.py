"""benchmarks/tp_step_profile.py: kernels grouped by name, and the sweep that says how long each
group ran, ran alone, and how long the GPU idled (the GPU run is issue 13's diagnostic)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import benchmark_module

REPO = Path(__file__).resolve().parents[2]


def _module():
    return benchmark_module("tp_step_profile")


def test_kernel_groups() -> None:
    group = _module().kernel_group
    assert group("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "network"
    assert group("two_shot_all_reduce_kernel<bf16>") == "network"
    assert group("decode_all_heads_kernel") == "attention"
    assert group("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert group("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert group("_persistent_linear_kernel") == "gemm"
    assert group("_rms_norm_kernel") == "other"


def test_overlap_summary_over_two_steps() -> None:
    summary = _module().overlap_summary
    # per step (µs): a GEMM 0-100, attention 50-150 beside it, an all-reduce 160-200, idle 150-160
    step = [("gemm", 0, 100), ("attention", 50, 150), ("network", 160, 200)]
    kernels = step + [(g, a + 200, b + 200) for g, a, b in step]
    s = summary(kernels, steps=2)
    assert s["step_ms"] == pytest.approx(0.2)
    assert s["idle_ms"] == pytest.approx(0.01)
    assert s["busy_ms"] == pytest.approx({"gemm": 0.1, "attention": 0.1, "network": 0.04})
    assert s["alone_ms"] == pytest.approx({"gemm": 0.05, "attention": 0.05, "network": 0.04})
    assert summary([], steps=1)["step_ms"] == 0.0


def test_top_kernels_per_step() -> None:
    kernels = [("gemm", 0, 100, "nvjet_a"), ("network", 100, 130, "nccl_b"), ("gemm", 200, 300, "nvjet_a"),
               ("network", 300, 310, "nccl_b")]
    rows = _module().top_kernels(kernels, steps=2)
    assert [(r["kernel"], r["group"], r["launches_per_step"]) for r in rows] == [("nvjet_a", "gemm", 1.0),
                                                                               ("nccl_b", "network", 1.0)]
    assert rows[0]["ms_per_step"] == pytest.approx(0.1) and rows[1]["mean_us"] == pytest.approx(20)


def test_trace_kernels_reads_the_profilers_trace(tmp_path: Path) -> None:
    events = [{"cat": "kernel", "name": "nvjet_x", "ts": 10.0, "dur": 5.0},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 1.0},
              {"cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": 20.0, "dur": 2.0}]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert _module().trace_kernels(path) == [("gemm", 10.0, 15.0, "nvjet_x"),
                                             ("network", 20.0, 22.0, "ncclDevKernel_AllReduce")]


def test_runs_end_to_end_on_two_cpu_ranks(tiny_model, tmp_path: Path) -> None:
    """The whole script with 2 gloo ranks on a tiny checkpoint: its engine arguments, plans and
    output hold (the CPU has no kernels to report, so the numbers are zeros)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "tp_step_profile.py"), "--model", tiny_model("llama"),
                    "--tp", "2", "--dtype", "float32", "--tokens", "16,32", "--context", "8", "--repeats", "1",
                    "--out", str(out)], check=True, timeout=300)
    data = json.loads((out / "tp_step_profile.json").read_text())
    assert set(data["steps"]) == {"16", "32"} and data["settings"]["tp"] == 2
    assert (out / "trace_16.json.gz").is_file()
