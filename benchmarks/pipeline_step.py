"""One iteration, sequential vs nano-batch pipelines, on the GPU: graph replays of the same batch.

Builds the engine's runner for a dummy model (random weights of the real shape, no graphs of its
own), makes one step of `--decodes` decode sequences at `--context` tokens each plus one prefill
chunk filling the token budget, and times a CUDA-graph replay of that step for the sequential
schedule and for NanoFlow's two-nano-batch schedule at each split and decode-attention SM cap.
A first look at what overlap gains on this GPU before `nanoflow tune` searches it properly.

    python benchmarks/pipeline_step.py --dummy llama3-8b --decodes 440 --context 708 \\
        --splits 512,768,1024 --ctas 16,32,44,66 --kernels per_head,all_heads,gated --gemm-ctas none,auto \\
        --beside qkv,mlp --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.entrypoints.llm import LLM
from nanoflow.executor.step_plan import StepPlan
from nanoflow.kernels import decode_attention as dk
from nanoflow.kernels.decode_attention import CAPPED, GATED_EVEN, DecodeConfig
from nanoflow.kernels.decode_common import FP8_MANY
from nanoflow.layers.op import run_sequential
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.schedule import overlap_schedule, pingpong_schedule, unit_sms
from nanoflow.tune.timing import Timer, graph_replay_error

# decode kernel configs for the capped grid (DecodeAttention.capped_config)
CAPPED_KERNELS = {"per_head": DecodeConfig(), "all_heads": DecodeConfig(all_heads=True),
                  # the engine's default: two programs per SM of the share, from a counter
                  "counter": CAPPED,
                  # the same behind the SM gate, even SM ids (the default until 2026-11-30)
                  "gated": GATED_EVEN,
                  # the 2-D dot, three programs an SM (kernel_check's gated sweep)
                  "gated_2d": DecodeConfig(all_heads=True, sm_gate=True, kv_heads_per_item=4, batched_dot=False,
                                           gate_ctas_per_sm=3, num_warps=4, num_stages=5),
                  # the gate taking any SM first-come (the engine's takes even SM ids only)
                  "gated_any": dataclasses.replace(GATED_EVEN, gate_smid_stride=1),
                  # no gate: the fp8 all-SM default's shape on num_ctas programs, striding or from the counter
                  "heads4": FP8_MANY, "heads4_dynamic": dataclasses.replace(FP8_MANY, dynamic=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b")
    p.add_argument("--decodes", type=int, default=440)
    p.add_argument("--context", type=int, default=708)
    p.add_argument("--tokens", type=int, default=2048, help="the step's token count (decodes + one prefill chunk)")
    p.add_argument("--splits", default="512,768,1024")
    p.add_argument("--ctas", default="16,32,44,66")
    p.add_argument("--kernels", default="per_head",
                   help="decode kernels on the capped grid, comma list of: " + ", ".join(CAPPED_KERNELS))
    p.add_argument("--gemm-ctas", default="none",
                   help="comma list of caps for the GEMMs beside the capped decode: none (cuBLAS on the whole "
                   "GPU), auto (the persistent Triton GEMM on the SMs the decode leaves), or a number")
    p.add_argument("--beside", default="qkv,mlp",
                   help="what decode attention overlaps, comma list of: qkv (NanoFlow's order), mlp (the other "
                   "nano-batch's o and FFN; pipeline.schedule.overlap_schedule), pingpong (each nano-batch on a "
                   "stream of its own, decode attention capped on both: pingpong_schedule), pingpong1 (the same "
                   "on one stream: its output error without the concurrency)")
    p.add_argument("--priority", default="high",
                   help="the side stream's priority, comma list of: high (the engine's), normal (the forward's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="fp8 halves attention's bytes and doubles the decodes a pool holds (GEMMs of a decode "
                   "step then further past the ridge)")
    p.add_argument("--attention-ctas", default=None,
                   help="also time the step's decode attention alone, every layer's, on these SM caps (comma "
                   "list; all = uncapped), in TB/s of K+V: the engine's op as the tune profile runs it")
    p.add_argument("--spread", action="store_true",
                   help="decode contexts spread from --context/2 to ~3x--context/2 (as the tune profile's) "
                   "instead of all equal")
    p.add_argument("--attention-variants", default="",
                   help="with --attention-ctas, also these batches, comma list of: spread (contexts as --spread), "
                   "shuffled (pages in random order, as kernel_check's; synthetic steps number them "
                   "consecutively), spread+shuffled, direct (the kernel called straight, as kernel_check "
                   "does, in steps from the engine's call to kernel_check's: contiguous q, the count from the "
                   "host, a cache of just the step's pages)")
    p.add_argument("--green", action="store_true",
                   help="also each capped schedule on two CUDA green contexts, SM partitions the GPU enforces "
                   "(NanoFlow's execution units): stream 1 (decode attention; in ping-pong nano-batch 1) on the "
                   "decode cap's SMs, stream 0 on the rest, each rounded down to a multiple of 8")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    llm = LLM(dummy_model_dir(args.dummy), load_format="dummy", skip_tokenizer_init=True, pipeline="off",
              cuda_graph_max_tokens=0, max_num_batched_tokens=args.tokens, kv_cache_dtype=args.kv_cache_dtype)
    runner = llm.engine.runner
    model = runner.model
    batch = step(runner, args.decodes, args.context, args.tokens - args.decodes, args.spread, False)
    names = [op.name for op in model.layer_ops[0]]
    sms = torch.cuda.get_device_properties(runner.device).multi_processor_count
    results = {"args": vars(args), "device": torch.cuda.get_device_name(), "build_s": time.perf_counter() - t0}

    def save() -> None:  # after each part, so a run cut short keeps what it measured
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "pipeline_step.json").write_text(json.dumps(results, indent=1))

    with torch.inference_mode():
        timer = Timer(runner.device, warmup=2, repeats=args.reps)  # CUDA-graph replays
        seq_ms = timer.ms(lambda: model(batch))
        results["sequential_ms"] = seq_ms
        print(f"sequential: {seq_ms:.2f} ms", flush=True)
        if args.attention_ctas:
            results["attention_alone"] = {}
            for kernel in args.kernels.split(","):
                print(f"capped kernel {kernel}:", flush=True)
                for layer in model.layers:
                    layer.decode_attention.capped_config = CAPPED_KERNELS[kernel]
                results["attention_alone"][kernel] = attention_alone(model, batch, runner, timer, args.attention_ctas)
            for v in filter(None, args.attention_variants.split(",")):
                if v == "direct":
                    results["attention_direct"] = attention_direct(model, batch, runner, timer, args.attention_ctas)
                    continue
                print(f"batch variant {v}:", flush=True)
                other = step(runner, args.decodes, args.context, args.tokens - args.decodes, "spread" in v,
                             "shuffled" in v)
                results["attention_alone"][v] = attention_alone(model, other, runner, timer, args.attention_ctas)
            save()
        want = model(batch)  # the sequential forward's hidden states, what every pipeline must compute
        results["sequential_graph_rel_error"] = floor = graph_replay_error(lambda: model(batch), want)
        print(f"sequential, graph replays against eager: rel. error {floor:.2g}", flush=True)
        rows = results["pipelined"] = []
        for kernel in args.kernels.split(","):
            for layer in model.layers:
                layer.decode_attention.capped_config = CAPPED_KERNELS[kernel]
            for split, ctas, gemm, beside, priority, green in itertools.product(
                    map(int, args.splits.split(",")), caps(args.ctas), args.gemm_ctas.split(","),
                    args.beside.split(","), args.priority.split(","), (False, True) if args.green else (False,)):
                gemm_ctas = None if gemm == "none" or ctas is None else sms - ctas if gemm == "auto" else int(gemm)
                schedule = two_batches(names, args.tokens, split, ctas, gemm_ctas, beside)
                if green:  # both streams on execution units (Schedule.units)
                    if schedule.num_streams != 2:
                        continue
                    schedule = dataclasses.replace(schedule, units=unit_sms(ctas or sms // 2, sms))
                what = f"{kernel:9s} {beside:3s} {priority:6s} {'green ' if green else ''}split {split:5d} ctas {ctas}"
                try:  # a green context this GPU does not give raises here too
                    ex = PipelineExecutor(schedule, model.layer_ops, runner.device, side_priority=priority == "high")
                    parts = ex.split(batch, model.prepare)
                    forward = partial(lambda ex, parts: model(batch, partial(ex.run, parts=parts)), ex, parts)
                    ms = timer.ms(forward)
                    err = graph_replay_error(forward, want)
                except Exception as e:  # e.g. a kernel config that does not compile on this GPU
                    print(f"{what} gemm {gemm_ctas}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append({"kernel": kernel, "beside": beside, "split": split, "decode_ctas": ctas,
                             "gemm_ctas": gemm_ctas, "priority": priority, "green": green, "ms": ms,
                             "speedup": seq_ms / ms, "rel_error": err})
                print(f"{what} gemm ctas {gemm_ctas}: {ms:.2f} ms ({seq_ms / ms:.3f}x), rel. error {err:.2g}",
                      flush=True)
    save()


def caps(text: str) -> list[int | None]:
    """SM caps from a comma list (all: uncapped)."""
    return [None if c == "all" else int(c) for c in text.split(",")]


def two_batches(names: list[str], tokens: int, split: int, ctas: int | None, gemm_ctas: int | None,
                beside: str) -> Any:
    """The two-nano-batch schedule of --beside: ping-pong (its GEMMs uncapped) or an overlap order."""
    if beside.startswith("pingpong"):
        s = pingpong_schedule(names, tokens, split, split + 1, ctas)
        return s.on_one_stream() if beside == "pingpong1" else s
    return overlap_schedule(names, tokens, split, split + 1, ctas, gemm_ctas=gemm_ctas, beside=beside)


def kv_bytes(batch: Any, k_cache: Any) -> int:
    """Bytes of K and V the step's decodes read in one layer (cache [pages, kv heads, page, dim])."""
    return int(sum(batch.seq_lens_cpu[: batch.num_decodes])) * 2 * k_cache.shape[1] * k_cache.shape[3] * \
        k_cache.element_size()


