"""The GPU timing paths, run against a stand-in for torch.cuda on a fake clock (no GPU here): graph
capture then replays, the eager fallback when a call cannot be captured, and the gate of
side_by_side: what runs before it and what under it, and how far it is lengthened when the host
enqueues slower than it holds the streams."""

from __future__ import annotations

import contextlib
import logging
import types

import pytest
import torch

from nanoflow.tune import timing
from nanoflow.tune.timing import Timer, kept_fractions


class _Clock:
    now = 0.0  # ms of fake GPU time
    log: list[tuple] = []  # what the host did, in order: ("call", name), ("replay", names), ("sleep", ms), ("sync",)


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
        self.calls: tuple[str, ...] = ()  # the names of the calls captured

    def replay(self) -> None:
        _Clock.now += self.ms
        _Clock.log.append(("replay", self.calls))


@contextlib.contextmanager
def _graph(g: _Graph):
    t, n = _Clock.now, len(_Clock.log)
    yield
    g.ms = _Clock.now - t
    g.calls = tuple(e[1] for e in _Clock.log[n:] if e[0] == "call")
    del _Clock.log[n:]  # captured, not run


def _sleep(cycles: int) -> None:
    ms = cycles / timing._CYCLES_PER_MS
    _Clock.now += ms
    _Clock.log.append(("sleep", ms))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = types.SimpleNamespace(
        Event=_Event, Stream=_Stream, CUDAGraph=_Graph, graph=_graph,
        synchronize=lambda device=None: _Clock.log.append(("sync",)),
        current_stream=lambda device=None: _Stream(), stream=lambda s: contextlib.nullcontext(), _sleep=_sleep)
    monkeypatch.setattr(timing.torch, "cuda", fake)
    _Clock.now, _Clock.log = 0.0, []
    return fake


def _work(ms: float, name: str = "fn"):
    def fn() -> None:
        _Clock.now += ms
        _Clock.log.append(("call", name))

    return fn


@contextlib.contextmanager
def _refuse(g):
    raise RuntimeError("operation not permitted when stream is capturing")
    yield


def _gates() -> list[float]:
    """The gate of each gated run, in ms (the second stream's lag is a far shorter sleep)."""
    return [e[1] for e in _Clock.log if e[0] == "sleep" and e[1] > 1.0]


def _slow_host(monkeypatch, ms: float) -> None:
    """Every perf_counter reading `ms` after the last: the host takes that long to enqueue a pair."""
    host = iter(range(0, 10**9))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(host) * ms / 1e3)


def _gate_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "gate" in r.getMessage()]


def test_graph_replays_are_timed(fake_cuda) -> None:
    timer = Timer(torch.device("cuda"), warmup=2, repeats=5)
    assert timer.ms(_work(0.25)) == pytest.approx(0.25)
    assert "graph" in timer.kind


def test_a_call_that_cannot_be_captured_is_timed_eagerly(fake_cuda, monkeypatch) -> None:
    monkeypatch.setattr(fake_cuda, "graph", _refuse)
    assert Timer(torch.device("cuda"), warmup=1, repeats=3).ms(_work(0.5)) == pytest.approx(0.5)


def test_side_by_side_times_each_stream(fake_cuda) -> None:
    timer = Timer(torch.device("cuda"))
    a, b = timer.side_by_side(_work(1.0), 3, _work(2.0), 2)
    # the fake runs the streams one after the other: each stream's own elapsed time is its work
    assert (a, b) == pytest.approx((3.0, 4.0))
    assert timer.side_by_side(_work(1.0), 2, None, 0) == pytest.approx((2.0, 0.0))
    assert _gates() == [30.0, 30.0] and timer.gate_ms == 30.0


def test_side_by_side_warms_then_replays_one_graph_per_stream_under_the_gate(fake_cuda) -> None:
    Timer(torch.device("cuda")).side_by_side(_work(1.0, "a"), 3, _work(2.0, "b"), 2)
    log = _Clock.log
    gate = log.index(("sleep", 30.0))
    before, under = log[:gate], log[gate + 1:]
    # both ran, and each graph was launched once, before the gate; the device synced after them
    assert ("call", "a") in before and ("call", "b") in before
    assert before.index(("replay", ("a",) * 3)) < before.index(("replay", ("b",) * 2))
    assert before[-1] == ("sync",)
    # under the gate: one launch per stream, the first's ahead, the second's behind its lag
    lag = timing._LAG_CYCLES / timing._CYCLES_PER_MS
    assert [e for e in under if e != ("sync",)] == [("replay", ("a",) * 3), ("sleep", lag), ("replay", ("b",) * 2)]


