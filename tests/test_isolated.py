"""A function in a process of its own (nanoflow/executor/isolated.py)."""

from __future__ import annotations

import os

import pytest

from nanoflow.executor.isolated import run_isolated


def test_the_child_returns_its_result() -> None:
    assert run_isolated(dict, {"tok/s": 1.5}) == {"tok/s": 1.5}


def test_the_child_error_reaches_the_parent() -> None:
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        run_isolated(int, "x")


def test_a_child_that_dies_silently_is_named() -> None:
    with pytest.raises(RuntimeError, match="exited with code 3"):
        run_isolated(os._exit, 3)
