"""One layer's ops over time, one row per stream: what a pipeline overlapped in a real forward.

`OpTimer` goes to `PipelineExecutor.run(timer=...)` and times each op instance of one chosen layer:
CUDA events on a GPU (the executor enters the timer inside the op's stream, so each event lands on
the stream the op ran on), perf_counter on the CPU (where the executor runs everything in order:
the picture then shows the schedule's order and each op's cost, never overlap). `record_timeline`
runs one forward of a model runner that way, outside CUDA graphs (events cannot be read per op
inside a replayed graph); `plot_timeline` draws the records.

The runner is duck-typed (`_Runner`): the pipeline sits below the executor and imports neither it
nor any model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, Protocol

import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.op import Op
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.schedule import Step, sequential_schedule

# One colour per Op.resource: what bounds the op's speed, the thing the pipeline overlaps.
RESOURCE_COLORS = {"compute": "#2a7ab0", "memory": "#d9822b", "network": "#6a9a4a"}


@dataclasses.dataclass(frozen=True)
class _Mark:
    op: Op
    layer: int
    step: Step
    num_tokens: int
    start: Any  # torch.cuda.Event on a GPU, perf_counter seconds on the CPU
    end: Any


class OpTimer:
    """A `pipeline.executor.Timer` that times the op instances of one layer (the other layers run
    untouched, so the events of one layer do not slow the rest of the forward)."""

    def __init__(self, layer: int, device: torch.device) -> None:
        self.layer = layer
        self.on_gpu = device.type == "cuda"
        self.device = device
        self.marks: list[_Mark] = []

    @contextlib.contextmanager
    def __call__(self, op: Op, layer: int, step: Step, num_tokens: int) -> Iterator[None]:
        if layer != self.layer:
            yield
            return
        if self.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # the current stream, which the executor set to the op's
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append(_Mark(op, layer, step, num_tokens, start, end))

    def collect(self) -> list[dict[str, Any]]:
        """One record per timed op instance, in issue order; times in ms from the layer's first op start."""
        if not self.marks:
            return []
        ref = self.marks[0].start
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

            def ms(t: Any) -> float:
                return ref.elapsed_time(t)
        else:
            def ms(t: Any) -> float:
                return (t - ref) * 1000

        spans = [(ms(m.start), ms(m.end)) for m in self.marks]
        # an op issued later on another stream may have started first
        t0 = min(a for a, _ in spans)
        return [{"layer": m.layer, "op": m.op.name, "partition": m.step.partition, "nano_batch": m.step.part,
                 "tokens": m.num_tokens, "stream": m.step.stream, "num_ctas": m.step.num_ctas,
                 "resource": m.op.resource, "start_ms": round(a - t0, 4), "end_ms": round(b - t0, 4)}
                for m, (a, b) in zip(self.marks, spans, strict=True)]


def hold_gpu(device: torch.device, cycles: int = 20_000_000) -> None:
    """On a GPU, a spin kernel (~10 ms at 2 GHz) on the current stream: issued ahead of an eager
    forward, it holds every stream the forward forks from there, so that the CPU has queued the
    timed layer before the GPU reaches it. The picture then shows the GPU's own gaps, not the eager
    launch time that a CUDA graph replay does not have. (A hold on the stream of the layer's first
    op alone let the other streams' first ops run ahead of it, ~8 ms early.) Tensor-parallel
    workers hold theirs too (executor.distributed.run_worker), or rank 0's all-reduces would wait
    on their launches."""
    if device.type == "cuda" and cycles:
        torch.cuda._sleep(cycles)


class _Runner(Protocol):
    """What record_timeline needs of executor.model_runner.ModelRunner."""

    device: torch.device
    model: Any  # layer_ops, prepare, __call__(batch, walk)
    par: Any  # broadcast_object

    def build(self, plan: Any) -> ForwardBatch: ...

    def executor_for(self, num_tokens: int) -> PipelineExecutor | None: ...


def record_timeline(runner: _Runner, batch_plan: Any, layer: int = 1) -> list[dict[str, Any]]:
    """Runs one forward of `batch_plan` (an executor.step_plan.StepPlan) on the runner's model,
    eagerly, and returns the op records of `layer`: by the pipeline schedule the runner picks for
    the batch's size, or the sequential schedule where it has none. Writes the plan's K/V into
    the pages it names: give it pages no live sequence holds."""
    num_layers = len(runner.model.layer_ops)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is not one of the model's {num_layers} layers")
    # No sampled rows: the forward stops at the hidden states, and tensor-parallel workers (which
    # run runner.forward on the broadcast plan) then compute no logits either; eager: they run the
    # same schedule op by op, not a graph padded to its bucket (or, where none fits, the sequential
    # schedule), meeting ours in exactly the layers' collectives.
    plan = dataclasses.replace(batch_plan, sample_at=[], fill_at=[], fill_from=[], sampling=None, eager=True)
    timer = OpTimer(layer, runner.device)
    with torch.inference_mode():
        batch = runner.build(plan)
        ex = runner.executor_for(batch.num_tokens)
        if ex is None:
            names = [op.name for op in runner.model.layer_ops[0]]
            ex = PipelineExecutor(sequential_schedule(names, batch.num_tokens), runner.model.layer_ops,
                                  runner.device)
        parts = ex.split(batch, runner.model.prepare)
        for t in (None, timer):  # the untimed first forward meets any compile or autotune first
            runner.par.broadcast_object(plan)
            if t is not None:
                hold_gpu(runner.device)
            runner.model(batch, partial(ex.run, parts=parts, timer=t))
        return timer.collect()


def plot_timeline(records: list[dict[str, Any]], path: str, title: str) -> None:
    """One row per stream, a bar per op instance coloured by its resource, labelled op[nano-batch]."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not records:
        raise ValueError("no op records to draw")
    streams = sorted({r["stream"] for r in records})
    span = max(r["end_ms"] for r in records) or 1.0
    width_in, dpi = 12.0, 130
    fig, ax = plt.subplots(figsize=(width_in, 1.4 + 1.5 * len(streams)))
    px_per_ms = 0.85 * width_in * dpi / span  # about: the axes take ~85% of the figure's width
    for r in records:
        y, width = streams.index(r["stream"]), max(r["end_ms"] - r["start_ms"], span * 1e-4)
        ax.barh(y, width, left=r["start_ms"], height=0.7, color=RESOURCE_COLORS.get(r["resource"], "#888888"),
                edgecolor="white", linewidth=0.6)
        label = f"{r['op']}[{r['nano_batch']}]"
        fits = width * px_per_ms > 6 * len(label) + 8  # ~6 px a character at 7 pt: else across the bar
        ax.text(r["start_ms"] + width / 2, y, label, ha="center", va="center", color="white" if fits else "black",
                fontsize=7 if fits else 5.5, rotation=0 if fits else 90, clip_on=True)
    ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
    ax.set_ylim(len(streams) - 0.5, -0.5)  # stream 0 on top
    ax.set_xlim(0, span * 1.01)
    ax.set_xlabel("ms from the layer's first op")
    ax.set_title(title, fontsize=10)
    used = [res for res in RESOURCE_COLORS if any(r["resource"] == res for r in records)]
    fig.legend(handles=[Patch(color=RESOURCE_COLORS[res], label=res) for res in used], loc="lower center",
               fontsize=8, ncols=len(used), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend under the axis
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
