"""Where the GPU's time goes across engine steps: busy inside steps, idle between them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STEP_FIELDS = ("tokens", "decodes", "decode_context_tokens", "running", "waiting", "gpu_busy_ms", "gpu_idle_ms",
               "host_launch_ms", "host_wait_ms", "host_graph_launch_ms")


@dataclass(frozen=True)
class StepShape:
    """What one step computed, taken when it was scheduled."""
    num_tokens: int
    num_decodes: int
    decode_context_tokens: int  # KV tokens the decode attention reads (per layer)
    num_running: int
    num_waiting: int
    # host time from the start of the engine step to the step's forward and sampling queued (schedule,
    # plan, batch build, launch): where the GPU idles before a step, this tells whether the host was late
    host_launch_ms: float = 0.0
    # of which in the CUDA graph's launch call: long only if a launch waits for the GPU's work queue
    # (on an H200 it never did, at most 0.4 ms: the late steps were the logits GEMM's, warm_logits)
    host_graph_launch_ms: float = 0.0


@dataclass
class StepStats:
    steps: int = 0
    gpu_busy_ms: float = 0.0
    gpu_idle_ms: float = 0.0  # from the end of one step's GPU work to the start of the next
    # One row per step (STEP_FIELDS), so a benchmark can show ramp-up, steady state and tail.
    keep_timeline: bool = False  # off in servers: it grows by a row per step
    timeline: list[tuple[float, ...]] = field(default_factory=list, repr=False)
    _last_end: torch.cuda.Event | None = field(default=None, repr=False)

    def record(self, step, shape: StepShape | None, wait_ms: float = 0.0) -> None:
        """step: a processed step's InFlight (its end event has completed); shape: what it computed
        (None: launched before the timeline was switched on); wait_ms: how long the host waited for
        its result (none: the host, not the GPU, set the pace)."""
        self.steps += 1
        busy = idle = 0.0
        if step.start is not None and step.end is not None:
            busy = step.start.elapsed_time(step.end)
            if self._last_end is not None:
                idle = max(0.0, self._last_end.elapsed_time(step.start))
            self._last_end = step.end
        self.gpu_busy_ms += busy
        self.gpu_idle_ms += idle
        if self.keep_timeline and shape is not None:
            self.timeline.append((shape.num_tokens, shape.num_decodes, shape.decode_context_tokens, shape.num_running,
                                  shape.num_waiting, round(busy, 3), round(idle, 3), round(shape.host_launch_ms, 3),
                                  round(wait_ms, 3), round(shape.host_graph_launch_ms, 3)))

    def reset(self) -> None:
        self.steps, self.gpu_busy_ms, self.gpu_idle_ms, self._last_end = 0, 0.0, 0.0, None
        self.timeline = []

    def timeline_columns(self) -> dict[str, list]:
        return {name: [row[i] for row in self.timeline] for i, name in enumerate(STEP_FIELDS)}

    def summary(self) -> dict:
        total = self.gpu_busy_ms + self.gpu_idle_ms
        return {"steps": self.steps, "gpu_busy_ms": round(self.gpu_busy_ms, 2),
                "gpu_idle_ms": round(self.gpu_idle_ms, 2),
                "gpu_idle_per_step_ms": round(self.gpu_idle_ms / max(1, self.steps - 1), 3),
                "mean_tokens_per_step": (round(sum(r[0] for r in self.timeline) / len(self.timeline), 1)
                                         if self.timeline else None),
                "gpu_idle_fraction": round(self.gpu_idle_ms / total, 4) if total else None}
