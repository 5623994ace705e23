"""Runs every layer's ops over nano-batches as a schedule says: in its issue order, on its streams,
with its SM caps, waiting across streams only where an op needs what another stream wrote (or must
not overwrite what another stream still reads).

The waits come from the ops' declared reads and writes (`Op.reads` / `Op.writes`) over the rows of
each nano-batch, computed once per schedule. The same issue order is a valid sequential order (the
constructor checks it against the plain layer-by-layer order), which is how the CPU runs it, and
how CI checks that a pipeline computes what the sequential forward does. On a GPU, inside a CUDA
graph capture, the streams and events become the graph's branches and edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.kernels.linear import cublas_sms
from nanoflow.layers.op import KV, Buffers, Op, rows
from nanoflow.pipeline.schedule import Schedule, Step

# timer(op, layer, step, num_tokens): entered around one op instance, inside the op's stream (see
# pipeline.timeline.OpTimer, which draws one layer's ops over time).
Timer = Callable[[Op, int, Step, int], AbstractContextManager[None]]


@dataclass(frozen=True)
class _Instance:
    layer: int
    step: Step
    op_index: int  # position of the op in the layer's own (sequential) order
    start: int  # the nano-batch's rows at max_tokens
    end: int


def green_context(num_sms: int, device: torch.device) -> Any:
    """A CUDA green context of num_sms SMs that gives streams (torch.cuda.green_contexts: CUDA 12.8+, a
    driver and GPU that take it, a torch whose green contexts have Stream()); raises a clear error
    where there is none."""
    try:
        from torch.cuda.green_contexts import GreenContext

        ctx = GreenContext.create(num_sms=num_sms, device_id=device.index or 0)
        if not hasattr(ctx, "Stream"):
            raise RuntimeError(f"torch {torch.__version__}'s green contexts give no streams")
        return ctx
    except Exception as e:
        raise RuntimeError(f"the pipeline's execution units need a CUDA green context of {num_sms} SMs with "
                           f"streams, which this torch, driver or GPU does not give ({type(e).__name__}: {e}); "
                           "tune without --execution-units or run --pipeline off") from e


class GreenContexts:
    """One green context per SM count, made when first asked for and shared by every executor given
    this (each context holds device memory)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._by_sms: dict[int, Any] = {}

    def get(self, num_sms: int) -> Any:
        if num_sms not in self._by_sms:
            self._by_sms[num_sms] = green_context(num_sms, self.device)
        return self._by_sms[num_sms]


def _cublas_capped(op: Op, num_ctas: int | None, device: torch.device) -> Op:
    """The GEMM op run uncapped (cuBLAS, not the persistent Triton GEMM) with cuBLAS sizing its grid
    for num_ctas SMs."""
    def run(batch: ForwardBatch, bufs: Buffers, _: int | None) -> None:
        with cublas_sms(num_ctas, device):
            op.run(batch, bufs, None)

    return dataclasses.replace(op, run=run)


