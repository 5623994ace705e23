"""Timing that a search can trust: kernel time, not launch time, and concurrency that really overlaps.

On a GPU one timed call is captured into a CUDA graph and its replays are timed with CUDA events
(median of repeats after warm-up, as `triton.testing.do_bench_cudagraph` does): single small
kernels launched from Python would measure the host's launch rate, not the GPU. Where a call
cannot be captured (MoE routing syncs with the host) it is timed eagerly with events. On the CPU
the wall clock times it.

`Timer.side_by_side` runs two functions on two streams released together by a gate: a spin kernel
on the current stream holds both streams back while the host enqueues all their work, so neither
starts ahead because the host was slow, and the first function's kernels reach the GPU first (the
memory kernel launched first is the order that overlaps, gpu-facts.md).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_CYCLES_PER_MS = 2_000_000  # torch.cuda._sleep spins clock cycles; ~2 GHz is an H100/H200's top clock
_LAG_CYCLES = 20_000  # ~10 us that the second stream waits so the first one's CTAs are resident first


@dataclass
class Timer:
    device: torch.device
    warmup: int = 3
    repeats: int = 10
    graphs: bool = True  # capture calls into CUDA graphs (False: MoE, whose routing syncs with the host)
    gate_ms: float = 30.0  # how long side_by_side holds both streams back (doubled when the host is slower)

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
        graph = self._capture(fn) if self.graphs else None
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

    def _capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph | None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first calls compile kernels and fill the allocator, off the capture
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except RuntimeError as e:
            log.warning("tune: a timed call could not be captured in a CUDA graph (%s); timing it eagerly, "
                        "launch gaps included", str(e).splitlines()[0][:200])
            torch.cuda.synchronize(self.device)
            return None
        return graph

    def side_by_side(self, first: Callable[[], object] | None, reps_first: int,
                     second: Callable[[], object] | None, reps_second: int) -> tuple[float, float]:
        """Runs first() reps_first times on one stream and second() reps_second times on another,
        released together; returns each stream's elapsed ms (0 for an absent function). Either
        alone gives that function's time alone, measured the same way."""
        if not self.on_gpu:
            raise RuntimeError("side_by_side needs a CUDA device")
        for _ in range(4):
            got = self._gated(first, reps_first, second, reps_second)
            if got is not None:
                return got
            self.gate_ms *= 2  # the host took longer to enqueue than the gate held the streams
        log.warning("tune: the host enqueued a pair slower than a %.0f ms gate; its streams may not have "
                    "started together", self.gate_ms)
        return self._gated(first, reps_first, second, reps_second, force=True)  # type: ignore[return-value]

    def _gated(self, first: Callable[[], object] | None, reps_first: int, second: Callable[[], object] | None,
               reps_second: int, force: bool = False) -> tuple[float, float] | None:
        dev = self.device
        main = torch.cuda.current_stream(dev)
        streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
        torch.cuda.synchronize(dev)
        opened, gate = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        opened.record(main)
        torch.cuda._sleep(int(self.gate_ms * _CYCLES_PER_MS))
        gate.record(main)
        elapsed = []
        t_host = time.perf_counter()
        for i, (fn, reps) in enumerate(((first, reps_first), (second, reps_second))):
            stream = streams[i]
            stream.wait_event(gate)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                if i == 1 and first is not None:
                    torch.cuda._sleep(_LAG_CYCLES)
                start.record(stream)
                for _ in range(reps if fn is not None else 0):
                    fn()
                end.record(stream)
            elapsed.append((start, end))
        host_ms = (time.perf_counter() - t_host) * 1e3
        for s in streams:
            main.wait_stream(s)
        torch.cuda.synchronize(dev)
        if host_ms > 0.9 * opened.elapsed_time(gate) and not force:
            return None
        return elapsed[0][0].elapsed_time(elapsed[0][1]), elapsed[1][0].elapsed_time(elapsed[1][1])


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
