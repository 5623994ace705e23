"""Checks and times the fused MoE (nanoflow/kernels/fused_moe.py) at Mixtral-8x7B shapes (issue 14).

GPU:  python benchmarks/moe_check.py --out DIR [--sweep]   (writes DIR/moe_check.json)
CPU:  python benchmarks/moe_check.py --cpu-smoke           (tiny shapes, Triton interpreter)

Per token count T (random routing, top-2 of 8): the fused path against the expert loop (relative
error), a CUDA-graph capture and replay of it (no host sync inside), then the time of each part
(align, gate_up, down, the top-k sum) and of the whole, and each grouped GEMM's rate as a % of
the dense cuBLAS rate for the same FLOPs ([T * top_k, K] x [K, N] in one torch.mm). Target: >= 70%
per projection at T = 2048. --sweep tries a grid of tiles per T: for each block_m (the align's, so
shared by the two GEMMs) the fastest tile of each projection alone, then the block_m whose two
fastest add up to the least; --write-config records that pair per T (moe_configs.py: the format).
Imports only torch, triton and nanoflow.kernels.
"""

from __future__ import annotations

import argparse
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


def _import_moe() -> tuple[types.ModuleType, types.ModuleType]:
    # this checkout's package, however the script is started; importing it loads nothing else
    # (its public names are lazy), and it runs after --cpu-smoke has set TRITON_INTERPRET
    sys.path.insert(0, str(ROOT))
    from nanoflow.kernels import fused_moe, moe_configs

    return fused_moe, moe_configs


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
    return _rel_err(out, ref)


def _sweep_grid(mc: types.ModuleType, num_tokens: int, top_k: int, num_experts: int,
                on_gpu: bool) -> dict[tuple[int, bool], list[Any]]:
    """(block_m, sorted_rows) -> the tiles to try with it, around what fills Hopper's tensor cores: tall-and-wide
    tiles with 8 warps for many rows per expert, short tiles with long K steps for few (decode).
    Each projection picks its own, so a tile too big for one (gate_up loads two weight tiles a
    step) may still serve the other."""
    if not on_gpu:  # the interpreter: two block_m and two tiles, enough to exercise the search
        tiles, block_ms, groups = [(64, 32, 4, 1), (32, 64, 4, 1)], (16, 32), (1,)
    elif num_tokens * top_k / num_experts <= 64:
        tiles = [(64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 5), (128, 64, 4, 4)]
        block_ms, groups = (16, 32, 64), (1,)
    else:
        # the tiles that won a projection in the H200 sweeps of 2026-11-30 (benchmarks/results logs), and
        # their neighbours in stages: each is compiled three ways (below), so the grid stays small
        tiles = [(128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3),
                 (256, 64, 8, 4)]
        block_ms, groups = (64, 128), (1, 16)
    # every tile with its weights by pointer loads and by TMA, and with the rows in slot order and
    # every operand by TMA (Hopper on; tiles whose TMA stages do not fit shared memory fail to
    # launch and are skipped). Both projections share block_m and sorted_rows, hence the key.
    hopper = not on_gpu or torch_capability() >= 9
    ways = {False: (False, True) if hopper else (False,), True: (True,) if hopper else ()}
    return {(m, srt): [mc.MoEConfig(block_m=m, block_n=n, block_k=k, group_m=g, num_warps=w, num_stages=st,
                                    tma_weights=t, sorted_rows=srt)
                       for n, k, w, st in tiles for g in groups for t in tmas]
            for m in block_ms for srt, tmas in ways.items() if tmas}


def torch_capability() -> int:
    import torch

    return torch.cuda.get_device_capability()[0]


def _tile(c: Any) -> str:
    return f"m{c.block_m} n{c.block_n} k{c.block_k} g{c.group_m} w{c.num_warps} s{c.num_stages}" + (
        " tma" if c.tma_weights else "") + (" sorted" if c.sorted_rows else "")


