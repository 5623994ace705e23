"""GEMMs on a share of the SMs (issue 12, deliverable 2): each Llama-3-8B projection's rate with the
persistent Triton GEMM (nanoflow/kernels/linear.py) capped at several CTA counts, next to cuBLAS on
all SMs; then the pair the pipeline needs: decode attention capped at --decode-ctas, launched
first on one stream, beside the projection on another (cuBLAS, or the persistent GEMM on the SMs
left, or cuBLAS told to leave the decode's SMs out: torch's SM carveout, cuBLASLt's SM-count target),
against the best sequential pair (decode on all SMs, then cuBLAS). --green: also each on a CUDA green
context of its own SMs (decode on --decode-ctas, the GEMM on the rest, each rounded down to a multiple of 8),
a partition the GPU enforces rather than one the two kernels' grids imply, launched eagerly and
replayed from a CUDA graph, the decode's output checked against the reference each way.

    python benchmarks/gemm_share.py --out DIR [--rows 512 1024 2048] [--decode-ctas 44] [--no-triton] [--green]

Writes DIR/gemm_share.json. Imports torch, triton, nanoflow.kernels (and with --green nanoflow.pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_pair import green_streams, stream_pair

ROOT = Path(__file__).resolve().parents[1]
# projection: (in features, out features), Llama-3-8B
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
# (block_m, block_n, block_k, num_warps, num_stages)
TILES = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--ctas", type=int, nargs="*", default=None, help="caps (default: 100/83/67/50%% of the SMs)")
    p.add_argument("--decode-ctas", type=int, default=44)
    p.add_argument("--decode", default="256x1024", help="decode batch BxCONTEXT beside the GEMM")
    p.add_argument("--no-triton", action="store_true", help="cuBLAS only (with and without the SM carveout)")
    p.add_argument("--green", action="store_true", help="also the pair on two green contexts (SM partitions)")
    p.add_argument("--pair-rows", type=int, default=2048, help="the GEMM's rows in the pair")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    from nanoflow.kernels import decode_attention as dk
    from nanoflow.kernels.linear import GemmConfig, carveout_available, cublas_sms, persistent_linear

    def carved(ctas: int, lib: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn with cuBLAS sized for ctas SMs, lib the preferred BLAS library (the carveout may act on one only)."""
        def run() -> Any:
            with cublas_sms(ctas, torch.device("cuda"), lib):
                return fn()
        return run

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    libs = ("cublas", "cublaslt") if carveout_available() else ()
    if not libs:
        print(f"torch {torch.__version__} has no SM carveout: cuBLAS on all SMs only", file=sys.stderr)
    caps = args.ctas or [sms, sms * 5 // 6, sms * 2 // 3, sms // 2]
    bench: Callable[[Callable[[], Any]], float] = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)
    dt = torch.bfloat16
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "sms": sms, "caps": caps, "gemm": {}, "pairs": {}}
    print(f"{'proj':8s} {'rows':>5s} {'cuBLAS':>8s}  " + "  ".join(f"{c:>4d} CTAs" for c in caps) + "   (TF/s)")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            out = torch.empty(m, n, device="cuda", dtype=dt)
            flops = 2 * m * n * k
            ref_ms = bench(lambda: torch.matmul(x, w.t(), out=out))  # noqa: B023
            row: dict[str, Any] = {"cublas_tflops": flops / ref_ms / 1e9, "capped": {}, "carveout": {}}
            for cap in caps:  # cuBLAS left cap SMs, per BLAS library (the carveout may act on one only)
                row["carveout"][str(cap)] = {
                    lib: flops / bench(carved(cap, lib, lambda: torch.matmul(x, w.t(), out=out))) / 1e9  # noqa: B023
                    for lib in libs}
            for cap in ([] if args.no_triton else caps):
                best: dict[str, Any] = {}
                for bm, bn, bk, warps, stages in TILES:
                    cfg = GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                    try:
                        ms = bench(lambda cfg=cfg, cap=cap: persistent_linear(x, w, out=out, num_ctas=cap, config=cfg))  # noqa: B023
                    except Exception as e:  # out of shared memory and the like
                        print(f"   skip {cfg}: {type(e).__name__}", file=sys.stderr)
                        continue
                    if not best or ms < best["ms"]:
                        best = {"ms": ms, "tflops": flops / ms / 1e9, "config": dataclasses.asdict(cfg)}
                row["capped"][str(cap)] = best
            if not args.no_triton:
                torch.testing.assert_close(persistent_linear(x, w, out=torch.empty_like(out), num_ctas=caps[-1]),
                                           torch.matmul(x, w.t()), rtol=2e-2, atol=2e-2)
            res["gemm"][f"{name}@{m}"] = row
            print(f"{name:8s} {m:5d} {row['cublas_tflops']:8.0f}  " + "  ".join(
                f"{row['capped'].get(str(c), {}).get('tflops', float('nan')):9.0f}" for c in caps) + "   carveout: " +
                "  ".join(f"{c}: " + "/".join(f"{t:.0f}" for t in row["carveout"][str(c)].values()) for c in caps),
                flush=True)

    # the pair: decode capped at decode_ctas first on s1, a projection on s2 (cuBLAS or capped)
    b, ctx = map(int, args.decode.split("x"))
    hq, hkv, hd, page = 32, 8, 128, 16
    pages = b * ctx // page
    k_cache = torch.randn(pages, hkv, page, hd, device="cuda", dtype=dt)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pages, device="cuda", dtype=torch.int32).view(b, ctx // page)
    seq_lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, hd, device="cuda", dtype=dt)
    o = torch.empty_like(q)
    left = sms - args.decode_ctas
    green = green_streams(args.decode_ctas, sms) if args.green else None
    for kernel, cfg in (("per_head", dk.DecodeConfig()), ("all_heads", dk.DecodeConfig(all_heads=True)),
                        ("capped", dk.CAPPED)):  # the last: what the pipeline's capped decode runs
        dec = lambda n, cfg=cfg: lambda: dk.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.08, None, n,
                                                                   out=o, config=cfg)
        try:
            t_dec_all, t_dec = bench(dec(None)), bench(dec(args.decode_ctas))
        except Exception as e:
            print(f"decode kernel {kernel}: {type(e).__name__}: {str(e)[:200]}")
            continue
        for name in ("gate_up", "down"):
            k, n = SHAPES[name]
            m = args.pair_rows
            x = torch.randn(m, k, device="cuda", dtype=dt)
            w = torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5
            out = torch.empty(m, n, device="cuda", dtype=dt)
            cublas = lambda x=x, w=w, out=out: torch.matmul(x, w.t(), out=out)
            cap_cfg = res["gemm"].get(f"{name}@{m}", {}).get("capped", {}).get(str(caps[-1]), {}).get("config")
            capped = lambda x=x, w=w, out=out, c=cap_cfg: persistent_linear(
                x, w, out=out, num_ctas=left, config=GemmConfig(**c) if c else None)
            t_g = bench(cublas)
            seq = t_dec_all + t_g
            row = {"decode_all_ms": t_dec_all, "decode_capped_ms": t_dec, "cublas_ms": t_g, "sequential_ms": seq,
                   "beside_cublas_ms": bench(stream_pair(dec(args.decode_ctas), cublas))}
            for lib in libs:  # cuBLAS told to leave the decode's SMs out
                row[f"beside_{lib}_carveout_ms"] = bench(stream_pair(dec(args.decode_ctas), carved(left, lib, cublas)))
            if not args.no_triton:
                row["beside_capped_gemm_ms"] = bench(stream_pair(dec(args.decode_ctas), capped))
            if green:
                row.update(green_pair(bench, {"green": dec(args.decode_ctas), "green_uncapped": dec(None)},
                                      cublas, green[1], o))
            gains = {k.removeprefix("beside_").removesuffix("_ms"): seq / v for k, v in row.items()
                     if k.startswith("beside_")}
            row.update({f"gain_{k}": g for k, g in gains.items()})
            res["pairs"][f"{kernel}:{name}"] = row
            print(f"decode {kernel} ({args.decode_ctas} CTAs, {t_dec:.3f} ms; all SMs {t_dec_all:.3f}) beside {name} "
                  f"({t_g:.3f} ms; GEMM on {left} SMs where capped): " +
                  ", ".join(f"{k} {g:.2f}x" for k, g in gains.items()) + " vs the sequential pair", flush=True)
            if green:
                print("   green contexts: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                      if k.startswith("green") and ("error" in k)), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemm_share.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {Path(args.out) / 'gemm_share.json'}")


def green_pair(bench: Callable[[Callable[[], Any]], float], decodes: dict[str, Callable[[], Any]],
               gemm: Callable[[], Any], streams: tuple[Any, Any], out: Any) -> dict[str, Any]:
    """Each decode beside the GEMM on the two green streams, eagerly and as a CUDA-graph replay (ms),
    and the decode's output after each against its output alone on all SMs (relative error: a
    partition that leaves work undone must not pass as a gain)."""
    import torch

    from nanoflow.tune.timing import relative_error

    row: dict[str, Any] = {}
    for name, dec in decodes.items():
        want = dec().clone()
        pair = stream_pair(dec, gemm, streams)
        try:
            out.zero_()
            row[f"beside_{name}_ms"] = bench(pair)
            row[f"{name}_rel_error"] = relative_error(out, want)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                pair()
            out.zero_()
            row[f"beside_{name}_graph_ms"] = bench(graph.replay)
            row[f"{name}_graph_rel_error"] = relative_error(out, want)
        except Exception as e:  # a stream of a green context that a launch or a capture refuses
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


if __name__ == "__main__":
    main()
