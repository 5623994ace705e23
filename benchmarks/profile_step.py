"""Where one steady-state iteration's time goes: per-op GPU time of a few dense steps (torch profiler).

Fills the engine with long requests until the batch is a steady mix of decodes plus a prefill chunk
at the full token budget, then profiles a few steps and prints the kernels grouped by op.
    python benchmarks/profile_step.py --out DIR [--dummy llama3-8b] [--eager]
    python benchmarks/profile_step.py --out DIR --num-requests 440 --prompt-len 512 --max-tokens 512 \
        --warm-steps 250   # a KV-limited decode-only step of 512x512
    python benchmarks/profile_step.py --out DIR --dummy mixtral-8x7b --kv-cache-dtype fp8 \
        --gpu-memory-utilization 0.95 --num-requests 600 --prompt-len 512 --max-tokens 512 --warm-steps 300

The steps run without CUDA graphs by default (--cuda-graph-max-tokens 0) so that the profiler
attributes every kernel to its op; the wall time per step is then that of the eager launches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.entrypoints.llm import LLM
from nanoflow.sampling_params import SamplingParams

GROUPS = [  # kernel-name fragment -> op, first match wins
    ("_moe_gemm", "MoE grouped GEMM"), ("_count_kernel", "MoE align"), ("_place_kernel", "MoE align"),
    ("decode", "decode attention"), ("prefill", "prefill attention"), ("rope", "rope+kv write"),
    ("rms", "rmsnorm"), ("silu", "silu_and_mul"), ("gemm", "GEMM"), ("nvjet", "GEMM"), ("cutlass", "GEMM"),
    ("sm90", "GEMM"), ("gemv", "GEMM"), ("elementwise", "elementwise"), ("reduce", "reduce"),
    ("softmax", "sampling"), ("sort", "sampling"), ("topk", "sampling"), ("index", "index/gather"),
    ("copy", "copy"), ("Memcpy", "memcpy"), ("Memset", "memset"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dummy", default="llama3-8b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--num-requests", type=int, default=600)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--warm-steps", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cuda-graph-max-tokens", type=int, default=0)
    ap.add_argument("--cprofile", action="store_true", help="also print where the CPU time of a step goes")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()
    path = dummy_model_dir(args.dummy)
    llm = LLM(path, load_format="dummy", skip_tokenizer_init=True, enforce_eager=args.eager,
              cuda_graph_max_tokens=args.cuda_graph_max_tokens, kv_cache_dtype=args.kv_cache_dtype,
              gpu_memory_utilization=args.gpu_memory_utilization)
    eng = llm.engine
    rng = random.Random(0)
    for i in range(args.num_requests):
        ids = [rng.randrange(100, 30000) for _ in range(args.prompt_len)]
        eng.add_request(str(i), None, ids, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    for _ in range(args.warm_steps):
        eng.step()
    torch.cuda.synchronize()
    eng.stats.keep_timeline = True
    eng.stats.reset()
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.steps
    stats = eng.stats.summary()
    sched = eng.scheduler
    batch = {"running": len(sched.running), "waiting": len(sched.waiting),
             "tokens_per_step": stats.get("mean_tokens_per_step"),
             "mean_context": sum(s.num_tokens for s in sched.running) / max(1, len(sched.running))}
    if args.cprofile:
        import cProfile
        import pstats

        prof_cpu = cProfile.Profile()
        prof_cpu.enable()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        prof_cpu.disable()
        pstats.Stats(prof_cpu).sort_stats("tottime").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
    per_op: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key
        group = next((g for frag, g in GROUPS if frag.lower() in name.lower()), "other: " + name[:60])
        per_op[group] = per_op.get(group, 0.0) + ev.self_device_time_total / 1e3 / args.steps
    total = sum(per_op.values())
    result = {"mode": "eager" if args.eager else "fast", "wall_ms_per_step": wall * 1e3,
              "gpu_ms_per_step": total, "batch": batch, "stats": stats,
              "per_op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, f"profile_{result['mode']}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