def _sweep(fm: types.ModuleType, mc: types.ModuleType, ids: Any, E: int, T: int, top_k: int,
           projections: dict[str, tuple], dense_ms: dict[str, float], on_gpu: bool, reps: int) -> dict[str, Any]:
    """Per (block_m, sorted_rows), the fastest config of each projection timed alone; the pair whose
    sum is least."""
    best: tuple[float, dict[str, tuple[float, Any]]] | None = None
    sums = {}
    trials: list[dict[str, Any]] = []  # every timing, to prune the grid by
    for (block_m, srt), configs in _sweep_grid(mc, T, top_k, E, on_gpu).items():
        al = fm.align(ids, E, block_m)
        fastest: dict[str, tuple[float, Any]] = {}
        for name, (run, _, _) in projections.items():
            for c in configs:
                try:
                    ms = _time_ms(lambda: run(c, al), on_gpu, max(reps // 2, 3))  # noqa: B023 (called at once)
                except Exception as exc:  # noqa: BLE001 (out of shared memory and the like: skip the config)
                    print(f"  skip {name} {_tile(c)}: {type(exc).__name__}", file=sys.stderr)
                    continue
                trials.append({"projection": name, "tile": _tile(c), "ms": ms})
                if name not in fastest or ms < fastest[name][0]:
                    fastest[name] = (ms, c)
        if len(fastest) == len(projections):
            key = f"m{block_m}" + (" sorted" if srt else "")
            sums[key] = sum(ms for ms, _ in fastest.values())
            if best is None or sums[key] < best[0]:
                best = (sums[key], fastest)
    if best is None:
        return {}
    cfgs = mc.MoEConfigs(best[1]["gate_up"][1], best[1]["down"][1])
    return {"ms": best[0], "pct_of_dense": 100 * sum(dense_ms.values()) / best[0], "config": mc.to_entry(cfgs),
            "ms_by_block_m": sums, "trials": trials,
            "per_projection": {name: {"ms": ms, "pct_of_dense": 100 * dense_ms[name] / ms, "tile": _tile(c)}
                               for name, (ms, c) in best[1].items()}}


def _rel_err(out: Any, ref: Any) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_tokens(fm: types.ModuleType, mc: types.ModuleType, T: int, E: int, top_k: int, H: int, inter: int,
                 dtype: Any, device: str, reps: int, sweep: bool) -> dict[str, Any]:
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
    cfg = mc.pick_config(T, top_k, w13)  # what fused_moe runs: the tuned configs on a tuned GPU
    fm.fused_moe(x, w13, w2, w, ids, out, cfg)
    row: dict[str, Any] = {"tokens": T, "config": mc.to_entry(cfg), "rel_err": _rel_err(out, ref)}
    if on_gpu:
        row["graph_rel_err"] = _graph_check(fm, (x, w13, w2, w, ids), out, ref)

    n = T * top_k
    al = fm.align(ids, E, cfg.block_m)
    # gate_up's output, sliced per config: a row per pair, or per slot (sorted rows, block_m <= 128)
    act_buf = torch.empty(fm.align_capacity(n, E, 128), inter, device=device, dtype=dtype)
    down = torch.empty(n, H, device=device, dtype=dtype)
    row["align_ms"] = _time_ms(lambda: fm.align(ids, E, cfg.block_m), on_gpu, reps)
    row["sum_ms"] = _time_ms(lambda: torch.sum(down.view(T, top_k, H), dim=1, out=out), on_gpu, reps)
    row["fused_ms"] = _time_ms(lambda: fm.fused_moe(x, w13, w2, w, ids, out, cfg), on_gpu, reps)
    row["loop_ms"] = _time_ms(lambda: fm.moe_experts_ref(x, w13, w2, w, ids, out), on_gpu, reps)
    projections = {
        "gate_up": (lambda c, a: fm.moe_gate_up(x, w13, a, top_k, act_buf[: fm.act_rows(a, c)], c), H, 2 * inter),
        "down": (lambda c, a: fm.moe_down(act_buf[: fm.act_rows(a, c)], w2, a, w, down, c), inter, H),
    }
    for name, (run, K, N) in projections.items():
        a_dense = torch.randn(n, K, device=device, dtype=dtype, generator=g)
        b_dense = torch.randn(K, N, device=device, dtype=dtype, generator=g)
        dense_ms = _time_ms(lambda: torch.mm(a_dense, b_dense), on_gpu, reps)  # noqa: B023 (called at once)
        grouped_ms = _time_ms(lambda: run(getattr(cfg, name), al), on_gpu, reps)  # noqa: B023
        tflops = 2 * n * K * N / 1e9
        row[name] = {"grouped_ms": grouped_ms, "dense_ms": dense_ms, "tflops_grouped": tflops / grouped_ms,
                     "pct_of_dense": 100 * dense_ms / grouped_ms}
    if sweep:
        row["best"] = _sweep(fm, mc, ids, E, T, top_k, projections,
                             {name: row[name]["dense_ms"] for name in projections}, on_gpu, reps)
        if row["best"]:  # the winning pair through fused_moe itself: the answer and the whole layer's time
            best = mc.parse_entry(row["best"]["config"])
            fm.fused_moe(x, w13, w2, w, ids, out, best)
            row["best"]["rel_err"] = _rel_err(out, ref)
            # against what runs now, in alternating rounds: single sweep timings drift by 5-15% on an
            # H200 (clocks under a long run of GEMMs), enough to pick a slower tile than the current
            cur_ms, best_ms = _alternating(lambda: fm.fused_moe(x, w13, w2, w, ids, out, cfg),
                                           lambda: fm.fused_moe(x, w13, w2, w, ids, out, best), on_gpu, reps)
            row["best"].update(fused_ms=best_ms, current_fused_ms=cur_ms, adopt=best_ms < cur_ms)
    return row


def _alternating(a: Callable[[], Any], b: Callable[[], Any], on_gpu: bool, reps: int,
                 rounds: int = 5) -> tuple[float, float]:
    """Median milliseconds of a and of b, timed in alternating rounds so drift hits both alike."""
    ta, tb = [], []
    for _ in range(rounds if on_gpu else 1):
        ta.append(_time_ms(a, on_gpu, reps))
        tb.append(_time_ms(b, on_gpu, reps))
    return statistics.median(ta), statistics.median(tb)


def _write_config(mc: types.ModuleType, results: dict[str, Any], path: Path) -> None:
    """Merges this GPU's best pair per token count into the tuned-config file, then reads it back
    with the loader fused_moe uses, so a file it would reject is never left behind unnoticed."""
    table = json.loads(path.read_text()) if path.exists() else {}
    key = mc.shape_key(results["experts"], results["hidden"], results["intermediate"])
    entry = table.setdefault(results["device"], {}).setdefault(key, {})
    for r in results["rows"]:
        if r.get("best", {}).get("adopt"):  # kept only where it beat the current configs
            entry[str(r["tokens"])] = r["best"]["config"]
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    mc.load_tuned.cache_clear()
    adopted = {r["tokens"] for r in results["rows"] if r.get("best", {}).get("adopt")}
    assert set(mc.load_tuned(path, results["device"], key)) >= adopted
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
                    help="with --sweep: record the best pair of configs (gate_up, down) per token count for "
                    "this GPU in --config-file (what fused_moe then uses)")
    ap.add_argument("--config-file", type=Path,
                    help="tuned-config file for --write-config (default nanoflow/kernels/fused_moe_configs.json; "
                    "required with --cpu-smoke, whose tiles are of no use to the model)")
    args = ap.parse_args()
    if args.cpu_smoke and args.write_config and args.config_file is None:
        ap.error("--cpu-smoke --write-config: pass --config-file (a scratch file, not the repository's)")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    fm, mc = _import_moe()
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
        r = check_tokens(fm, mc, T, E, top_k, H, inter, dtype, device, reps, args.sweep)
        results["rows"].append(r)
        gu, dn = r["gate_up"], r["down"]
        print(f"{T:>5} {r['rel_err']:>8.1e} {r['align_ms']:>7.3f} {gu['grouped_ms']:>8.3f} {gu['pct_of_dense']:>6.1f}% "
              f"{dn['grouped_ms']:>8.3f} {dn['pct_of_dense']:>6.1f}% {r['sum_ms']:>7.3f} {r['fused_ms']:>8.3f} "
              f"{r['loop_ms']:>8.3f}")
        if r.get("best"):
            b = r["best"]
            sums = ", ".join(f"{m} {ms:.3f}" for m, ms in b["ms_by_block_m"].items())
            print(f"      best: {b['ms']:.3f} ms = {b['pct_of_dense']:.1f}% of dense (fused {b['fused_ms']:.3f} ms vs "
                  f"{b['current_fused_ms']:.3f} now: {'adopt' if b['adopt'] else 'keep the current'}; "
                  f"sum by block_m: {sums})")
            for k, v in b["per_projection"].items():
                print(f"        {k:>7} {v['ms']:.3f} ms = {v['pct_of_dense']:.1f}% of dense  {v['tile']}")
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        errs = (r["rel_err"], r.get("graph_rel_err", 0.0), r.get("best", {}).get("rel_err", 0.0))
        assert max(errs) < tol, f"fused MoE wrong at T={T}: {r}"
    if args.write_config and args.sweep:
        _write_config(mc, results, args.config_file or mc.CONFIG_FILE)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_check.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out / 'moe_check.json'}")


if __name__ == "__main__":
    main()