@pytest.mark.parametrize("graphs", [True, False])
def test_side_by_side_enqueues_eagerly_without_a_graph(fake_cuda, monkeypatch, caplog, graphs) -> None:
    monkeypatch.setattr(fake_cuda, "graph", _refuse)
    timer = Timer(torch.device("cuda"), graphs=graphs)
    with caplog.at_level(logging.WARNING, logger=timing.__name__):
        assert timer.side_by_side(_work(1.0, "a"), 3, _work(2.0, "b"), 2) == pytest.approx((3.0, 4.0))
        log = _Clock.log
        gate = log.index(("sleep", 30.0))
        before, under = log[:gate], log[gate + 1:]
        assert ("call", "a") in before and ("call", "b") in before and before[-1] == ("sync",)
        assert not any(e[0] == "replay" for e in log)
        lag = timing._LAG_CYCLES / timing._CYCLES_PER_MS
        assert [e for e in under if e != ("sync",)] == [("call", "a")] * 3 + [("sleep", lag)] + [("call", "b")] * 2
        timer.side_by_side(_work(1.0, "a"), 1, None, 0)
    refused = [r for r in caplog.records if "captured" in r.getMessage()]
    assert len(refused) == (1 if graphs else 0)  # once per Timer, not once per side or pair


def test_a_gate_the_host_outran_is_lengthened_for_that_pair_only(fake_cuda, monkeypatch, caplog) -> None:
    _slow_host(monkeypatch, 40.0)  # slower than 0.9 x 30 ms, faster than 0.9 x 60 ms
    timer = Timer(torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger=timing.__name__):
        timer.side_by_side(_work(1.0), 1, _work(1.0), 1)
        assert _gates() == [30.0, 60.0]
        timer.side_by_side(_work(1.0), 1, _work(1.0), 1)
    assert _gates() == [30.0, 60.0, 30.0, 60.0] and timer.gate_ms == 30.0  # each pair starts afresh
    assert not _gate_warnings(caplog)  # the longer gate held


def test_a_gate_is_capped_and_a_host_that_outruns_it_is_warned_of_once(fake_cuda, monkeypatch, caplog) -> None:
    _slow_host(monkeypatch, 100_000.0)  # a host that never keeps up (as one that syncs inside a side)
    timer = Timer(torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger=timing.__name__):
        for _ in range(3):
            a, b = timer.side_by_side(_work(1.0), 3, _work(2.0), 2)
            assert (a, b) == pytest.approx((3.0, 4.0))  # measured anyway
    # straight to the cap, then measured: not doubled on past it, nor rerun once more
    assert _gates() == [30.0, timing._GATE_CAP_MS] * 3 and timer.gate_ms == 30.0
    assert len(_gate_warnings(caplog)) == 1


def test_retries_are_bounded_below_the_cap(fake_cuda, monkeypatch) -> None:
    readings = iter(range(10**6))  # the host takes 1.2x whatever gate it is given: every retry fails

    def perf_counter() -> float:
        i = next(readings)
        return i // 2 + (1.2 * _gates()[-1] / 1e3 if i % 2 else 0.0)

    monkeypatch.setattr(timing.time, "perf_counter", perf_counter)
    timer = Timer(torch.device("cuda"), gate_ms=10.0)
    assert timer.side_by_side(_work(1.0), 1, None, 0) == pytest.approx((1.0, 0.0))
    assert _gates() == [10.0, 20.0, 40.0, 80.0] and timing._GATE_TRIES == 4  # then measured with the last


def test_kept_fractions() -> None:
    # both streams did 2 ms of work alone and ran 4 ms side by side: each kept half its speed
    assert kept_fractions(1.0, 2, 1.0, 2, 4.0, 4.0) == pytest.approx((0.5, 0.5))
    # a finished at 2 ms, unharmed; b then ran its last 1 ms alone, so it did 1 ms of work in 2 ms
    assert kept_fractions(1.0, 2, 1.0, 2, 2.0, 3.0) == pytest.approx((1.0, 0.5))
    assert kept_fractions(0.5, 4, 2.0, 1, 3.0, 2.5) == pytest.approx((1.5 / 2.5, 0.8))
