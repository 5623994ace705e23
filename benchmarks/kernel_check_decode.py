"""The decode attention sections of benchmarks/kernel_check.py (its Runner inherits them): decode
bandwidth per grid cap with a sweep of launch configs, the per-head vs all-heads kernels on
capped grids, the flattened loop nest, the fp8 cache, and decode on a capped grid beside a GEMM
on a second stream. They use the Runner's state: self.k (the kernel modules), self.s (shapes),
self.torch, self.bench, self.results, self.table, self.paged_cache, self.kv_bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from stream_pair import stream_pair


def rel_err(out: Any, ref: Any) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class DecodeChecks:
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
                gated = cfg.sm_gate and num_ctas is not None and not self.cpu
                counts = torch.zeros(2 + 2 * self.sms, dtype=torch.int32, device=self.dev) if gated else None
                dk.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.08, None, num_ctas, out=out,
                                          config=cfg, gate_counts=counts)
                finite = bool(torch.isfinite(out).all())
                entry["rel_err_vs_ref"] = rel_err(out, ref_out[0]) if finite else float("nan")
                if counts is not None:  # where the gated programs landed (pipeline_step's census, too)
                    entry["gate_census"] = dk.gate_census(counts, self.sms, cfg.gate_ctas_per_sm)
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
        """Per-head decode kernel (today's default) vs the all-heads kernel on capped grids: TB/s
        of K+V at s.compare_ctas CTAs, each kernel's default and the best of a small sweep (the
        best checked against the reference), for every decode case; one table."""
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
        all_heads = [AH(), AH(batched_dot=False, num_stages=5)]
        if not self.cpu:
            all_heads = [
                AH(), AH(num_stages=5), AH(batched_dot=False), AH(batched_dot=False, num_stages=5),
                AH(kv_heads_per_item=4), AH(kv_heads_per_item=4, num_stages=7), AH(kv_heads_per_item=2),
            ]  # fmt: skip
        # all-heads behind the SM gate (two programs on each SM of the share, work from an atomic
        # counter): configs of which two fit one SM (4 warps, <= 255 registers, <= 113 KiB shared;
        # benchmarks/decode_sass.py shows the fit)
        G = lambda **kw: AH(sm_gate=True, num_warps=4, **kw)
        gated = [G(kv_heads_per_item=4, num_stages=5)]
        if not self.cpu:
            # the 2-D dot at 4 heads: the 4 x 4 query rows fill one 16-row MMA tile, 340 SASS
            # instructions a 32 KiB step instead of 390 and 128 registers instead of 198, so three or
            # four programs fit an SM (decode_sass.py --gate --heads 4 --flat)
            F = lambda n, st: G(kv_heads_per_item=4, batched_dot=False, gate_ctas_per_sm=n, num_stages=st)
            gated += [G(kv_heads_per_item=4, num_stages=3), G(kv_heads_per_item=8, num_stages=3),
                      F(2, 5), F(3, 5), F(4, 3), F(2, 7)]
            # the share on even SM ids only (GATED_EVEN): alone the same bytes in fp8, but
            # the bf16 kernel is bandwidth-bound, and a share spread over the GPU may move more
            gated += [dk.GATED_EVEN, dataclasses.replace(F(3, 5), gate_smid_stride=2)]
        # and the engine's capped kernel (a pipeline's decode attention): all heads, work from a counter,
        # no gate; two programs per SM of the share
        kinds = {"per_head": per_head, "all_heads": all_heads, "gated": gated, "capped": [dk.CAPPED]}
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
                        if "gate_census" in best:
                            print(f"   decode {b}x{ctx} ctas={n:3d} gated census: {best['gate_census']}", flush=True)
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
                self.table.append((f"decode {b}x{ctx} ctas={n} per-head / all-heads / gated / capped",
                                   " / ".join(f"{row[k]:.2f}" for k in kinds) + " TB/s"))  # fmt: skip
            res[f"{b}x{ctx}"] = case
        ceiling = self.results.get("copy_ceiling", {}).get("tbps")
        print(f"\n   TB/s of K+V, best of each kernel's sweep (copy ceiling {ceiling or nan:.2f} TB/s)")
        print(f"   {'case':10s} {'ctas':>4s} {'per-head':>9s} {'all-heads':>9s} {'gated':>9s} {'capped':>9s}  "
              "best all-heads / gated config")
        for r in rows:
            print(f"   {r['case']:10s} {r['ctas']:4d} {r['per_head']:9.2f} {r['all_heads']:9.2f} {r['gated']:9.2f} "
                  f"{r['capped']:9.2f}  "
                  f"{r['all_heads_config']} / {r['gated_config']}")  # fmt: skip
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
        # the all-heads kernel too: per token it does the per-head kernel's dot work in fewer, fuller MMA
        # tiles (the 2-D dot at 4 heads fills its 16 rows), which matters more once the bytes halve
        AH = lambda **kw: dk.DecodeConfig(all_heads=True, **kw)  # noqa: E731
        cfgs += [AH(), AH(kv_heads_per_item=4)]
        if not self.cpu:
            cfgs += [AH(kv_heads_per_item=4, batched_dot=False), AH(kv_heads_per_item=4, batched_dot=False,
                                                                    num_stages=5), AH(num_stages=5)]
        trials = [time_cfg(cfg, None, verify=True) for cfg in cfgs]
        # and the engine's capped kernel (a pipeline's decode attention) on a third and a half of the SMs
        capped = {n: time_cfg(dk.CAPPED, n, verify=True) for n in (() if self.cpu else (44, 66))}
        for n, t in capped.items():
            print(f"   fp8 decode {b}x{ctx} capped at {n} CTAs: {t.get('tbps', float('nan')):.2f} TB/s of fp8 cache "
                  f"({t.get('error', 'rel_err ' + format(t.get('rel_err_vs_ref', float('nan')), '.1e'))})", flush=True)
        ok = [t for t in trials if "tbps" in t]
        best = max(ok, key=lambda t: t["tbps"]) if ok else {}
        bf16_us = self._decode_timer(b, ctx)[0](dk.DecodeConfig(), None).get("us", float("nan"))
        if best:
            print(f"   fp8 decode {b}x{ctx}: default {ok[0]['us']:.0f} us, best {best['us']:.0f} us "
                  f"({best['tbps']:.2f} TB/s of fp8 cache, rel_err {best['rel_err_vs_ref']:.1e}) vs bf16 cache "
                  f"{bf16_us:.0f} us; {best['config']}", flush=True)  # fmt: skip
            self.table.append((f"fp8 decode {b}x{ctx}", f"{best['us']:.0f} us ({best['tbps']:.2f} TB/s), bf16 "
                               f"{bf16_us:.0f} us, rel_err {best['rel_err_vs_ref']:.1e}"))
        return {"trials": trials, "best": best, "same_context_bf16_us": bf16_us, "capped": capped}

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
        t_gemm = self.bench(gemm)
        t_full = self.bench(dec(None))
        res: dict[str, Any] = {"gemm_us": t_gemm * 1e3, "decode_all_sms_us": t_full * 1e3}
        for n in (16, 32, 48, 66):
            t_dec = self.bench(dec(n))
            k_gemms = max(1, round(t_dec / t_gemm))  # a balanced pair
            gemms = lambda k_gemms=k_gemms: [gemm() for _ in range(k_gemms)]
            t_g = self.bench(gemms)
            t_both = self.bench(stream_pair(dec(n), gemms))
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
