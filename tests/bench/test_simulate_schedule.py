"""benchmarks/simulate_schedule.py: the CPU replay reproduces a run's steps and prices them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import benchmark_module

REPO = Path(__file__).resolve().parents[2]


def _module():
    return benchmark_module("simulate_schedule")


def test_fit_recovers_a_linear_step_cost(tmp_path: Path) -> None:
    sim = _module()
    tokens, kv = [2048, 300, 900, 1500, 64], [100_000, 300_000, 50_000, 400_000, 10_000]
    ms = [4 + 0.02 * t + 5e-5 * c for t, c in zip(tokens, kv, strict=True)]
    timeline = {"tokens": tokens, "decode_context_tokens": kv, "gpu_busy_ms": ms}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"systems": {"nanoflow": {"step_timeline": timeline}, "hf": {}}}))
    a, b, c = sim.fit([str(path)], "nanoflow")
    assert (a, b, c) == pytest.approx((4, 0.02, 5e-5), rel=1e-6)
    result = {"systems": {"nanoflow": {"step_timeline": timeline, "input_tokens": 3000, "output_tokens": 1812,
                                       "num_preemptions": 0}}}
    pred = sim.predict(result, (a, b, c))
    assert pred["steps"] == 5 and pred["gpu_seconds"] == pytest.approx(sum(ms) / 1e3)
    assert pred["total_tokens_per_s"] == pytest.approx(4812 / (sum(ms) / 1e3))


def test_replay_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """A tiny GPU-like run: the CPU replay must take exactly its steps (the scheduler sees lengths only)."""
    sim = _module()
    from nanoflow.cli import main as nanoflow_main

    sim.tiny_model(str(tmp_path / "tiny"), 256)
    out = tmp_path / "gpu"
    assert nanoflow_main(["bench", "--model", str(tmp_path / "tiny"), "--workload", "24x12", "--num-requests", "6",
                          "--device", "cpu", "--dtype", "float32", "--num-kv-pages", "8",
                          "--max-num-batched-tokens", "64", "--output-dir", str(out), "--no-plot", "--no-tqdm",
                          "--peak-seconds", "0.05", "--num-warmup", "1"]) == 0
    (gpu_json,) = out.glob("bench_*.json")
    result = json.loads(gpu_json.read_text())
    steps = len(result["systems"]["nanoflow"]["step_timeline"]["tokens"])
    # CPU runs have no GPU time: give the steps a cost so the fit is defined
    tl = result["systems"]["nanoflow"]["step_timeline"]
    tl["gpu_busy_ms"] = [1 + 0.01 * t + 1e-4 * c + 0.001 * i for i, (t, c) in
                         enumerate(zip(tl["tokens"], tl["decode_context_tokens"], strict=True))]
    gpu_json.write_text(json.dumps(result))
    monkeypatch.setattr(sys, "argv", ["simulate_schedule.py", "--fit", str(gpu_json), "--workload", "24x12",
                                      "--num-requests", "6"])
    sim.main()
    assert f": {steps} steps, predicted" in capsys.readouterr().out
