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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.op import KV, Buffers, Op, rows
from nanoflow.pipeline.schedule import Schedule, Step


@dataclass(frozen=True)
class _Instance:
    layer: int
    step: Step
    op_index: int  # position of the op in the layer's own (sequential) order
    start: int  # the nano-batch's rows at max_tokens
    end: int


class PipelineExecutor:
    def __init__(self, schedule: Schedule, layer_ops: Sequence[Sequence[Op]], device: torch.device) -> None:
        names = [op.name for op in layer_ops[0]]
        schedule.check(names)
        self.schedule, self.layer_ops = schedule, layer_ops
        self.on_gpu = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) for _ in range(schedule.num_streams - 1)] if self.on_gpu else []
        index = {name: i for i, name in enumerate(names)}
        self.instances = [
            _Instance(layer, st, index[st.op], *schedule.partitions[st.partition][st.part : st.part + 2])
            for layer in range(len(layer_ops)) for st in schedule.steps]
        self.ops = [layer_ops[i.layer][i.op_index] for i in self.instances]
        # waits[i]: for each other stream, the last instance there that instance i must follow
        self.waits, self.signals = self._dependencies()

    def split(self, batch: ForwardBatch,
              prepare: Callable[[ForwardBatch], ForwardBatch]) -> dict[str, list[ForwardBatch]]:
        """The batch's nano-batches for each partition, with their attention metadata."""
        return {name: [prepare(p) for p in batch.split(self.schedule.bounds(name, batch.num_tokens))]
                for name in self.schedule.partitions}

    def run(self, layer_ops: Sequence[Sequence[Op]], buffers: Buffers, parts: dict[str, list[ForwardBatch]]) -> None:
        """A `Walk` (see layers.op) over the nano-batches in `parts` (from `split`)."""
        if layer_ops is not self.layer_ops:
            raise ValueError("the executor was built for other layer ops (bind the KV caches before building it)")
        views = {name: [rows(buffers, p) for p in ps] for name, ps in parts.items()}
        if not self.on_gpu:
            for inst, op in zip(self.instances, self.ops, strict=True):
                st = inst.step
                op.run(parts[st.partition][st.part], views[st.partition][st.part], st.num_ctas)
            return
        main = torch.cuda.current_stream()
        streams = [main, *self.streams]
        fork = torch.cuda.Event()
        fork.record(main)
        for s in self.streams:
            s.wait_event(fork)
        events: dict[int, torch.cuda.Event] = {}
        for i, (inst, op) in enumerate(zip(self.instances, self.ops, strict=True)):
            st = inst.step
            stream = streams[st.stream]
            for j in self.waits[i]:
                stream.wait_event(events[j])
            with torch.cuda.stream(stream):
                op.run(parts[st.partition][st.part], views[st.partition][st.part], st.num_ctas)
            if i in self.signals:
                events[i] = torch.cuda.Event()
                events[i].record(stream)
        for s in self.streams:  # join: the forward's stream continues once every branch is done
            done = torch.cuda.Event()
            done.record(s)
            main.wait_event(done)

    def _dependencies(self) -> tuple[list[list[int]], set[int]]:
        """For each instance, the instances on other streams it must wait for (the last one per
        stream suffices: a stream runs in order), from row overlaps of the buffers each one reads
        and writes. Raises ValueError where the issue order puts an op before one it depends on
        in the sequential order (a schedule that would compute something else)."""
        accesses: dict[tuple[str, int], list[tuple[int, int, int, bool]]] = {}  # buffer -> (inst, start, end, write)
        waits: list[list[int]] = []
        signals: set[int] = set()
        for i, (inst, op) in enumerate(zip(self.instances, self.ops, strict=True)):
            mine = [(b, False) for b in op.reads] + [(b, True) for b in op.writes]
            last: dict[int, int] = {}
            for buf, write in mine:
                key = (buf, inst.layer if buf == KV else -1)  # each layer has its own KV cache
                lo = 0 if buf == KV and not write else inst.start  # attention reads earlier tokens' K/V
                for j, a, b, w in accesses.get(key, ()):
                    if (w or write) and a < inst.end and lo < b:
                        other = self.instances[j]
                        if (other.layer, other.op_index) > (inst.layer, inst.op_index):
                            raise ValueError(f"schedule issues {inst.step.op}[{inst.step.part}] of layer "
                                             f"{inst.layer} after {other.step.op}[{other.step.part}], which "
                                             "comes later in the layer's own order and touches the same rows")
                        s = other.step.stream
                        if s != inst.step.stream:
                            last[s] = max(last.get(s, -1), j)
            for buf, write in mine:
                key = (buf, inst.layer if buf == KV else -1)
                lo = 0 if buf == KV and not write else inst.start
                accesses.setdefault(key, []).append((i, lo, inst.end, write))
            waits.append(sorted(last.values()))
            signals.update(last.values())
        return waits, signals
