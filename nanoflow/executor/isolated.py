"""A function run in a process of its own, its result brought back: what one tensor-parallel engine
leaves behind in its process (a default process group that did not close in time, symmetric-memory
rendezvous state, NCCL communicators that CUDA graphs still hold) cannot reach the next one's. On two
H200s a second tensor-parallel engine with `--all-reduce symm-mem` in the same process hung at its
start. `nanoflow bench` runs each system on a GPU this way (one GPU too: a later engine in the same
process would find the kernels an earlier one loaded), `nanoflow tune -tp` each candidate.
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def run_isolated(fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
                 name: str = "nanoflow-isolated") -> Any:
    """fn(*args) in a spawned child process (fn, args and the result picklable; the child may spawn
    processes of its own); its result, or a RuntimeError carrying the child's error and traceback,
    naming its exit code if it died without a word, or saying it gave nothing within timeout_s."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)  # noqa: SLF001
    child = ctx.Process(target=_child, args=(send, fn, args, root.level, fmt), name=name)
    child.start()
    send.close()  # the child's end: recv raises EOFError once the child is gone
    try:
        if timeout_s is not None and not receive.poll(timeout_s):
            raise RuntimeError(f"{name}: no result within {timeout_s:.0f} s")
        status, payload, trace = receive.recv()
    except EOFError:
        status, payload, trace = "died", None, ""
    finally:
        receive.close()
        child.join(60)  # it has reported (or is gone): a teardown stuck past this is killed
        if child.is_alive():
            child.kill()
    if status == "ok":
        return payload
    if status == "died":
        raise RuntimeError(f"{name}: the process exited with code {child.exitcode} before it reported; its "
                           "error, if any, is printed above")
    raise RuntimeError(f"{payload}\n(in {name}'s process)\n{trace}")


def _child(send: Connection, fn: Callable[..., Any], args: tuple, level: int, fmt: str | None) -> None:
    # a spawned process starts without the parent's logging set-up: the engine's INFO lines too
    logging.basicConfig(level=level, format=fmt)
    try:
        send.send(("ok", fn(*args), ""))
    except BaseException as e:  # noqa: BLE001  # sent as text (not every exception pickles); the parent raises
        send.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))
    finally:
        send.close()
