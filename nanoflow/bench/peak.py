"""The GEMM rate that defines the optimum: optimal tokens/s = peak FLOP/s / (2 x parameters).

Measured, not taken from a datasheet, and in the same process as the runs it is compared with:
under sustained load an H100 sits at its power cap, so the rate a serving loop sees is the median
over seconds of back-to-back GEMMs, not a short burst (see gpu-facts.md).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

GPU_N = 8192
CPU_N = 512  # a CPU "peak" only keeps the report's arithmetic exercised; it is labelled as such


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU): around every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(
    device: torch.device, seconds: float = 2.0, warmup_seconds: float = 0.5, n: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Median rate of an n^3 matmul over `seconds` after `warmup_seconds` of the same.

    GPU: bf16 8192^3, each sample 10 back-to-back matmuls timed with CUDA events. CPU: a small
    float32 matmul timed by the wall clock (kind "cpu-small"; not a meaningful optimum)."""
    on_gpu = device.type == "cuda"
    n = n or (GPU_N if on_gpu else CPU_N)
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    flops = 2.0 * n**3
    per_sample = 10 if on_gpu else 1
    rates: list[float] = []
    if on_gpu:
        _gpu_loop(a, b, c, per_sample, warmup_seconds, None)
        _gpu_loop(a, b, c, per_sample, seconds, rates)
    else:
        _cpu_loop(a, b, c, warmup_seconds, None)
        _cpu_loop(a, b, c, seconds, rates)
    rates = [flops * per_sample / t / 1e12 for t in rates]
    del a, b, c
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "kind": "gpu-gemm" if on_gpu else "cpu-small",
        "tflops": statistics.median(rates),
        "tflops_max": max(rates),
        "tflops_min": min(rates),
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "samples": len(rates),
        "matmuls_per_sample": per_sample,
    }


def _gpu_loop(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, per_sample: int, seconds: float,
              out: list[float] | None) -> None:
    """Fills `out` with seconds per sample; syncs every few samples so the host never runs far ahead
    of the GPU (the wall clock then bounds the GPU time too)."""
    t0 = time.perf_counter()
    while True:
        events = []
        for _ in range(8):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_sample):
                torch.matmul(a, b, out=c)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        if out is not None:
            out.extend(s.elapsed_time(e) / 1e3 for s, e in events)
        if time.perf_counter() - t0 >= seconds:
            return


def _cpu_loop(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, seconds: float,
              out: list[float] | None) -> None:
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        if out is not None:
            out.append(time.perf_counter() - t)
        if t - t0 >= seconds:
            return


def optimum_tokens_per_s(peak_tflops: float, active_parameters: int, num_gpus: int = 1) -> float:
    """NanoFlow's ceiling: every token costs 2 FLOPs per (active) parameter at the peak GEMM rate."""
    return peak_tflops * 1e12 * num_gpus / (2.0 * active_parameters)
