"""Two GPU functions side by side: the building block of the overlap measurements
(kernel_check_decode.py's overlap section, gemm_share.py, allreduce_check.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def stream_pair(f1: Callable[[], Any], f2: Callable[[], Any], streams: tuple[Any, Any] | None = None
                ) -> Callable[[], None]:
    """A function that issues f1 on one stream, then f2 on another, both after the current stream's
    work, and makes the current stream wait for both: f1 is issued first, so a capped f1 takes its
    SMs before f2 fills the rest. streams: the two streams (e.g. of two green contexts, each on its
    own SMs), else two new ones."""
    import torch

    s1, s2 = streams or (torch.cuda.Stream(), torch.cuda.Stream())

    def run() -> None:
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            f1()
        with torch.cuda.stream(s2):
            f2()
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    return run


def green_streams(first_sms: int, sms: int) -> tuple[Any, tuple[Any, Any]] | None:
    """Two execution units (CUDA green contexts: pipeline.schedule.unit_sms rounds the SM counts),
    first_sms SMs and the rest. Returns (the contexts, to keep alive while their streams run; a
    stream of each), or None where this torch, driver or GPU has none (the reason on stderr)."""
    import sys

    import torch

    from nanoflow.pipeline.executor import green_context
    from nanoflow.pipeline.schedule import unit_sms

    rest, first = unit_sms(first_sms, sms)
    try:
        ctxs = (green_context(first, torch.device("cuda")), green_context(rest, torch.device("cuda")))
    except RuntimeError as e:
        print(str(e)[:300], file=sys.stderr)
        return None
    return ctxs, (ctxs[0].Stream(), ctxs[1].Stream())
