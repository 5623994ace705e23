"""Python's garbage collector over a timed run: how many collections of each generation, and how
long the host spent in them.

A collection stops the host; if it outlasts the step the GPU is running, the GPU idles. The engine
freezes the heap alive at its start and again once its graphs are captured
(`executor.model_runner.freeze_heap`), but objects made later (requests, their outputs) are scanned
by every full pass. Pipelined runs on an H200 showed 42-50 steps a run whose launch took the host
70-150 ms (docs/pipeline.md, Where it stands); this line showed part of it was the collector's
full passes while only the heap at start was frozen (10 of up to 54 ms in a pipelined 512x1024
run; the rest was the first uses of the logits GEMM's kernels, ModelRunner.warm_logits), and
`heap_census` says what the passes left scan.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def gc_pauses() -> Iterator[dict[str, Any]]:
    """Yields a dict filled while the block runs: per generation the number of collections, their
    total and longest time in ms."""
    stats: dict[str, Any] = {str(g): {"collections": 0, "ms": 0.0, "max_ms": 0.0} for g in range(3)}
    started: list[float] = []

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = (time.perf_counter() - started.pop()) * 1e3
            g = stats[str(info["generation"])]
            g["collections"] += 1
            g["ms"] += ms
            g["max_ms"] = max(g["max_ms"], ms)

    gc.callbacks.append(hook)
    try:
        yield stats
    finally:
        gc.callbacks.remove(hook)


def heap_census(top: int = 8) -> dict[str, Any]:
    """What a full pass would scan now: the objects the collector tracks (frozen ones excepted), their
    most common types, and how many are frozen. Takes ~0.1 s a million objects: call it outside a
    timed run."""
    tracked = gc.get_objects()
    return {"tracked": len(tracked), "frozen": gc.get_freeze_count(),
            "top_types": Counter(type(o).__name__ for o in tracked).most_common(top)}


def gc_line(name: str, stats: dict[str, Any], heap: dict[str, Any] | None = None) -> str | None:
    """The bench's line for a run's collections, with the heap its full passes scanned when given
    (`{"start": heap_census(), "end": heap_census()}`); None when there were no collections."""
    if not any(g["collections"] for g in stats.values()):
        return None
    parts = [f"generation {gen}: {g['collections']} in {g['ms']:,.0f} ms (longest {g['max_ms']:,.1f})"
             for gen, g in stats.items() if g["collections"]]
    line = f"gc ({name}): " + ", ".join(parts)
    if heap:
        end = heap["end"]
        most = ", ".join(f"{t} {n:,}" for t, n in end["top_types"][:4])
        line += (f"; tracked objects {heap['start']['tracked']:,} at start, {end['tracked']:,} at end"
                 f" ({most}), {end['frozen']:,} frozen")
    return line
