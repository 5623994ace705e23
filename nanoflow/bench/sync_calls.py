"""The synchronizing CUDA calls the host made over a timed run, by call site.

The engine queues step i+1 while the GPU runs step i; a call that waits for the GPU inside a
launch (a copy from pageable memory, `.item()`, `.tolist()` of a device tensor, a stream or device
synchronize) stalls the host for the steps still queued, and the GPU idles while the host catches
up. Torch's sync debug mode names such calls (`torch.cuda.set_sync_debug_mode`), and this
records where in nanoflow each one was made. It does not see waits inside a library call (the
first use of a cuBLAS kernel held the host ~80 ms on an H200 with none reported here:
benchmarks/host_stall_check.py found that one, docs/pipeline.md, Where it stands).
The per-step wait for a step's result (`InFlight.result`) is one of them by design: it is
counted like the others, under its own call site.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

_PACKAGE = "/nanoflow/"


def _call_site() -> str:
    """The innermost frame inside nanoflow (not this module) of the current stack: where the
    engine asked for the synchronizing call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if _PACKAGE in frame.filename and not frame.filename.endswith("sync_calls.py"):
            return f"{frame.filename.rsplit(_PACKAGE, 1)[-1]}:{frame.lineno} {frame.name}"
    return "outside nanoflow"


@contextlib.contextmanager
def sync_calls(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict filled as the block runs: `count` and `sites` ({call site: count}) of the
    synchronizing CUDA calls torch reports. Off a GPU it stays empty."""
    found: dict[str, Any] = {"count": 0, "sites": {}}
    if device.type != "cuda":
        yield found
        return
    sites: Counter[str] = Counter()
    old_mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every call, not the first of each place
        old_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
            if "synchronizing" in str(message):
                sites[_call_site()] += 1
            else:
                old_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(old_mode)
            warnings.showwarning = old_show
            found["count"] = sum(sites.values())
            found["sites"] = dict(sites.most_common())


def sync_line(name: str, found: dict[str, Any], top: int = 3) -> str | None:
    """The bench's line for a run's synchronizing calls; None when none were recorded."""
    if not found.get("count"):
        return None
    sites = ", ".join(f"{site} x{n:,}" for site, n in list(found["sites"].items())[:top])
    return f"synchronizing calls ({name}): {found['count']:,}, most at {sites}"
