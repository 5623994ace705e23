"""Checks and times the Triton kernels against their references on Llama-3-8B shapes.

GPU:  python benchmarks/kernel_check.py --out DIR            (writes DIR/kernel_check.json)
CPU:  python benchmarks/kernel_check.py --out DIR --cpu-smoke (tiny shapes, Triton interpreter)

Sections: copy ceiling (device-to-device copy), correctness of every kernel vs its reference,
decode attention bandwidth at batch 256 x 1024 and 64 x 4096 for num_ctas None/16/32/66 (with a
sweep of launch configs), prefill attention, the small fused kernels vs their references, a CUDA
graph capture, (optional) decode on a capped grid overlapped with a GEMM on another stream, and
decode_all_heads: the per-head decode kernel vs the all-heads one (DecodeConfig(all_heads=True))
at 16/32/44/66/132 CTAs, one table. `--only decode_all_heads` runs just that (plus env and copy).
Imports only torch, triton and nanoflow.kernels.
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


def rel_err(out: Any, ref: Any) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Runner:
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

    def decode_timing(self) -> dict[str, Any]:
        sweep = self._decode_sweep()
        return {f"{b}x{ctx}": self._decode_case(b, ctx, sweep) for b, ctx in self.s.decode_cases}

    def _decode_timer(self, b: int, ctx: int, cache_dtype: Any = None
                      ) -> tuple[Callable[..., dict[str, Any]], Callable[[], Any]]:
        """time_cfg(config, num_ctas) on b sequences of ctx tokens (with verify=True it also checks
        the output against the reference), and the reference as a function. cache_dtype: the KV
        cache's, e.g. float8_e4m3fn (default: the dtype of q)."""
        torch, dk, s = self.torch, self.k.dk, self.s
        lens = [ctx] * b
        k_cache, v_cache, tables, seq_lens = self.paged_cache(lens)
        if cache_dtype is not None:
            k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
        q = torch.randn(b, s.num_q_heads, s.head_dim, device=self.dev, dtype=self.dtype)
        out = torch.empty_like(q)
        # K and V of every context token, read once, in the cache's bytes
        nbytes = self.kv_bytes(lens) * k_cache.element_size() // q.element_size()

        ref = lambda: dk.paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.08)
        ref_out: list[Any] = []

        def time_cfg(cfg: Any, num_ctas: int | None, verify: bool = False) -> dict[str, Any]:
            fn = lambda: dk.paged_decode_attention(
                q, k_cache, v_cache, tables, seq_lens, 0.08, None, num_ctas, out=out, config=cfg
            )
            entry: dict[str, Any] = {"config": dataclasses.asdict(cfg), "kv_bytes": nbytes}
            try:
                ms = self.bench(fn)
            except Exception as e:  # e.g. out of shared memory for the deepest pipelines
                return {**entry, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            entry.update(us=ms * 1e3, tbps=nbytes / ms / 1e9)
            if verify:  # a fast config must also be a correct one (vs the bf16 reference)
                ref_out[:] = ref_out or [ref()]
                out.fill_(float("nan"))
                fn()
                finite = bool(torch.isfinite(out).all())
                entry["rel_err_vs_ref"] = rel_err(out, ref_out[0]) if finite else float("nan")
            return entry

        return time_cfg, ref

    def _decode_case(self, b: int, ctx: int, sweep: list[Any]) -> dict[str, Any]:
        dk, s = self.k.dk, self.s
        time_cfg, ref = self._decode_timer(b, ctx)
        case: dict[str, Any] = {}

        def better(best: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
            return trial if trial.get("tbps", 0.0) > best.get("tbps", 0.0) else best

        ref_ms = self.bench(ref)
        case["ref_us"] = ref_ms * 1e3
        for num_ctas in s.ctas:
            key = f"ctas={num_ctas or 'all'}"
            best = default = time_cfg(dk.DecodeConfig(), num_ctas)
            trials = [time_cfg(cfg, num_ctas) for cfg in sweep]
            for t in trials:
                best = better(best, t)
            if sweep and "tbps" in best:  # then the partition size and grid, on the best pipeline shape
                variants = [{"partition_size": p} for p in (512, 1024, 2048, ctx)]  # ctx: no reduce kernel
                if num_ctas is None:
                    variants += [{"ctas_per_sm": n} for n in (1, 4)]
                base = best["config"]
                for v in variants:
                    trials.append(t := time_cfg(dk.DecodeConfig(**{**base, **v}), num_ctas))
                    best = better(best, t)
            if "config" in best and "tbps" in best:
                best = time_cfg(dk.DecodeConfig(**best["config"]), num_ctas, verify=True)
            case[key] = {"default": default, "best": best, "sweep": trials}
            d_bw, b_bw = default.get("tbps", float("nan")), best.get("tbps", float("nan"))
            err = best.get("rel_err_vs_ref", float("nan"))
            print(f"   decode {b}x{ctx} {key:9s} default {d_bw:.2f} TB/s; best {b_bw:.2f} TB/s "
                  f"(rel_err {err:.1e}) {best['config']}", flush=True)  # fmt: skip
            ceiling = self.results.get("copy_ceiling", {}).get("tbps")
            frac = f" ({b_bw / ceiling:.0%} of copy)" if ceiling else ""
            self.table.append((f"decode {b}x{ctx} {key}", f"default {d_bw:.2f} / best {b_bw:.2f} TB/s{frac}"))
        self.table.append((f"decode {b}x{ctx} ref", f"{ref_ms * 1e3:.0f} us"))
        return case

    def decode_all_heads(self) -> dict[str, Any]:
        """Per-head decode kernel (today's default) vs the all-heads kernel vs the TMA kernel on
        capped grids: TB/s of K+V at s.compare_ctas CTAs, each kernel's default and the best of a
        small sweep (the best checked against the reference), for every decode case; one table."""
        dk, s = self.k.dk, self.s
        C = dk.DecodeConfig
        # per-head: the default, the sweep's deep-pipeline shapes, and the best configs decode_timing
        # found for the case (when it ran)
        per_head = [C()]
        if not self.cpu:
            per_head += [C(block_n=64, num_warps=8, num_stages=8), C(block_n=64, num_warps=4, num_stages=6),
                         C(block_n=128, num_warps=8, num_stages=6)]  # fmt: skip
        # all-heads (Llama-3-8B: 8 kv heads x 128, bf16): 64 KiB steps at 3 / 1 / 2 in flight, the
        # 2-D dot, 4 or 2 kv heads per item with deeper pipelines, 32-token steps
        AH = lambda **kw: C(all_heads=True, **kw)
        T = lambda **kw: C(tma=True, **kw)
        all_heads = [AH(), AH(batched_dot=False, num_stages=5)]
        tma = [T(), T(kv_heads_per_item=1, num_stages=4)]
        if not self.cpu:
            all_heads = [
                AH(), AH(num_stages=5), AH(batched_dot=False), AH(batched_dot=False, num_stages=5),
                AH(kv_heads_per_item=4), AH(kv_heads_per_item=4, num_stages=7), AH(kv_heads_per_item=2),
            ]  # fmt: skip
            # TMA: 64 KiB steps (8 heads) at 2-3 buffers, 4 / 8 warps; 32 / 16 KiB steps deeper
            tma = [
                T(), T(num_stages=2), T(num_warps=8), T(num_stages=4),
                T(kv_heads_per_item=4, num_stages=4), T(kv_heads_per_item=4, num_stages=6),
                T(kv_heads_per_item=2, num_stages=8), T(kv_heads_per_item=4, num_stages=6, num_warps=8),
            ]  # fmt: skip
        kinds = {"per_head": per_head, "all_heads": all_heads, "tma": tma}
        default_cfg = dataclasses.asdict(C())
        nan = float("nan")
        res: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for b, ctx in s.decode_cases:
            time_cfg, _ = self._decode_timer(b, ctx)
            found = self.results.get("decode_timing", {}).get(f"{b}x{ctx}", {})
            extra = [C(**e["best"]["config"]) for e in found.values() if isinstance(e, dict) and "config" in e["best"]]
            kinds["per_head"] = list(dict.fromkeys(per_head + [c for c in extra if not c.all_heads]))
            case: dict[str, Any] = {}
            for n in s.compare_ctas:
                entry: dict[str, Any] = {}
                row: dict[str, Any] = {"case": f"{b}x{ctx}", "ctas": n}
                for kind, cfgs in kinds.items():
                    trials = [time_cfg(c, n) for c in cfgs]
                    ok = [t for t in trials if "tbps" in t]
                    if kind != "per_head" and ok and not self.cpu:  # then the partition size
                        base = max(ok, key=lambda t: t["tbps"])["config"]
                        trials += [time_cfg(C(**{**base, "partition_size": p}), n) for p in (256, 512, 1024)]
                        ok = [t for t in trials if "tbps" in t]
                    best = max(ok, key=lambda t: t["tbps"]) if ok else {}
                    if best:
                        best = time_cfg(C(**best["config"]), n, verify=True)
                    entry[kind] = {"default": trials[0], "best": best, "trials": trials}
                    row[kind] = best.get("tbps", nan)
                    row[f"{kind}_default"] = trials[0].get("tbps", nan)
                    row[f"{kind}_rel_err"] = best.get("rel_err_vs_ref", nan)
                    row[f"{kind}_config"] = {k: v for k, v in best.get("config", {}).items() if v != default_cfg.get(k)}
                    if not ok:
                        row[f"{kind}_error"] = trials[0].get("error", "")
                case[f"ctas={n}"] = entry
                rows.append(row)
                print(f"   decode {b}x{ctx} ctas={n:3d}: " + ", ".join(
                    f"{k} {row[k + '_default']:.2f} / best {row[k]:.2f} TB/s (rel_err {row[k + '_rel_err']:.1e}) "
                    f"{row[k + '_config'] or row.get(k + '_error', '')}" for k in kinds), flush=True)  # fmt: skip
                self.table.append((f"decode {b}x{ctx} ctas={n} per-head / all-heads / tma",
                                   " / ".join(f"{row[k]:.2f}" for k in kinds) + " TB/s"))  # fmt: skip
            res[f"{b}x{ctx}"] = case
        ceiling = self.results.get("copy_ceiling", {}).get("tbps")
        print(f"\n   TB/s of K+V, best of each kernel's sweep (copy ceiling {ceiling or nan:.2f} TB/s)")
        print(f"   {'case':10s} {'ctas':>4s} {'per-head':>9s} {'all-heads':>9s} {'tma':>6s}  best tma config")
        for r in rows:
            print(f"   {r['case']:10s} {r['ctas']:4d} {r['per_head']:9.2f} {r['all_heads']:9.2f} {r['tma']:6.2f}  "
                  f"{r['tma_config']}")  # fmt: skip
        res["table"] = rows
        return res

    def decode_flatten(self) -> dict[str, Any]:
        """The best decode config of each case again with tl.range(flatten=True) on the work loop."""
        res: dict[str, Any] = {}
        for name, case in self.results.get("decode_timing", {}).items():
            b, ctx = (int(x) for x in name.split("x"))
            time_cfg, _ = self._decode_timer(b, ctx)
            for key, entry in case.items():
                if not key.startswith("ctas=") or "config" not in entry["best"]:
                    continue
                num_ctas = None if key == "ctas=all" else int(key.split("=")[1])
                cfg = self.k.dk.DecodeConfig(**{**entry["best"]["config"], "flatten": True})
                t = time_cfg(cfg, num_ctas, verify=True)
                res[f"{name} {key}"] = {**t, "unflattened_tbps": entry["best"]["tbps"]}
                was = entry["best"]["tbps"]
                print(f"   {name} {key:9s} flatten: {t.get('tbps', t.get('error'))} TB/s "
                      f"(rel_err {t.get('rel_err_vs_ref')}) vs {was:.2f} TB/s", flush=True)  # fmt: skip
                self.table.append((f"decode {name} {key} flatten", f"{t.get('tbps', float('nan')):.2f} TB/s"))
        return res

    def fp8_cache(self) -> dict[str, Any]:
        """Decode (all SMs) and prefill attention over a float8_e4m3fn cache: half the bytes of bf16,
        so the same context should take about half the time; checked against the reference."""
        torch, pk, s = self.torch, self.k.pk, self.s
        fp8 = torch.float8_e4m3fn
        res: dict[str, Any] = {}
        for b, ctx in s.decode_cases:
            res[f"decode {b}x{ctx}"] = self._fp8_decode_case(b, ctx)
        n, new, ctx = s.prefill
        k16, v16, tables, seq_lens = self.paged_cache([ctx] * n)
        k8, v8 = k16.to(fp8), v16.to(fp8)
        q = torch.randn(n * new, s.num_q_heads, s.head_dim, device=self.dev, dtype=self.dtype)
        qsl = torch.arange(0, (n + 1) * new, new, device=self.dev, dtype=torch.int32)
        run = lambda kc, vc: pk.paged_prefill_attention(q, kc, vc, tables, qsl, seq_lens, 0.08, max_query_len=new)
        ref = pk.paged_prefill_attention_ref(q, k8, v8, tables, [new] * n, [ctx] * n, 0.08)
        t8, t16 = self.bench(lambda: run(k8, v8)), self.bench(lambda: run(k16, v16))
        res["prefill"] = {"fp8_us": t8 * 1e3, "bf16_us": t16 * 1e3, "rel_err_vs_ref": rel_err(run(k8, v8), ref)}
        print(f"   fp8 prefill {n}x{new}/{ctx}: {t8 * 1e3:.0f} us vs bf16 cache {t16 * 1e3:.0f} us", flush=True)
        self.table.append((f"fp8 prefill {n}x{new}/{ctx}", f"{t8 * 1e3:.0f} us, bf16 {t16 * 1e3:.0f} us, rel_err "
                           f"{res['prefill']['rel_err_vs_ref']:.1e}"))
        return res

    def _fp8_decode_case(self, b: int, ctx: int) -> dict[str, Any]:
        dk = self.k.dk
        time_cfg, _ = self._decode_timer(b, ctx, self.torch.float8_e4m3fn)
        shapes = [] if self.cpu else [(128, 8, 4), (256, 8, 4), (128, 8, 6), (256, 8, 6), (64, 4, 8), (32, 4, 8)]
        cfgs = [dk.DecodeConfig()] + [dk.DecodeConfig(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in shapes]
        trials = [time_cfg(cfg, None, verify=True) for cfg in cfgs]
        ok = [t for t in trials if "tbps" in t]
        best = max(ok, key=lambda t: t["tbps"]) if ok else {}
        bf16_us = self._decode_timer(b, ctx)[0](dk.DecodeConfig(), None).get("us", float("nan"))
        if best:
            print(f"   fp8 decode {b}x{ctx}: default {ok[0]['us']:.0f} us, best {best['us']:.0f} us "
                  f"({best['tbps']:.2f} TB/s of fp8 cache, rel_err {best['rel_err_vs_ref']:.1e}) vs bf16 cache "
                  f"{bf16_us:.0f} us; {best['config']}", flush=True)  # fmt: skip
            self.table.append((f"fp8 decode {b}x{ctx}", f"{best['us']:.0f} us ({best['tbps']:.2f} TB/s), bf16 "
                               f"{bf16_us:.0f} us, rel_err {best['rel_err_vs_ref']:.1e}"))
        return {"trials": trials, "best": best, "same_context_bf16_us": bf16_us}

    def _decode_sweep(self) -> list[Any]:
        DecodeConfig = self.k.dk.DecodeConfig
        if self.cpu:
            return [DecodeConfig(block_n=16, partition_size=32), DecodeConfig(block_n=32)]
        if self.args.no_sweep:
            return []
        # (block_n, num_warps, num_stages), as in the fp8 sweep.
        # K/V tiles in flight per CTA ~ (num_stages - 2) / 2 (the page-table load takes its own
        # stages), so a capped grid needs deep pipelines: 32 CTAs x ~100 KB in flight ~ 2.5 TB/s.
        shapes = [(32, 4, 4), (64, 4, 3), (64, 8, 4), (128, 8, 4), (32, 4, 8), (32, 4, 12), (64, 4, 6), (64, 8, 6),
                  (64, 8, 8), (64, 8, 10), (64, 8, 12), (128, 8, 6), (128, 8, 8)]
        return [DecodeConfig(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in shapes]

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

    def overlap(self) -> dict[str, Any]:
        """Decode (capped grid, launched first) beside the gate_up GEMM on a second stream."""
        torch, dk, s = self.torch, self.k.dk, self.s
        b, ctx = s.decode_cases[0]
        k_cache, v_cache, tables, seq_lens = self.paged_cache([ctx] * b)
        q = torch.randn(b, s.num_q_heads, s.head_dim, device="cuda", dtype=self.dtype)
        out = torch.empty_like(q)
        a = torch.randn(2048, s.hidden, device="cuda", dtype=self.dtype)
        wt = torch.randn(2 * s.intermediate, s.hidden, device="cuda", dtype=self.dtype)
        gemm = lambda: torch.nn.functional.linear(a, wt)
        best_cfg = self._best_decode_cfgs()
        dec = lambda n: lambda: dk.paged_decode_attention(
            q, k_cache, v_cache, tables, seq_lens, 0.08, None, n, out=out, config=best_cfg.get(n)
        )
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def pair(f1: Callable[[], Any], f2: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                cur = torch.cuda.current_stream()
                s1.wait_stream(cur)
                s2.wait_stream(cur)
                with torch.cuda.stream(s1):
                    f1()
                with torch.cuda.stream(s2):
                    f2()
                cur.wait_stream(s1)
                cur.wait_stream(s2)

            return run

        t_gemm = self.bench(gemm)
        t_full = self.bench(dec(None))
        res: dict[str, Any] = {"gemm_us": t_gemm * 1e3, "decode_all_sms_us": t_full * 1e3}
        for n in (16, 32, 48, 66):
            t_dec = self.bench(dec(n))
            k_gemms = max(1, round(t_dec / t_gemm))  # a balanced pair
            gemms = lambda k_gemms=k_gemms: [gemm() for _ in range(k_gemms)]
            t_g = self.bench(gemms)
            t_both = self.bench(pair(dec(n), gemms))
            best_seq = t_full + t_g  # a good non-overlapped engine: decode on every SM, then the GEMMs
            res[f"ctas={n}"] = {
                "decode_us": t_dec * 1e3, "gemms": k_gemms, "gemms_us": t_g * 1e3,
                "together_us": t_both * 1e3, "sequential_best_us": best_seq * 1e3, "gain": best_seq / t_both,
            }  # fmt: skip
            print(f"   ctas={n}: decode {t_dec * 1e3:.0f} us + {k_gemms} gemm {t_g * 1e3:.0f} us -> together "
                  f"{t_both * 1e3:.0f} us vs sequential best {best_seq * 1e3:.0f} us "
                  f"({best_seq / t_both:.2f}x)", flush=True)  # fmt: skip
            self.table.append((f"overlap ctas={n}", f"{best_seq / t_both:.2f}x vs sequential best"))
        return res

    def _best_decode_cfgs(self) -> dict[int | None, Any]:
        """Best config per num_ctas from the decode timing of the first case, if it ran."""
        timing = self.results.get("decode_timing", {})
        b, ctx = self.s.decode_cases[0]
        case = timing.get(f"{b}x{ctx}", {})
        cfgs: dict[int | None, Any] = {}
        for n in (None, 16, 32, 48, 66):
            best = case.get(f"ctas={n or 'all'}", {}).get("best", {})
            if "config" in best:
                cfgs[n] = self.k.dk.DecodeConfig(**best["config"])
        return cfgs

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
