"""Checks and times the fused MoE (nanoflow/kernels/fused_moe.py) at Mixtral-8x7B shapes (issue 14).

GPU:  python benchmarks/moe_check.py --out DIR [--sweep]   (writes DIR/moe_check.json)
CPU:  python benchmarks/moe_check.py --cpu-smoke           (tiny shapes, Triton interpreter)

Per token count T (random routing, top-2 of 8): the fused path against the expert loop (relative
error), a CUDA-graph capture and replay of it (no host sync inside), then the time of each part
(align, gate_up, down, the top-k sum) and of the whole, and each grouped GEMM's rate as a % of
the dense cuBLAS rate for the same FLOPs ([T * top_k, K] x [K, N] in one torch.mm). Target: >= 70%
per projection at T = 2048. --sweep tries a grid of tile configs per T and reports the best.
Imports only torch, triton and nanoflow.kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _import_fused_moe() -> types.ModuleType:
    # this checkout's package, however the script is started; importing it loads nothing else
    # (its public names are lazy), and it runs after --cpu-smoke has set TRITON_INTERPRET
    sys.path.insert(0, str(ROOT))
    from nanoflow.kernels import fused_moe

    return fused_moe


def _time_ms(fn: Callable[[], Any], on_gpu: bool, reps: int) -> float:
    """Median milliseconds of fn (GPU: CUDA events around each call after warm-up)."""
    import torch

    if not on_gpu:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _graph_check(fm: types.ModuleType, args: tuple, out: Any, ref: Any) -> float:
    """Captures fused_moe in a CUDA graph (fails on any host sync) and returns the replay's error."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fm.fused_moe(*args, out)  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fm.fused_moe(*args, out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _sweep_configs(fm: types.ModuleType, num_tokens: int, top_k: int, num_experts: int) -> list[Any]:
    """Tile shapes around what fills Hopper's tensor cores: tall-and-wide tiles with 8 warps for
    many rows per expert, short tiles with long K steps for few (decode)."""
    C = fm.MoEConfig
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 64:
        shapes = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 5),
                  (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (32, 128, 64, 4, 4), (64, 64, 128, 4, 3)]
    else:
        shapes = [(64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (64, 128, 128, 8, 3), (64, 256, 64, 8, 3),
                  (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 128, 128, 8, 2),
                  (64, 64, 128, 4, 4), (128, 256, 64, 8, 3)]
    return [C(block_m=m, block_n=n, block_k=k, group_m=g, num_warps=w, num_stages=st)
            for m, n, k, w, st in shapes for g in ((1, 16) if per_expert > 64 else (1,))]


def check_tokens(fm: types.ModuleType, T: int, E: int, top_k: int, H: int, inter: int, dtype: Any, device: str,
                 reps: int, sweep: bool) -> dict[str, Any]:
    import torch

    on_gpu = device == "cuda"
    g = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    w13 = (torch.randn(E, 2 * inter, H, device=device, dtype=dtype, generator=g) * H**-0.5)
    w2 = (torch.randn(E, H, inter, device=device, dtype=dtype, generator=g) * inter**-0.5)
    probs = torch.softmax(torch.randn(T, E, device=device, generator=g), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    out = torch.empty(T, H, device=device, dtype=dtype)
    ref = fm.moe_experts_ref(x, w13, w2, w, ids, torch.empty_like(out))
    cfg = fm.pick_config(T, top_k, w13)  # what fused_moe runs: the tuned config on a tuned GPU
    fm.fused_moe(x, w13, w2, w, ids, out, cfg)
    row: dict[str, Any] = {"tokens": T, "config": dataclasses.asdict(cfg),
                           "rel_err": ((out.float() - ref.float()).norm() / ref.float().norm()).item()}
    if on_gpu:
        row["graph_rel_err"] = _graph_check(fm, (x, w13, w2, w, ids), out, ref)

    n = T * top_k
    al = fm.align(ids, E, cfg.block_m)
    act = torch.empty(n, inter, device=device, dtype=dtype)
    down = torch.empty(n, H, device=device, dtype=dtype)
    row["align_ms"] = _time_ms(lambda: fm.align(ids, E, cfg.block_m), on_gpu, reps)
    row["sum_ms"] = _time_ms(lambda: torch.sum(down.view(T, top_k, H), dim=1, out=out), on_gpu, reps)
    row["fused_ms"] = _time_ms(lambda: fm.fused_moe(x, w13, w2, w, ids, out, cfg), on_gpu, reps)
    row["loop_ms"] = _time_ms(lambda: fm.moe_experts_ref(x, w13, w2, w, ids, out), on_gpu, reps)
    projections = {
        "gate_up": (lambda c, a: fm.moe_gate_up(x, w13, a, top_k, act, c), H, 2 * inter),
        "down": (lambda c, a: fm.moe_down(act, w2, a, w, down, c), inter, H),
    }
    for name, (run, K, N) in projections.items():
        a_dense = torch.randn(n, K, device=device, dtype=dtype, generator=g)
        b_dense = torch.randn(K, N, device=device, dtype=dtype, generator=g)
        dense_ms = _time_ms(lambda: torch.mm(a_dense, b_dense), on_gpu, reps)  # noqa: B023 (called at once)
        grouped_ms = _time_ms(lambda: run(cfg, al), on_gpu, reps)  # noqa: B023
        tflops = 2 * n * K * N / 1e9
        row[name] = {"grouped_ms": grouped_ms, "dense_ms": dense_ms, "tflops_grouped": tflops / grouped_ms,
                     "pct_of_dense": 100 * dense_ms / grouped_ms}
    if sweep and on_gpu:  # one config serves both GEMMs (one align): the best sum of the two
        best = None
        for c in _sweep_configs(fm, T, top_k, E):
            a_c = fm.align(ids, E, c.block_m)
            both = lambda c=c, a_c=a_c: [run(c, a_c) for run, _, _ in projections.values()]
            try:
                ms = _time_ms(both, on_gpu, max(reps // 2, 3))
            except Exception as exc:  # noqa: BLE001 (out of shared memory and the like: skip the config)
                print(f"  skip {c}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or ms < best[0]:
                best = (ms, c)
        if best is not None:
            dense = sum(row[name]["dense_ms"] for name in projections)
            row["best"] = {"ms": best[0], "pct_of_dense": 100 * dense / best[0], "config": dataclasses.asdict(best[1]),
                           "per_projection": {}}
            a_b = fm.align(ids, E, best[1].block_m)
            for name, (run, _, _) in projections.items():
                ms = _time_ms(lambda: run(best[1], a_b), on_gpu, reps)  # noqa: B023
                row["best"]["per_projection"][name] = {"ms": ms, "pct_of_dense": 100 * row[name]["dense_ms"] / ms}
    return row


def _write_config(fm: types.ModuleType, results: dict[str, Any]) -> None:
    """Merges this GPU's best config per token count into the tuned-config file."""
    path = fm.CONFIG_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    key = fm.shape_key(results["experts"], results["hidden"], results["intermediate"])
    entry = table.setdefault(results["device"], {}).setdefault(key, {})
    for r in results["rows"]:
        if "best" in r:
            entry[str(r["tokens"])] = r["best"]["config"]
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for moe_check.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    ap.add_argument("--tokens", type=int, nargs="*",
                    help="token counts (default 16 64 128 256 384 512 640 768 1024 1536 2048 4096: Mixtral's "
                    "512x512 steps are mostly 300-700 tokens, where per-expert rows rarely fill a 128-row tile)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also try a grid of tile configs per token count")
    ap.add_argument("--write-config", action="store_true",
                    help="with --sweep: record the best config per token count for this GPU in "
                    "nanoflow/kernels/fused_moe_configs.json (what fused_moe then uses)")
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    fm = _import_fused_moe()
    if args.cpu_smoke:
        device, dtype, E, top_k, H, inter = "cpu", torch.float32, 4, 2, 64, 128
        tokens, reps = args.tokens or [1, 33], 1
    else:
        assert torch.cuda.is_available(), "no GPU: use --cpu-smoke"
        device, dtype, E, top_k, H, inter = "cuda", torch.bfloat16, 8, 2, 4096, 14336
        tokens, reps = args.tokens or [16, 64, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 4096], args.reps
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
               "experts": E, "top_k": top_k, "hidden": H, "intermediate": inter, "rows": []}
    print(f"{'T':>5} {'err':>8} {'align':>7} {'gate_up':>8} {'%dense':>7} {'down':>8} {'%dense':>7} "
          f"{'sum':>7} {'fused':>8} {'loop':>8}  (ms)")
    for T in tokens:
        r = check_tokens(fm, T, E, top_k, H, inter, dtype, device, reps, args.sweep)
        results["rows"].append(r)
        gu, dn = r["gate_up"], r["down"]
        print(f"{T:>5} {r['rel_err']:>8.1e} {r['align_ms']:>7.3f} {gu['grouped_ms']:>8.3f} {gu['pct_of_dense']:>6.1f}% "
              f"{dn['grouped_ms']:>8.3f} {dn['pct_of_dense']:>6.1f}% {r['sum_ms']:>7.3f} {r['fused_ms']:>8.3f} "
              f"{r['loop_ms']:>8.3f}")
        if "best" in r:
            b = r["best"]
            per = ", ".join(f"{k} {v['ms']:.3f} ms = {v['pct_of_dense']:.1f}%" for k, v in b["per_projection"].items())
            print(f"      best: {b['ms']:.3f} ms = {b['pct_of_dense']:.1f}% of dense ({per}), {b['config']}")
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert r["rel_err"] < tol and r.get("graph_rel_err", 0.0) < tol, f"fused MoE wrong at T={T}: {r}"
    if args.write_config and args.sweep:
        _write_config(fm, results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_check.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out / 'moe_check.json'}")


if __name__ == "__main__":
    main()
