"""Where a tensor-parallel step's time goes on rank 0, kernel by kernel: real steps (decodes at
--context, as `nanoflow tune -tp` times them) replayed from the engine's own CUDA graphs under the
torch profiler, with the pipeline of --pipeline (a JSON, e.g. from benchmarks/make_pipeline.py or a
tune's cache) or the sequential schedule (off). Per step size it prints the step time and, per kernel
group (GEMM, attention, network, other), the time the group's kernels were running, the time they ran
alone (nothing of another group beside them) and the GPU's idle time; the chrome trace is kept.

Why: on 2 H200s the ping-pong pipeline that wins 1.3-1.6x on one GPU's decode steps lost 0.3-0.9x
under TP2 (8B and 70B, symm-mem and NCCL alike; docs/tensor_parallel.md). Whether the all-reduces
stretch (spinning while the peer is behind), the two nano-batches run in lockstep, or the GEMMs slow
down is what this shows.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python benchmarks/tp_step_profile.py --dummy llama3-8b --tp 2 --kv-cache-dtype fp8 \\
        --pipeline pp.json --tokens 512,1024,2048 --out DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = ("network", "attention", "gemm", "other")


def kernel_group(name: str) -> str:
    n = name.lower()
    if "nccl" in n or "all_reduce" in n or "allreduce" in n:
        return "network"
    if "decode" in n or "attention" in n or "prefill" in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "linear")):
        return "gemm"
    return "other"


def overlap_summary(kernels: Iterable[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """kernels: (group, start, end) in µs. Per step (ms): the span, the GPU's idle time within it, and
    per group the time any of its kernels ran ("busy") and the time only its kernels ran ("alone")."""
    points = sorted((t, +1 if i == 0 else -1, g) for g, a, b in kernels for i, t in enumerate((a, b)))
    if not points:
        return {"step_ms": 0.0, "idle_ms": 0.0, "busy_ms": {}, "alone_ms": {}}
    active = dict.fromkeys(GROUPS, 0)
    busy, alone = dict.fromkeys(GROUPS, 0.0), dict.fromkeys(GROUPS, 0.0)
    idle, last = 0.0, points[0][0]
    for t, delta, g in points:
        dt, running = t - last, [k for k, v in active.items() if v > 0]
        for k in running:
            busy[k] += dt
        if len(running) == 1:
            alone[running[0]] += dt
        if not running:
            idle += dt
        active[g] += delta
        last = t
    per = 1000.0 * steps
    return {"step_ms": (points[-1][0] - points[0][0]) / per, "idle_ms": idle / per,
            "busy_ms": {k: v / per for k, v in busy.items() if v},
            "alone_ms": {k: v / per for k, v in alone.items() if v}}


def top_kernels(kernels: Iterable[tuple[str, float, float, str]], steps: int, n: int = 12) -> list[dict[str, Any]]:
    """The n kernels with the most GPU time per step: name (cut to 80 characters), group, ms and
    launches per step, mean µs a launch (a stretched all-reduce or GEMM shows here)."""
    by_name: dict[str, list[float]] = {}
    group_of: dict[str, str] = {}
    for g, a, b, name in kernels:
        by_name.setdefault(name[:80], []).append(b - a)
        group_of[name[:80]] = g
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [{"kernel": k, "group": group_of[k], "ms_per_step": sum(d) / 1000 / steps,
             "launches_per_step": len(d) / steps, "mean_us": sum(d) / len(d)} for k, d in rows]


def trace_kernels(path: Path) -> list[tuple[str, float, float, str]]:
    """(group, start µs, end µs, name) of every GPU kernel in a chrome trace the profiler wrote."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(kernel_group(e["name"]), e["ts"], e["ts"] + e["dur"], e["name"])
            for e in events if e.get("cat") == "kernel" and "dur" in e]


def profile_sizes(config: Any, sizes: list[int], context: int, mixed: bool, repeats: int, out: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from nanoflow.tune.live_steps import engine_runner, time_plan
    from nanoflow.tune.profile import Workload, mixed_plan

    results = {}
    # --tp 1: the same steps on one GPU, where the ping-pong pipeline wins (the picture to compare with)
    with engine_runner(config) as runner:
        # the CPU: a smoke test, with no kernels to report
        activity = ProfilerActivity.CUDA if runner.device.type == "cuda" else ProfilerActivity.CPU
        for tokens in sizes:
            plan = mixed_plan(tokens, Workload(context, 0.25 if mixed else 1.0), runner.arch.vocab_size,
                              runner.num_pages, runner.config.max_model_len)
            prof = profile(activities=[activity])
            step_ms, eager = time_plan(runner, plan, 3, repeats, around=prof)
            trace = out / f"trace_{tokens}{'_mixed' if mixed else ''}.json.gz"
            prof.export_chrome_trace(str(trace))
            kernels = trace_kernels(trace)
            summary = overlap_summary([(g, a, b) for g, a, b, _ in kernels], repeats)
            # the step time by CUDA events (time_plan), which holds even where the trace has no kernels
            # (if the profiler does not see a graph's kernels, the groups above come back empty)
            summary["event_step_ms"] = step_ms
            summary["kernels_per_step"] = len(kernels) / repeats
            summary["graph_replays_per_step"] = 1 - eager / repeats  # 1: each step replayed a graph (0: eager)
            summary["top_kernels"] = top_kernels(kernels, repeats)
            results[str(tokens)] = summary
            print(f"{tokens:>6} tokens ({repeats - eager} of {repeats} steps from graphs): step {step_ms:.2f} ms "
                  f"(kernels span {summary['step_ms']:.2f}), idle {summary['idle_ms']:.2f}; busy " +
                  ", ".join(f"{k} {v:.2f}" for k, v in summary["busy_ms"].items()) + "; alone " +
                  ", ".join(f"{k} {v:.2f}" for k, v in summary["alone_ms"].items()), flush=True)
            for row in summary["top_kernels"][:6]:
                print(f"        {row['ms_per_step']:7.2f} ms  {row['launches_per_step']:6.0f} x "
                      f"{row['mean_us']:7.1f} us  {row['group']:<9} {row['kernel']}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b")
    p.add_argument("--model", default=None, help="a Hugging Face folder instead of --dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pipeline", default="off", help="a pipeline JSON, or off (sequential)")
    p.add_argument("--tokens", default="512,1024,2048", help="step sizes (CUDA graph sizes)")
    p.add_argument("--context", type=int, default=1024, help="mean decode context")
    p.add_argument("--mixed", action="store_true", help="a quarter decodes, the rest prompt chunks (else all decodes)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--all-reduce", default="nccl")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from nanoflow.bench.dummy_models import dummy_model_dir
    from nanoflow.config import EngineConfig
    from nanoflow.engine_args import EngineArgs

    sizes = [int(x) for x in args.tokens.split(",") if x]  # only these graphs: a faster start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, load_format = (args.model, "auto") if args.model else (dummy_model_dir(args.dummy), "dummy")
    ea = EngineArgs(model=model, load_format=load_format, dtype=args.dtype,
                    tensor_parallel_size=args.tp, kv_cache_dtype=args.kv_cache_dtype, all_reduce=args.all_reduce,
                    pipeline=args.pipeline, skip_tokenizer_init=True, cuda_graph_sizes=tuple(sizes))
    results = profile_sizes(EngineConfig.from_args(ea), sizes, args.context, args.mixed, args.repeats, out)
    (out / f"tp_step_profile{'_mixed' if args.mixed else ''}.json").write_text(
        json.dumps({"settings": vars(args), "steps": results}, indent=1))


if __name__ == "__main__":
    main()
