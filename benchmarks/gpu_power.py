"""Power and clocks of a GPU while something runs: nvidia-smi sampled every few ms in a thread.

The H200's 700 W cap lowers the SM clock under back-to-back GEMMs (gpu-facts.md: ~1,450 MHz mean
against 1,980 max), so two kernels sharing the GPU may be limited by power, not by SMs or bytes:
`power_step.py` reads this beside its timings.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

# timestamp first: lines reach a pipe in blocks, seconds late, so only nvidia-smi's own stamp places a sample
FIELDS = ("timestamp", "power.draw", "clocks.sm", "clocks.mem", "clocks_event_reasons.sw_power_cap")


@dataclass
class PowerSampler:
    """`with PowerSampler(gpu) as s:` samples until the block ends; `s.mean(t0, t1)` averages the
    samples whose arrival lies in the host-time window [t0, t1] (time.time())."""

    gpu: int = 0
    period_ms: int = 20
    # (t, W, sm MHz, mem MHz, power cap holding the clock back: 0/1)
    samples: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    lag_s: float = 0.0  # how late the last sample reached us (the pipe's buffering)

    def __enter__(self) -> PowerSampler:
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(self.gpu), f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                stamp, w, sm, mem, cap = (x.strip() for x in line.split(","))
                t = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
                self.samples.append((t, float(w), float(sm), float(mem), float(cap == "Active")))
            except ValueError:  # "[N/A]" or a partial line at exit
                continue
            self.lag_s = time.time() - t

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=5)
        self._thread.join(timeout=5)

    def mean(self, t0: float, t1: float) -> dict[str, float]:
        """Mean power (W), SM and memory clock (MHz), the fraction of samples whose clock the power cap
        held back, over the window, and how many samples."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"samples": 0}
        return {"samples": len(inside), "watts": statistics.fmean(s[1] for s in inside),
                "sm_mhz": statistics.fmean(s[2] for s in inside), "mem_mhz": statistics.fmean(s[3] for s in inside),
                "power_capped": statistics.fmean(s[4] for s in inside)}
