"""Checks and times the Triton kernels against their references on Llama-3-8B shapes.

GPU:  python benchmarks/kernel_check.py --out DIR            (writes DIR/kernel_check.json)
CPU:  python benchmarks/kernel_check.py --out DIR --cpu-smoke (tiny shapes, Triton interpreter)

Sections: copy ceiling (device-to-device copy), correctness of every kernel vs its reference,
decode attention bandwidth at batch 256 x 1024 and 64 x 4096 for num_ctas None/16/32/66 (with a
sweep of launch configs), prefill attention, the small fused kernels vs their references, a CUDA
graph capture, (optional) decode on a capped grid overlapped with a GEMM on another stream, and
decode_all_heads: the per-head decode kernel vs the all-heads one (DecodeConfig(all_heads=True))
at 16/32/44/66/132 CTAs, one table. `--only decode_all_heads` runs just that (plus env and copy).
Imports only torch, triton and nanoflow.kernels; the decode sections are in kernel_check_decode.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import types
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

from kernel_check_decode import DecodeChecks, rel_err

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels() -> types.SimpleNamespace:
    # this checkout's package, however the script is started; importing it loads nothing else
    # (its public names are lazy), and it runs after --cpu-smoke has set TRITON_INTERPRET
    sys.path.insert(0, str(ROOT))
    from nanoflow.kernels import activation, decode_attention, kv_cache, prefill_attention, rms_norm

    return types.SimpleNamespace(act=activation, dk=decode_attention, pk=prefill_attention, norm=rms_norm, kvk=kv_cache)


@dataclasses.dataclass(frozen=True)
class Shapes:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    intermediate: int = 14336
    tokens: int = 2048  # dense batch for the norm / activation / rope kernels
    decode_cases: tuple[tuple[int, int], ...] = ((256, 1024), (64, 4096))  # (batch, context)
    ctas: tuple[int | None, ...] = (None, 16, 32, 48, 66)
    compare_ctas: tuple[int, ...] = (16, 32, 44, 66, 132)  # decode_all_heads: per-head vs all-heads kernel
    prefill: tuple[int, int, int] = (4, 512, 1024)  # sequences, new tokens each, context each
    page_size: int = 16


SMOKE = Shapes(
    num_q_heads=8, num_kv_heads=2, head_dim=32, hidden=64, intermediate=96, tokens=8,
    decode_cases=((4, 40), (2, 70)), ctas=(None, 3), prefill=(2, 20, 40), compare_ctas=(3,),
)  # fmt: skip


class Runner(DecodeChecks):
    """Keeps the results; every section runs even when an earlier one failed."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import triton

        self.torch, self.triton, self.args = torch, triton, args
        self.k = _import_kernels()
        self.cpu = args.cpu_smoke
        self.dev = "cpu" if self.cpu else "cuda"
        self.dtype = torch.float32 if self.cpu else torch.bfloat16
        self.s = SMOKE if self.cpu else Shapes()
        if args.decode_cases:  # e.g. the engine's 512 x 1,024 step beside the default 256 x 1,024
            cases = tuple(tuple(int(x) for x in c.split("x")) for c in args.decode_cases.split(","))
            self.s = dataclasses.replace(self.s, decode_cases=cases)
        self.sms = 1 if self.cpu else torch.cuda.get_device_properties(0).multi_processor_count
        self.results: dict[str, Any] = {"errors": {}}
        self.table: list[tuple[str, str]] = []

    # -- helpers -----------------------------------------------------------------------------
    def bench(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds."""
        if self.cpu:  # interpreter: one warm call and one timed call, just to exercise the path
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return self.triton.testing.do_bench(fn, warmup=25, rep=self.args.rep_ms, return_mode="median")

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        if self.args.only and name not in ("env", "copy_ceiling", *self.args.only.split(",")):
            return
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as e:  # keep going: one broken section must not lose the others
            traceback.print_exc()
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
            self.table.append((name, f"ERROR {type(e).__name__}"))
        print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)
        self.save()  # after every section: a later crash (e.g. a compiler abort) keeps what ran

    def save(self) -> None:
        out_dir = Path(self.args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kernel_check.json").write_text(json.dumps(self.results, indent=1, default=str))

    def check(self, name: str, out: Any, ref: Any, tol: float | None = None) -> dict[str, Any]:
        tol = tol if tol is not None else (1e-4 if self.dtype == self.torch.float32 else 1e-2)
        err = rel_err(out, ref)
        finite = bool(self.torch.isfinite(out).all())
        ok = finite and err < tol
        print(f"   {name:44s} rel_err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
        self.table.append((f"check {name}", f"{err:.1e} {'ok' if ok else 'FAIL'}"))
        return {"rel_err": err, "tol": tol, "finite": finite, "ok": ok}

    def paged_cache(self, lens: list[int], shuffle: bool = True) -> tuple[Any, Any, Any, Any]:
        torch, s = self.torch, self.s
        max_pages = max(-(-n // s.page_size) for n in lens)
        num_pages = len(lens) * max_pages
        shape = (num_pages, s.num_kv_heads, s.page_size, s.head_dim)
        k_cache = torch.randn(shape, device=self.dev, dtype=self.dtype)
        v_cache = torch.randn(shape, device=self.dev, dtype=self.dtype)
        make = torch.randperm if shuffle else torch.arange
        order = make(num_pages, device=self.dev)
        tables = order.view(len(lens), max_pages).to(torch.int32)
        seq_lens = torch.tensor(lens, device=self.dev, dtype=torch.int32)
        return k_cache, v_cache, tables, seq_lens

    def kv_bytes(self, lens: list[int]) -> int:
        s = self.s
        return sum(lens) * s.num_kv_heads * s.head_dim * 2 * self.torch.finfo(self.dtype).bits // 8

    # -- sections ----------------------------------------------------------------------------
    def env(self) -> dict[str, Any]:
        torch, triton = self.torch, self.triton
        info = {"torch": torch.__version__, "triton": triton.__version__, "cpu_smoke": self.cpu}
        if not self.cpu:
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
        print("  ", info)
        return info

    def copy_ceiling(self) -> dict[str, Any]:
        n = (1 << 29) if not self.cpu else (1 << 16)  # 1 GiB of bf16
        src = self.torch.randn(n, device=self.dev, dtype=self.dtype)
        dst = self.torch.empty_like(src)
        ms = self.bench(lambda: dst.copy_(src))
        moved = 2 * src.numel() * src.element_size()  # read + write
        tbps = moved / ms / 1e9
        self.table.append(("d2d copy (read+write)", f"{tbps:.2f} TB/s"))
        return {"bytes": moved, "ms": ms, "tbps": tbps}

    def correctness(self) -> dict[str, Any]:
        torch, k, s = self.torch, self.k, self.s
        res: dict[str, Any] = {}
        scale = s.head_dim**-0.5
        Hq, D = s.num_q_heads, s.head_dim
        gpu = not self.cpu

        def decode_case(name: str, lens: list[int], window: int | None, num_ctas: int | None) -> None:
            k_cache, v_cache, tables, seq_lens = self.paged_cache(lens)
            q = torch.randn(len(lens), Hq, D, device=self.dev, dtype=self.dtype)
            out = torch.full_like(q, float("nan"))
            k.dk.paged_decode_attention(
                q, k_cache, v_cache, tables, seq_lens, scale, window, num_ctas=num_ctas, out=out
            )
            ref = k.dk.paged_decode_attention_ref(
                q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, scale, window
            )
            res[name] = self.check(name, out, ref)
            ref_native = k.dk.paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale, window)
            res[name]["rel_err_vs_native_ref"] = rel_err(ref_native, ref)  # the reference's own error

        for b, ctx in s.decode_cases:
            decode_case(f"decode {b}x{ctx}", [ctx] * b, None, None)
        var = [1, 15, 16, 17, 33, 100, 1000, 4097] if gpu else [1, 15, 17, 33, 70]
        decode_case("decode varlen ctas=16", var, None, 16 if gpu else 2)
        decode_case("decode varlen window=256 ctas=32", var, 256 if gpu else 20, 32 if gpu else 3)

        def prefill_case(name: str, qlens: list[int], lens: list[int], window: int | None) -> None:
            k_cache, v_cache, tables, seq_lens = self.paged_cache(lens)
            q = torch.randn(sum(qlens), Hq, D, device=self.dev, dtype=self.dtype)
            starts = torch.tensor([0, *accumulate(qlens)], device=self.dev, dtype=torch.int32)
            out = torch.full_like(q, float("nan"))
            k.pk.paged_prefill_attention(
                q, k_cache, v_cache, tables, starts, seq_lens, scale, window,
                max_query_len=max(qlens), out=out,
            )  # fmt: skip
            ref = k.pk.paged_prefill_attention_ref(
                q.float(), k_cache.float(), v_cache.float(), tables, qlens, lens, scale, window
            )
            res[name] = self.check(name, out, ref)

        n, new, ctx = s.prefill
        prefill_case(f"prefill {n}x{new} over {ctx}", [new] * n, [ctx] * n, None)
        full = [1000, 777, 1] if gpu else [37, 16, 1]
        prefill_case("prefill full varlen", full, full, None)
        chunk, window = ([300, 900], 256) if gpu else ([9, 33], 7)
        prefill_case("prefill chunked window", [new, 1, chunk[0]], [ctx, 50, chunk[1]], window)

        T, H = s.tokens, s.hidden
        x = torch.randn(T, H, device=self.dev, dtype=self.dtype)
        r = torch.randn(T, H, device=self.dev, dtype=self.dtype)
        w = torch.randn(H, device=self.dev, dtype=self.dtype)
        res["rms_norm"] = self.check("rms_norm", k.norm.rms_norm(x, w, 1e-5), k.norm.rms_norm_ref(x, w, 1e-5))
        ref_out, ref_res = k.norm.fused_add_rms_norm_ref(x, r, w, 1e-5)
        out, new_res = k.norm.fused_add_rms_norm(x, r.clone(), w, 1e-5)
        res["fused_add_rms_norm"] = self.check("fused_add_rms_norm", out, ref_out)
        res["fused_add_rms_norm residual"] = self.check("fused_add_rms_norm residual", new_res, ref_res)

        gu = torch.randn(T, 2 * s.intermediate, device=self.dev, dtype=self.dtype)
        res["silu_and_mul"] = self.check("silu_and_mul", k.act.silu_and_mul(gu), k.act.silu_and_mul_ref(gu))

        res.update(self._rope_check())
        if not self.cpu:
            res["decode cuda graph"] = self._graph_check()
        return res

    def _rope_inputs(self) -> tuple[Any, ...]:
        torch, s = self.torch, self.s
        T, Hq, Hkv, D = s.tokens, s.num_q_heads, s.num_kv_heads, s.head_dim
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=self.dev, dtype=self.dtype)
        q, k_, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k_, v = q.view(T, Hq, D), k_.view(T, Hkv, D), v.view(T, Hkv, D)  # strided views
        max_pos = 8192
        inv = 1.0 / 500000 ** (torch.arange(0, D, 2, device=self.dev).float() / D)
        ang = torch.arange(max_pos, device=self.dev).float()[:, None] * inv
        cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
        positions = torch.randint(0, max_pos, (T,), device=self.dev)
        num_pages = -(-T // s.page_size) + 8
        slots = torch.randperm(num_pages * s.page_size, device=self.dev)[:T]
        k_cache = torch.randn(num_pages, Hkv, s.page_size, D, device=self.dev, dtype=self.dtype)
        v_cache = torch.randn_like(k_cache)
        return q, k_, v, positions, cos_sin, k_cache, v_cache, slots

    def _rope_check(self) -> dict[str, Any]:
        q, k_, v, positions, cos_sin, k_cache, v_cache, slots = self._rope_inputs()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = self.k.kvk.rope_kv_write_ref(q, k_, v, positions, cos_sin, k_ref, v_ref, slots)
        q_out = self.k.kvk.rope_kv_write(q, k_, v, positions, cos_sin, k_cache, v_cache, slots)
        return {
            "rope q": self.check("rope_kv_write q", q_out, q_ref),
            "rope k cache": self.check("rope_kv_write k cache", k_cache, k_ref),
            "rope v cache exact": bool(self.torch.equal(v_cache, v_ref)),
        }

    def _graph_check(self) -> dict[str, Any]:
        torch, dk, s = self.torch, self.k.dk, self.s
        lens = [5, 3000, 64, 1, 700, 16]
        k_cache, v_cache, tables, seq_lens = self.paged_cache(lens)
        q = torch.randn(len(lens), s.num_q_heads, s.head_dim, device="cuda", dtype=self.dtype)
        run = lambda: dk.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.08, num_ctas=32)
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.tensor(lens[::-1], device="cuda", dtype=torch.int32))
        graph.replay()
        q32, k32, v32 = q.float(), k_cache.float(), v_cache.float()
        ref = dk.paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 0.08)
        return self.check("decode cuda graph replay (new inputs)", out, ref)

    def prefill_timing(self) -> dict[str, Any]:
        torch, pk, s = self.torch, self.k.pk, self.s
        n, new, ctx = s.prefill
        qlens, lens = [new] * n, [ctx] * n
        k_cache, v_cache, tables, seq_lens = self.paged_cache(lens)
        q = torch.randn(sum(qlens), s.num_q_heads, s.head_dim, device=self.dev, dtype=self.dtype)
        starts = torch.tensor([0, *accumulate(qlens)], device=self.dev, dtype=torch.int32)
        out = torch.empty_like(q)
        # causal FLOPs: each query at position p sees p + 1 keys; 2 GEMMs x 2 FLOPs per MAC
        keys = n * sum(p + 1 for p in range(ctx - new, ctx))
        flops = 4 * keys * s.num_q_heads * s.head_dim
        res: dict[str, Any] = {"flops": flops, "configs": []}
        blocks = [(64, 64, 4, 3)]  # (block_m, block_n, num_warps, num_stages); the first is the default
        if not self.cpu:
            blocks += [(64, 64, 4, 2), (64, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 4),
                       (64, 128, 8, 2)]
        for bm, bn, warps, stages in blocks:
            fn = lambda bm=bm, bn=bn, warps=warps, stages=stages: pk.paged_prefill_attention(
                q, k_cache, v_cache, tables, starts, seq_lens, 0.08, max_query_len=new, out=out,
                block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            entry: dict[str, Any] = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
            try:
                ms = self.bench(fn)
                entry.update(us=ms * 1e3, tflops=flops / ms / 1e9)
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            res["configs"].append(entry)
            print("  ", entry, flush=True)
        ref_ms = self.bench(
            lambda: pk.paged_prefill_attention_ref(q, k_cache, v_cache, tables, qlens, lens, 0.08)
        )
        res["ref_us"] = ref_ms * 1e3
        ok = [c for c in res["configs"] if "us" in c]
        if ok:
            best = min(ok, key=lambda c: c["us"])
            res["best"] = best
            self.table.append((f"prefill {n}x{new}/{ctx}", f"{best['us']:.0f} us, {best['tflops']:.0f} TF/s "
                               f"(ref {ref_ms * 1e3:.0f} us)"))  # fmt: skip
        return res

    def small_kernels(self) -> dict[str, Any]:
        torch, k, s = self.torch, self.k, self.s
        T, H, inter = s.tokens, s.hidden, s.intermediate
        esz = torch.finfo(self.dtype).bits // 8
        x = torch.randn(T, H, device=self.dev, dtype=self.dtype)
        r = torch.randn(T, H, device=self.dev, dtype=self.dtype)
        w = torch.randn(H, device=self.dev, dtype=self.dtype)
        gu = torch.randn(T, 2 * inter, device=self.dev, dtype=self.dtype)
        rope_args = self._rope_inputs()
        Hq, Hkv, D = s.num_q_heads, s.num_kv_heads, s.head_dim
        cases = {
            # name: (fast, ref, bytes moved by the fast kernel)
            "rms_norm": (lambda: k.norm.rms_norm(x, w, 1e-5), lambda: k.norm.rms_norm_ref(x, w, 1e-5),
                         2 * T * H * esz),
            "fused_add_rms_norm": (lambda: k.norm.fused_add_rms_norm(x, r, w, 1e-5),
                                   lambda: k.norm.fused_add_rms_norm_ref(x, r, w, 1e-5), 4 * T * H * esz),
            "silu_and_mul": (lambda: k.act.silu_and_mul(gu), lambda: k.act.silu_and_mul_ref(gu),
                             3 * T * inter * esz),
            "rope_kv_write": (lambda: k.kvk.rope_kv_write(*rope_args),
                              lambda: k.kvk.rope_kv_write_ref(*rope_args), 2 * T * (Hq + 2 * Hkv) * D * esz),
        }  # fmt: skip
        res: dict[str, Any] = {}
        for name, (fast, ref, nbytes) in cases.items():
            ms, ref_ms = self.bench(fast), self.bench(ref)
            res[name] = {"us": ms * 1e3, "ref_us": ref_ms * 1e3, "tbps": nbytes / ms / 1e9, "bytes": nbytes}
            summary = f"{ms * 1e3:.1f} us ({nbytes / ms / 1e9:.2f} TB/s), ref {ref_ms * 1e3:.1f} us"
            self.table.append((name, summary))
            print(f"   {name:20s} {ms * 1e3:8.1f} us  ref {ref_ms * 1e3:8.1f} us", flush=True)
        return res

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> None:
        self.section("env", self.env)
        self.section("copy_ceiling", self.copy_ceiling)
        self.section("correctness", self.correctness)
        self.section("decode_timing", self.decode_timing)
        self.section("prefill_timing", self.prefill_timing)
        if self.cpu or self.torch.cuda.get_device_capability() >= (8, 9):
            self.section("fp8_cache", self.fp8_cache)
        self.section("small_kernels", self.small_kernels)
        if not self.cpu and not self.args.no_overlap:
            self.section("overlap", self.overlap)
        self.section("decode_all_heads", self.decode_all_heads)
        if not self.args.no_sweep:
            self.section("decode_flatten", self.decode_flatten)  # last: an experimental compiler path
        self.save()
        ceiling = self.results.get("copy_ceiling", {}).get("tbps")
        print("\n" + "=" * 100)
        print(f"copy ceiling (read+write): {ceiling:.2f} TB/s" if ceiling else "copy ceiling: n/a")
        width = max(len(n) for n, _ in self.table)
        for name, value in self.table:
            print(f"{name:{width}s}  {value}")
        print(f"errors: {self.results['errors'] or 'none'}")
        print(f"wrote {Path(self.args.out) / 'kernel_check.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for kernel_check.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1")
    p.add_argument("--no-sweep", action="store_true", help="decode: time the default config only")
    p.add_argument("--no-overlap", action="store_true", help="skip the decode || GEMM measurement")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--decode-cases", default="",
                   help="decode shapes as BATCHxCONTEXT, comma list (default 256x1024,64x4096; smoke: 4x40,2x70)")
    p.add_argument("--only", default="", help="comma-separated sections to run (env and copy_ceiling always run), "
                   "e.g. decode_all_heads")
    args = p.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke")
    torch.manual_seed(0)
    Runner(args).run()


if __name__ == "__main__":
    main()
