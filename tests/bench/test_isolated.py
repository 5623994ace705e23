"""A bench system in a process of its own (nanoflow/bench/isolated.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nanoflow.bench.isolated import run_isolated


def test_the_child_returns_its_result() -> None:
    assert run_isolated(dict, {"tok/s": 1.5}) == {"tok/s": 1.5}


def test_the_child_error_reaches_the_parent() -> None:
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        run_isolated(int, "x")


def test_a_child_that_dies_silently_is_named() -> None:
    with pytest.raises(RuntimeError, match="exited with code 3"):
        run_isolated(os._exit, 3)


def test_tensor_parallel_systems_each_in_their_own_process(tmp_path: Path, tiny_dummy) -> None:
    """Two tensor-parallel systems in one bench (2 gloo ranks each): both run, and rank 0's engine
    lived in a child (the bench's own process never joined a process group)."""
    import torch.distributed as dist

    from nanoflow.cli import main

    tiny_dummy("llama3-8b")
    rc = main(["bench", "--dummy", "llama3-8b", "--workload", "16x8", "--num-requests", "3", "--num-warmup", "1",
               "-tp", "2", "--compare", "nanoflow-sequential", "--output-dir", str(tmp_path), "--no-plot",
               "--device", "cpu", "--dtype", "float32", "--num-kv-pages", "64", "--no-tqdm", "--peak-seconds", "0.05"])
    assert rc == 0
    (path,) = tmp_path.glob("bench_*.json")
    systems = json.loads(path.read_text())["systems"]
    assert [s["status"] for s in systems.values()] == ["ok", "ok"]
    assert all(s["output_tokens"] == 3 * 8 for s in systems.values())
    assert not dist.is_initialized()
