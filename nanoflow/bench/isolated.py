"""A bench system in a process of its own (tensor parallelism): whatever one engine leaves behind in
its process (a default process group that did not close in time, symmetric-memory rendezvous state,
NCCL communicators that CUDA graphs still hold) cannot reach the next system's engine. On two H200s
a second tensor-parallel engine with `--all-reduce symm-mem` in the same process hung at its start.
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a spawned child process (fn and args picklable); its result, or a RuntimeError
    carrying the child's error and traceback, or naming its exit code if it died without a word."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)  # noqa: SLF001
    child = ctx.Process(target=_child, args=(send, fn, args, root.level, fmt), name="nanoflow-bench-system")
    child.start()
    send.close()  # the child's end: recv raises EOFError once the child is gone
    try:
        status, payload, trace = receive.recv()
    except EOFError:
        status, payload, trace = "died", None, ""
    finally:
        receive.close()
    child.join()
    if status == "ok":
        return payload
    if status == "died":
        raise RuntimeError(f"the engine's process exited with code {child.exitcode} before it reported")
    raise RuntimeError(f"{payload}\n(in the engine's process)\n{trace}")


def _child(send: Connection, fn: Callable[..., dict[str, Any]], args: tuple, level: int, fmt: str | None) -> None:
    # a spawned process starts without the parent's logging set-up: the engine's INFO lines too
    logging.basicConfig(level=level, format=fmt)
    try:
        send.send(("ok", fn(*args), ""))
    except BaseException as e:  # noqa: BLE001  # reported to the parent, which records the system as failed
        send.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))
    finally:
        send.close()