def step(runner: Any, decodes: int, context: int, chunk: int, spread: bool, shuffled: bool) -> Any:
    """A built step of `decodes` decodes and one prefill chunk. spread: contexts from L/2 to ~3L/2, as
    nanoflow tune's profile makes them (tune.profile.mixed_plan); shuffled: pages in random order."""
    contexts = [context // 2 + (i * 37 % 64) * context // 64 if spread else context for i in range(decodes)]
    plan = StepPlan.synthetic(contexts, [(0, chunk)] if chunk else [], runner.arch.vocab_size)
    pages = sum(len(t) for t in plan.tables)
    if pages > runner.num_pages:
        raise SystemExit(f"the step needs {pages} KV pages, the pool holds {runner.num_pages}: fewer --decodes or "
                         "a shorter --context")
    if shuffled:
        perm = torch.randperm(runner.num_pages, generator=torch.Generator().manual_seed(0)).tolist()
        plan = dataclasses.replace(plan, tables=[[perm[p] for p in t] for t in plan.tables])
    return runner.build(plan)


def attention_alone(model: Any, batch: Any, runner: Any, timer: Timer, ctas: str) -> list[dict[str, Any]]:
    """Every layer's decode attention op over the step's buffers, alone, at each cap (capped: the
    layers' capped_config, the engine's CAPPED unless --kernels set another), in TB/s of the K and
    V that the decodes read: to set beside kernel_check's figures for the same kernel."""
    bufs = model.buffers(batch)
    run_sequential(model.layer_ops, bufs, [batch])  # the buffers of a real step (and kernels compiled)
    i = [op.name for op in model.layer_ops[0]].index("decode_attention")
    ops = [layer[i] for layer in model.layer_ops]
    nbytes = kv_bytes(batch, runner.kv_caches[0][0]) * len(ops)
    rows = []
    for c in caps(ctas):
        ms = timer.ms(lambda c=c: [op.run(batch, bufs, c) for op in ops])
        census = gate_census(model, batch, runner, c) if c is not None else {}
        rows.append({"ctas": c, "ms": ms, "tbps": nbytes / ms / 1e9, **census})
        print(f"decode attention alone, {c or 'all'} CTAs: {ms:.2f} ms = {nbytes / ms / 1e9:.2f} TB/s "
              f"{census or ''}", flush=True)
    return rows


def attention_direct(model: Any, batch: Any, runner: Any, timer: Timer, ctas: str) -> list[dict[str, Any]]:
    """The capped decode kernel called straight on the step's decodes, once per layer, changing one
    thing at a time from the engine's call towards kernel_check's, to find what costs the engine's op
    its rate: q as a strided view of the qkv rows (the engine's) or contiguous; the decode count on
    the device (the engine's, so graphs serve any count) or from the host; the layers' own caches in
    the whole pool or one cache holding just the step's pages, renumbered (kernel_check's)."""
    attn = model.layers[1].decode_attention
    cfg, s, rows = attn.capped_config, attn.shape, batch.decode_rows
    caches = list(runner.kv_caches)
    k0 = caches[0][0]
    tables, lens = batch.page_tables[:rows], batch.seq_lens[:rows]
    width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    q_strided = torch.randn(rows, width, device=runner.device, dtype=runner.config.dtype)[:, : s.num_heads * s.head_dim]
    q_strided = q_strided.view(rows, s.num_heads, s.head_dim)
    q_contig = q_strided.contiguous()
    used = tables[: batch.num_decodes].flatten().unique()
    remap = torch.zeros(k0.shape[0], dtype=tables.dtype, device=tables.device)
    remap[used] = torch.arange(len(used), dtype=tables.dtype, device=tables.device)
    compact = [(k[used].clone(), v[used].clone()) for k, v in caches[1:2]] * len(caches)
    compact_tables = remap[tables.long()]
    out = torch.empty_like(q_contig)
    nbytes = kv_bytes(batch, k0)
    cases = {"engine call": (q_strided, caches, tables, batch.decode_count),
             "contiguous q": (q_contig, caches, tables, batch.decode_count),
             "+ host count": (q_contig, caches, tables, None),
             "+ compact cache": (q_contig, compact, compact_tables, None)}
    found = []
    for c in caps(ctas):
        for name, (q, kvs, pt, count) in cases.items():
            def call(q=q, kvs=kvs, pt=pt, count=count, c=c) -> None:
                for k, v in kvs:
                    dk.paged_decode_attention(q, k, v, pt, lens, s.scale, None, c, out=out,
                                              config=cfg if c is not None else None, num_seqs=count)
            ms = timer.ms(call)
            tbps = nbytes * len(caches) / ms / 1e9
            found.append({"ctas": c, "case": name, "ms": ms, "tbps": tbps})
            print(f"direct {name:16s} {c or 'all'} CTAs: {ms:.2f} ms = {tbps:.2f} TB/s", flush=True)
    return found


def gate_census(model: Any, batch: Any, runner: Any, num_ctas: int) -> dict[str, Any]:
    """Where the gated decode kernel's programs landed in one launch over the step (layer 1's cache,
    random q): the SMs that joined the share, and how many programs each of them got (it runs at
    most gate_ctas_per_sm); an SM of the share with fewer runs short of the gate's point."""
    cfg = model.layers[1].decode_attention.capped_config
    if not cfg.sm_gate or runner.device.type != "cuda":
        return {}
    sms = torch.cuda.get_device_properties(runner.device).multi_processor_count
    counts = torch.zeros(2 + 2 * sms, dtype=torch.int32, device=runner.device)
    rows, (k, v) = batch.decode_rows, runner.kv_caches[1]
    q = torch.randn(rows, model.layers[1].decode_attention.shape.num_heads, k.shape[3], device=runner.device,
                    dtype=runner.config.dtype)
    dk.paged_decode_attention(q, k, v, batch.page_tables[:rows], batch.seq_lens[:rows], 0.08, None, num_ctas,
                              config=cfg, num_seqs=batch.decode_count, gate_counts=counts)
    return dk.gate_census(counts, sms, cfg.gate_ctas_per_sm)


if __name__ == "__main__":
    main()
