"""Timing that a search can trust: kernel time, not launch time, and concurrency that really overlaps.

On a GPU one timed call is captured into a CUDA graph and its replays are timed with CUDA events
(median of repeats after warm-up, as `triton.testing.do_bench_cudagraph` does): single small
kernels launched from Python would measure the host's launch rate, not the GPU. Where a call
cannot be captured (MoE routing syncs with the host) it is timed eagerly with events. On the CPU
the wall clock times it.

`Timer.side_by_side` runs two functions on two streams released together by a gate: a spin kernel
on the current stream holds both streams back while the host enqueues their work, so neither
starts ahead because the host was slow, and the first function's kernels reach the GPU first (the
memory kernel launched first is the order that overlaps, gpu-facts.md). Each function runs once
before the gate, so that Triton compiles and first allocations (host-slow, and a cudaMalloc or
cudaFree can sync) never land inside it. Each side's calls are captured into one CUDA graph, so the
host enqueues one launch per stream under the gate: enqueued eagerly, hundreds of calls of a small
op take the host longer than the GPU needs to run them, and no gate length would fit. A side that
cannot be captured (it syncs with the host) is enqueued eagerly; if the host still outruns the gate
it is lengthened within that call only, up to a cap, then the pair is measured anyway with one
warning per Timer: a gate that stayed grown would make every later pair spin the GPU that long, and
grow it further.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

_CYCLES_PER_MS = 2_000_000  # torch.cuda._sleep spins clock cycles; ~2 GHz is an H100/H200's top clock
_LAG_CYCLES = 20_000  # ~10 us that the second stream waits so the first one's CTAs are resident first
_GATE_CAP_MS = 1_000.0  # a gate past this spins the GPU longer than the pair it guards is worth
_GATE_TRIES = 4  # gated runs per pair, the gate lengthened before each retry


@dataclass
class Timer:
    device: torch.device
    warmup: int = 3
    repeats: int = 10
    graphs: bool = True  # capture calls into CUDA graphs (False: MoE, whose routing syncs with the host)
    gate_ms: float = 30.0  # side_by_side's first gate for each pair; lengthened within that pair only
    _warned: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kind(self) -> str:
        if not self.on_gpu:
            return "perf_counter"
        return "cuda-graph replay, CUDA events" if self.graphs else "CUDA events (eager)"

    def ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of one call of fn."""
        if not self.on_gpu:
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(self.repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        call = fn
        graph = self.capture(fn, 1) if self.graphs else None
        if graph is not None:
            call = graph.replay
        for _ in range(self.warmup):
            call()
        pairs = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        del graph, call  # the graph's memory pool goes back before the next capture
        return statistics.median(s.elapsed_time(e) for s, e in pairs)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        """A warning the first time, debug after: one cause repeats for every op or pair of a run."""
        log.log(logging.DEBUG if key in self._warned else logging.WARNING, msg, *args)
        self._warned.add(key)

    def capture(self, fn: Callable[[], object], reps: int) -> torch.cuda.CUDAGraph | None:
        """A graph of reps calls of fn, or None where fn cannot be captured (fn has then run, warm)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first calls compile kernels and fill the allocator, off the capture
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
        except RuntimeError as e:
            self._warn_once("capture", "tune: a timed call could not be captured in a CUDA graph (%s); timing "
                            "it eagerly, launch gaps included", str(e).splitlines()[0][:200])
            torch.cuda.synchronize(self.device)
            return None
        return graph

    def side_by_side(self, first: Callable[[], object] | None, reps_first: int,
                     second: Callable[[], object] | None, reps_second: int) -> tuple[float, float]:
        """Runs first() reps_first times on one stream and second() reps_second times on another,
        released together; returns each stream's elapsed ms (0 for an absent function). Either
        alone gives that function's time alone, measured the same way."""
        return self.side_by_side_runs(first, reps_first, second, reps_second, 1)[0]

    def side_by_side_runs(self, first: Callable[[], object] | None, reps_first: int,
                          second: Callable[[], object] | None, reps_second: int,
                          runs: int) -> list[tuple[float, float]]:
        """side_by_side `runs` times over one capture of each side (capturing costs more than the
        runs it times)."""
        if not self.on_gpu:
            raise RuntimeError("side_by_side needs a CUDA device")
        dev = self.device
        streams = (torch.cuda.Stream(dev), torch.cuda.Stream(dev))
        sides: list[Callable[[], object] | None] = []
        try:
            for stream, fn, reps in zip(streams, (first, second), (reps_first, reps_second), strict=True):
                sides.append(self._side(fn, reps, stream))
            torch.cuda.synchronize(dev)
            return [self._released_together(sides, streams) for _ in range(runs)]
        finally:
            torch.cuda.synchronize(dev)
            sides.clear()  # the graphs' memory pools go back before the next pair captures

    def _released_together(self, sides: list[Callable[[], object] | None],
                           streams: tuple[torch.cuda.Stream, torch.cuda.Stream]) -> tuple[float, float]:
        """One gated run of both sides, the gate lengthened while the host outruns it."""
        gate_ms = min(self.gate_ms, _GATE_CAP_MS)
        for attempt in range(_GATE_TRIES):
            got, host_ms, held_ms = self._gated(sides, streams, gate_ms)
            if host_ms <= 0.9 * held_ms:
                return got
            if gate_ms >= _GATE_CAP_MS or attempt == _GATE_TRIES - 1:
                break
            # long enough for the enqueue just seen, with room; a host that syncs inside a side
            # keeps outrunning any gate, so the cap, not the retries, bounds the spinning
            gate_ms = min(_GATE_CAP_MS, max(2 * gate_ms, 1.5 * host_ms))
        self._warn_once("gate", "tune: the host enqueued a pair slower than a %.0f ms gate (%.0f ms); its "
                        "streams may not have started together (warned once)", gate_ms, host_ms)
        return got

    def _side(self, fn: Callable[[], object] | None, reps: int,
              stream: torch.cuda.Stream) -> Callable[[], object] | None:
        """What the host enqueues for one side under the gate, fn already run outside it."""
        if fn is None or reps <= 0:
            return None
        graph = self.capture(fn, reps) if self.graphs else None
        main = torch.cuda.current_stream(self.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            if graph is not None:
                graph.replay()  # the first launch uploads the graph: host time kept off the gated one
            else:
                fn()  # on its own stream: the caching allocator keeps blocks per stream
        main.wait_stream(stream)
        if graph is not None:
            return graph.replay

        def eager() -> None:
            for _ in range(reps):
                fn()

        return eager

    def _gated(self, sides: list[Callable[[], object] | None], streams: tuple[torch.cuda.Stream, torch.cuda.Stream],
               gate_ms: float) -> tuple[tuple[float, float], float, float]:
        """Each stream's elapsed ms, the host's enqueue ms and the ms the gate held the streams."""
        dev = self.device
        main = torch.cuda.current_stream(dev)
        torch.cuda.synchronize(dev)
        opened, gate = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        opened.record(main)
        torch.cuda._sleep(int(gate_ms * _CYCLES_PER_MS))
        gate.record(main)
        marks = []
        t_host = time.perf_counter()
        for i, (stream, side) in enumerate(zip(streams, sides, strict=True)):
            stream.wait_event(gate)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                if i == 1 and sides[0] is not None:
                    torch.cuda._sleep(_LAG_CYCLES)
                start.record(stream)
                if side is not None:
                    side()
                end.record(stream)
            marks.append((start, end))
        host_ms = (time.perf_counter() - t_host) * 1e3
        for s in streams:
            main.wait_stream(s)
        torch.cuda.synchronize(dev)
        (s0, e0), (s1, e1) = marks
        return (s0.elapsed_time(e0), s1.elapsed_time(e1)), host_ms, opened.elapsed_time(gate)


def kept_fractions(alone_a: float, reps_a: int, alone_b: float, reps_b: int,
                   together_a: float, together_b: float) -> tuple[float, float]:
    """The fraction of its own speed each of two functions kept while both ran, from their time alone
    (per call) and each stream's elapsed time together. The stream that finished later ran its
    tail alone at full speed; that tail is taken off its work before dividing by the overlap."""
    work_a, work_b = alone_a * reps_a, alone_b * reps_b
    overlap = min(together_a, together_b)
    if overlap <= 0:
        return 1.0, 1.0
    if together_a <= together_b:
        kept_a, kept_b = work_a / overlap, (work_b - (together_b - together_a)) / overlap
    else:
        kept_a, kept_b = (work_a - (together_a - together_b)) / overlap, work_b / overlap
    clamp = lambda x: min(1.5, max(0.02, x))
    return clamp(kept_a), clamp(kept_b)


def graph_replay_error(fn: Callable[[], torch.Tensor], want: torch.Tensor, replays: int = 3) -> float:
    """The largest relative error (norm of the difference over want's norm) of fn's output over
    `replays` CUDA-graph replays of fn, as the timer runs it; fn must be warm. Why replays, not one
    eager call: a kernel that skips work only when it races the other stream (the gated decode kernel
    of 2026-11-30 left the second of two concurrent launches undone) shows in the timed replays and
    may not in an eager call. A call that cannot be captured is checked once, eagerly."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError:
        return relative_error(fn(), want)
    errors = []
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        errors.append(relative_error(out, want))
    del graph
    return max(errors)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The norm of got - want over want's norm, in float32 (NaN where either holds one)."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
