"""The GPU timing paths, run against a stand-in for torch.cuda on a fake clock (no GPU here): graph
capture then replays, the eager fallback when a call cannot be captured, and the gate of
side_by_side, which is lengthened when the host enqueues slower than it holds the streams."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from nanoflow.tune import timing
from nanoflow.tune.timing import Timer, kept_fractions


class _Clock:
    now = 0.0  # ms of fake GPU time


class _Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t: float | None = None

    def record(self, stream: object = None) -> None:
        self.t = _Clock.now

    def elapsed_time(self, other: _Event) -> float:
        assert self.t is not None and other.t is not None
        return other.t - self.t


class _Stream:
    def __init__(self, device: object = None) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass


class _Graph:
    def __init__(self) -> None:
        self.ms = 0.0

    def replay(self) -> None:
        _Clock.now += self.ms


@contextlib.contextmanager
def _graph(g: _Graph):
    t = _Clock.now
    yield
    g.ms = _Clock.now - t


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = types.SimpleNamespace(
        Event=_Event, Stream=_Stream, CUDAGraph=_Graph, graph=_graph, synchronize=lambda device=None: None,
        current_stream=lambda device=None: _Stream(), stream=lambda s: contextlib.nullcontext(),
        _sleep=lambda cycles: setattr(_Clock, "now", _Clock.now + cycles / timing._CYCLES_PER_MS))
    monkeypatch.setattr(timing.torch, "cuda", fake)
    _Clock.now = 0.0
    return fake


def _work(ms: float):
    def fn() -> None:
        _Clock.now += ms

    return fn


def test_graph_replays_are_timed(fake_cuda) -> None:
    timer = Timer(torch.device("cuda"), warmup=2, repeats=5)
    assert timer.ms(_work(0.25)) == pytest.approx(0.25)
    assert "graph" in timer.kind


def test_a_call_that_cannot_be_captured_is_timed_eagerly(fake_cuda, monkeypatch) -> None:
    @contextlib.contextmanager
    def refuse(g):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(fake_cuda, "graph", refuse)
    assert Timer(torch.device("cuda"), warmup=1, repeats=3).ms(_work(0.5)) == pytest.approx(0.5)


def test_side_by_side_lengthens_a_gate_the_host_outran(fake_cuda, monkeypatch) -> None:
    timer = Timer(torch.device("cuda"))
    a, b = timer.side_by_side(_work(1.0), 3, _work(2.0), 2)
    # the fake runs the streams one after the other: each stream's own elapsed time is its work
    assert (a, b) == pytest.approx((3.0, 4.0)) and timer.gate_ms == 30.0
    assert timer.side_by_side(_work(1.0), 2, None, 0) == pytest.approx((2.0, 0.0))

    host = iter(range(0, 10**6, 100))  # every perf_counter reading 100 s after the last: a slow host
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(host))
    timer.side_by_side(_work(1.0), 1, _work(1.0), 1)
    assert timer.gate_ms == 30.0 * 2**4  # lengthened four times, then measured anyway


def test_kept_fractions() -> None:
    # both streams did 2 ms of work alone and ran 4 ms side by side: each kept half its speed
    assert kept_fractions(1.0, 2, 1.0, 2, 4.0, 4.0) == pytest.approx((0.5, 0.5))
    # a finished at 2 ms, unharmed; b then ran its last 1 ms alone, so it did 1 ms of work in 2 ms
    assert kept_fractions(1.0, 2, 1.0, 2, 2.0, 3.0) == pytest.approx((1.0, 0.5))
    assert kept_fractions(0.5, 4, 2.0, 1, 3.0, 2.5) == pytest.approx((1.5 / 2.5, 0.8))
