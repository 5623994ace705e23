"""Where the GPU's time goes across engine steps: busy inside steps, idle between them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepStats:
    steps: int = 0
    gpu_busy_ms: float = 0.0
    gpu_idle_ms: float = 0.0  # from the end of one step's GPU work to the start of the next
    _last_end: torch.cuda.Event | None = field(default=None, repr=False)

    def record(self, step) -> None:
        """step: a processed InFlight (its end event has completed)."""
        self.steps += 1
        if step.start is None or step.end is None:
            return
        self.gpu_busy_ms += step.start.elapsed_time(step.end)
        if self._last_end is not None:
            self.gpu_idle_ms += max(0.0, self._last_end.elapsed_time(step.start))
        self._last_end = step.end

    def reset(self) -> None:
        self.steps, self.gpu_busy_ms, self.gpu_idle_ms, self._last_end = 0, 0.0, 0.0, None

    def summary(self) -> dict:
        total = self.gpu_busy_ms + self.gpu_idle_ms
        return {"steps": self.steps, "gpu_busy_ms": round(self.gpu_busy_ms, 2),
                "gpu_idle_ms": round(self.gpu_idle_ms, 2),
                "gpu_idle_per_step_ms": round(self.gpu_idle_ms / max(1, self.steps - 1), 3),
                "gpu_idle_fraction": round(self.gpu_idle_ms / total, 4) if total else None}
