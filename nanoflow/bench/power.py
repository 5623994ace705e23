"""The GPUs' power draw and clocks while a bench system runs: nvidia-smi sampled in a thread.

An H200 runs decode-heavy steps at its 700 W cap (docs/pipeline.md, Where it stands): there a
schedule is as fast as the energy a step takes, so a throughput ratio is also an energy ratio. The
bench reports each system's mean power, SM clock, how often the cap held the clock back, and
joules per token beside its tokens/s. Only where `nvidia-smi` runs (the CUDA machines); elsewhere
nothing is sampled and nothing reported.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

# timestamp first: a pipe delivers lines in blocks, so only nvidia-smi's own stamp places a sample
FIELDS = ("timestamp", "uuid", "power.draw", "power.limit", "clocks.sm", "clocks_event_reasons.sw_power_cap")


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the epoch, as time.time()
    uuid: str  # without nvidia-smi's "GPU-" prefix
    watts: float
    limit_watts: float
    sm_mhz: float
    power_capped: bool  # the software power cap is holding the SM clock back


def parse_sample(line: str) -> Sample | None:
    """One line of `nvidia-smi --query-gpu=<FIELDS> --format=csv,noheader,nounits`; None where a
    field reads "[N/A]" or the line is cut short."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    stamp, uuid, watts, limit, sm, cap = parts
    try:  # nvidia-smi stamps in local time, as datetime.timestamp() reads it
        t = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return Sample(t, uuid.removeprefix("GPU-"), float(watts), float(limit), float(sm), cap == "Active")
    except ValueError:
        return None


class PowerSampler:
    """`with PowerSampler(uuids) as s:` samples every GPU every period_ms until the block ends;
    `summary` takes those of `uuids` (None: all)."""

    def __init__(self, uuids: list[str] | None = None, period_ms: int = 50) -> None:
        self.uuids = None if uuids is None else {u.removeprefix("GPU-") for u in uuids}  # None: every GPU
        self.period_ms = period_ms
        self.samples: list[Sample] = []

    @classmethod
    def for_devices(cls, device: torch.device, num_gpus: int) -> PowerSampler | None:
        """A sampler of the GPUs cuda:0..num_gpus-1 (tensor-parallel ranks), None off CUDA or where
        nvidia-smi is missing."""
        if device.type != "cuda" or shutil.which("nvidia-smi") is None:
            return None
        uuids = [getattr(torch.cuda.get_device_properties(i), "uuid", None) for i in range(num_gpus)]
        # a torch without the property: every GPU the host has (right unless CUDA_VISIBLE_DEVICES hides some)
        return cls(None if None in uuids else [str(u) for u in uuids])

    def __enter__(self) -> PowerSampler:
        self._proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True, name="nvidia-smi sampler")
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            s = parse_sample(line)
            if s is not None:
                self.samples.append(s)

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._thread.join(timeout=5)

    def summary(self, t0: float, t1: float, tokens: int | None = None) -> dict[str, Any] | None:
        """Over the window [t0, t1] (time.time()): mean power summed over the GPUs, each GPU's mean,
        the limit, the mean SM clock, the fraction of samples the power cap held the clock back, and
        with tokens, joules per token. None without samples in the window."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        ours = [s for s in inside if self.uuids is None or s.uuid in self.uuids]
        # uuids that match none (a torch that spells them otherwise): every GPU, which the summary says
        out = summarize(ours or inside, t1 - t0, tokens)
        if out is not None and not ours:
            out["gpus_matched"] = False
        return out


def summarize(samples: list[Sample], seconds: float, tokens: int | None = None) -> dict[str, Any] | None:
    if not samples:
        return None
    by_gpu: dict[str, list[Sample]] = {}
    for s in samples:
        by_gpu.setdefault(s.uuid, []).append(s)
    per_gpu = {u: statistics.fmean(s.watts for s in ss) for u, ss in by_gpu.items()}
    watts = sum(per_gpu.values())
    out = {"samples": len(samples), "gpus": len(by_gpu), "watts": watts, "watts_per_gpu": list(per_gpu.values()),
           "limit_watts": max(s.limit_watts for s in samples), "sm_mhz": statistics.fmean(s.sm_mhz for s in samples),
           "power_capped": statistics.fmean(s.power_capped for s in samples)}
    if tokens:
        out["joules_per_token"] = watts * seconds / tokens
    return out


def power_line(name: str, p: dict[str, Any]) -> str:
    """The bench's line for one system's power summary."""
    gpus = f"{p['gpus']} GPU{'s' if p['gpus'] != 1 else ''}"
    if p.get("gpus_matched") is False:
        gpus += " (every GPU nvidia-smi lists: none matched the run's device ids)"
    line = (f"power ({name}): {p['watts']:,.0f} W mean over {gpus} (limit {p['limit_watts']:,.0f} W each), "
            f"SM clock {p['sm_mhz']:,.0f} MHz, held back by the power cap in {p['power_capped']:.0%} of samples")
    if p.get("joules_per_token"):
        line += f"; {p['joules_per_token']:.4f} J a token ({1 / p['joules_per_token']:,.1f} tokens/J)"
    return line
