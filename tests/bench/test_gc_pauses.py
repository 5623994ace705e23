"""nanoflow.bench.gc_pauses: the collector's pauses over a block, by generation, and the bench's line."""

import gc

from nanoflow.bench.gc_pauses import gc_line, gc_pauses, heap_census


def test_collections_are_counted_and_timed_by_generation() -> None:
    with gc_pauses() as stats:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    assert stats["0"]["collections"] >= 1 and stats["2"]["collections"] >= 2
    assert stats["2"]["ms"] >= stats["2"]["max_ms"] > 0
    n = stats["2"]["collections"]
    gc.collect(2)  # after the block: not counted, the hook is gone
    assert stats["2"]["collections"] == n
    line = gc_line("nanoflow", stats)
    assert line.startswith("gc (nanoflow): ") and f"generation 2: {n} in" in line


def test_no_line_without_collections() -> None:
    quiet = {str(g): {"collections": 0, "ms": 0.0, "max_ms": 0.0} for g in range(3)}
    assert gc_line("nanoflow", quiet) is None


def test_heap_census_counts_what_a_full_pass_scans() -> None:
    kept = [[i] for i in range(1000)]  # lists are tracked
    census = heap_census()
    assert census["tracked"] >= 1000 and census["frozen"] == gc.get_freeze_count()
    assert dict(census["top_types"])["list"] >= 1000
    stats = {"2": {"collections": 1, "ms": 40.0, "max_ms": 40.0}}
    line = gc_line("nanoflow", stats, {"start": census, "end": census})
    assert f"tracked objects {census['tracked']:,} at start" in line and "frozen" in line
    del kept