class PipelineExecutor:
    def __init__(self, schedule: Schedule, layer_ops: Sequence[Sequence[Op]], device: torch.device,
                 side_priority: bool = True, green: GreenContexts | None = None) -> None:
        """side_priority: the streams besides the forward's get a higher priority than it, so that
        where both have kernels waiting, the SMs a finished CTA frees go to the capped side kernel
        (decode attention, an all-reduce) first and the GEMMs fill what it leaves. CUDA graphs keep
        the priority per kernel node. green: where the execution units' green contexts come from (the
        runner's, shared by its executors), else contexts of this executor's own."""
        names = [op.name for op in layer_ops[0]]
        schedule.check(names)
        self.schedule, self.layer_ops = schedule, layer_ops
        self.on_gpu = device.type == "cuda"
        # execution units: every stream, the forward's own too, on a green context of its SMs; the
        # forward's stream forks to them and joins them (the contexts live as long as the executor).
        # Else the side streams beside the forward's.
        green = green or GreenContexts(device)
        self.units = [green.get(n) for n in schedule.units] if self.on_gpu else []
        self.unit_streams = [u.Stream() for u in self.units]
        priority = -1 if side_priority else 0  # lower is higher; CUDA clamps it to the device's range
        self.streams = [torch.cuda.Stream(device, priority=priority)
                        for _ in range(schedule.num_streams - 1)] if self.on_gpu and not self.units else []
        index = {name: i for i, name in enumerate(names)}
        self.instances = [
            _Instance(layer, st, index[st.op], *schedule.partitions[st.partition][st.part : st.part + 2])
            for layer in range(len(layer_ops)) for st in schedule.steps]
        self.ops = [_cublas_capped(layer_ops[i.layer][i.op_index], i.step.num_ctas, device) if i.step.cublas
                    else layer_ops[i.layer][i.op_index] for i in self.instances]
        # waits[i]: for each other stream, the last instance there that instance i must follow
        self.waits, self.signals = self._dependencies()

    def split(self, batch: ForwardBatch,
              prepare: Callable[[ForwardBatch], ForwardBatch]) -> dict[str, list[ForwardBatch]]:
        """The batch's nano-batches for each partition, with their attention metadata (built once for
        partitions with the same bounds)."""
        by_bounds: dict[tuple[int, ...], list[ForwardBatch]] = {}
        parts = {}
        for name in self.schedule.partitions:
            bounds = tuple(self.schedule.bounds(name, batch.num_tokens))
            if bounds not in by_bounds:
                by_bounds[bounds] = [prepare(p) for p in batch.split(bounds)]
            parts[name] = by_bounds[bounds]
        return parts

    def run(self, layer_ops: Sequence[Sequence[Op]], buffers: Buffers, parts: dict[str, list[ForwardBatch]],
            timer: Timer | None = None) -> None:
        """A `Walk` (see layers.op) over the nano-batches in `parts` (from `split`); `timer`, if
        given, is entered around every op instance (outside CUDA graphs: it records events)."""
        if layer_ops is not self.layer_ops:
            raise ValueError("the executor was built for other layer ops (bind the KV caches before building it)")
        views = {name: [rows(buffers, p) for p in ps] for name, ps in parts.items()}
        ops = self.ops if timer is None else self._timed_ops(timer)
        if not self.on_gpu:
            for inst, op in zip(self.instances, ops, strict=True):
                st = inst.step
                op.run(parts[st.partition][st.part], views[st.partition][st.part], st.num_ctas)
            return
        main = torch.cuda.current_stream()
        streams = self.unit_streams or [main, *self.streams]
        branches = [s for s in streams if s is not main]
        fork = torch.cuda.Event()
        fork.record(main)
        for s in branches:
            s.wait_event(fork)
        events: dict[int, torch.cuda.Event] = {}
        for i, (inst, op) in enumerate(zip(self.instances, ops, strict=True)):
            st = inst.step
            stream = streams[st.stream]
            for j in self.waits[i]:
                stream.wait_event(events[j])
            with torch.cuda.stream(stream):
                op.run(parts[st.partition][st.part], views[st.partition][st.part], st.num_ctas)
            if i in self.signals:
                events[i] = torch.cuda.Event()
                events[i].record(stream)
        for s in branches:  # join: the forward's stream continues once every branch is done
            done = torch.cuda.Event()
            done.record(s)
            main.wait_event(done)

    # --- per-op timing (pipeline.timeline) ---------------------------------------------------------
    def _timed_ops(self, timer: Timer) -> list[Op]:
        """self.ops with each run wrapped in the timer, so that the loops above stay as they are and
        an untimed run pays nothing for the option."""
        def timed(op: Op, inst: _Instance) -> Op:
            def run(batch: ForwardBatch, bufs: Buffers, num_ctas: int | None) -> None:
                with timer(op, inst.layer, inst.step, batch.num_tokens):
                    op.run(batch, bufs, num_ctas)

            return dataclasses.replace(op, run=run)

        return [timed(op, inst) for inst, op in zip(self.instances, self.ops, strict=True)]

    def _dependencies(self) -> tuple[list[list[int]], set[int]]:
        """For each instance, the instances on other streams it must wait for (the last one per
        stream suffices: a stream runs in order), from row overlaps of the buffers each one reads
        and writes. Raises ValueError where the issue order puts an op before one it depends on
        in the sequential order (a schedule that would compute something else)."""
        # buffer -> accesses so far: (instance, first row, end row, rows subset or None, write)
        accesses: dict[tuple[str, int], list[tuple[int, int, int, str | None, bool]]] = {}
        waits: list[list[int]] = []
        signals: set[int] = set()
        for i, (inst, op) in enumerate(zip(self.instances, self.ops, strict=True)):
            mine = [_access(name, inst, False) for name in op.reads] + [_access(name, inst, True) for name in op.writes]
            last: dict[int, int] = {}
            for key, lo, hi, subset, write in mine:
                for j, a, b, sub, w in accesses.get(key, ()):
                    if (w or write) and a < hi and lo < b and (sub is None or subset is None or sub == subset):
                        other = self.instances[j]
                        if (other.layer, other.op_index) > (inst.layer, inst.op_index):
                            raise ValueError(f"schedule issues {other.step.op}[{other.step.part}] of layer "
                                             f"{other.layer} before {inst.step.op}[{inst.step.part}], which the "
                                             "layer's own order runs first over the same rows")
                        s = other.step.stream
                        if s != inst.step.stream:
                            last[s] = max(last.get(s, -1), j)
            for key, lo, hi, subset, write in mine:
                accesses.setdefault(key, []).append((i, lo, hi, subset, write))
            waits.append(sorted(last.values()))
            signals.update(last.values())
        return waits, signals


def _access(name: str, inst: _Instance, write: bool) -> tuple[tuple[str, int], int, int, str | None, bool]:
    """(buffer key, rows, rows subset, write) of one declared read or write. Each layer has its own
    KV cache, and reading it reads the earlier tokens' K/V too; "buf@decode" / "buf@prefill" are
    the decode / prefill rows of the nano-batch, which never overlap each other."""
    buf, _, subset = name.partition("@")
    if buf == KV:
        return (buf, inst.layer), 0 if not write else inst.start, inst.end, None, write
    return (buf, -1), inst.start, inst.end, subset or None, write
