"""`nanoflow bench`: offline throughput, vLLM `bench throughput` style, against the optimum.

One system after another on the same requests: the measured peak GEMM rate first, then nanoflow
(the engine's fast path), then each --compare baseline, freeing GPU memory between them; on a GPU
each engine in a process of its own. The JSON is rewritten after every system, so a run cut short
keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoflow.bench import report
from nanoflow.bench.cli_args import COMPARE_CHOICES
from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.bench.environment import environment
from nanoflow.bench.gc_pauses import gc_pauses, heap_census
from nanoflow.bench.peak import measure_peak_tflops, optimum_tokens_per_s, sync
from nanoflow.bench.pipeline_info import bench_timeline, pipeline_summary
from nanoflow.bench.power import PowerSampler
from nanoflow.bench.sync_calls import sync_calls
from nanoflow.bench.workloads import Workload, build_workload
from nanoflow.config import PAGE_SIZE, resolve_device, resolve_dtype
from nanoflow.engine_args import engine_kwargs as cli_engine_kwargs
from nanoflow.executor.isolated import run_isolated
from nanoflow.model_arch import ModelArch, load_hf_config

log = logging.getLogger(__name__)

SCHEMA = "nanoflow-bench/1"

# Engine options per mode (see EngineArgs.enforce_eager); the others come from the engine flags.
ENGINE_MODES: dict[str, dict[str, Any]] = {
    # The fast path: whatever the engine picks on this device (Triton kernels, CUDA graphs), with the
    # nano-batch pipeline of --pipeline (default auto: the one `nanoflow tune` cached, else sequential).
    "nanoflow": {"enforce_eager": False},
    # The same engine, kernels and graphs with the pipeline off: nanoflow over this is the pipeline's gain.
    "nanoflow-sequential": {"enforce_eager": False, "pipeline": "off"},
    # Our own plain mode: eager PyTorch reference ops, one after another, no CUDA graphs.
    "sequential": {"enforce_eager": True, "pipeline": "off"},
    # The fast path with the KV cache in fp8 (e4m3): twice the sequences, half the bytes per decode.
    "nanoflow-fp8": {"enforce_eager": False, "kv_cache_dtype": "fp8"},
}

# --- settings ----------------------------------------------------------------------------------
def parse_compare(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in COMPARE_CHOICES]
    if bad:
        raise ValueError(f"--compare accepts {', '.join(COMPARE_CHOICES)}; got {', '.join(bad)}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def resolve_model(args: argparse.Namespace) -> tuple[str, str, str]:
    """(folder, short name, load_format)."""
    if args.dummy:
        return dummy_model_dir(args.dummy), args.dummy, "dummy"
    if not args.model:
        raise ValueError("give --model PATH or --dummy NAME")
    return args.model, os.path.basename(os.path.normpath(args.model)), args.load_format or "auto"


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-") or "x"


def _free_memory(device: torch.device) -> None:
    gc.unfreeze()  # the engine froze the heap it started with (model_runner.freeze_heap)
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocators' driver calls so far (empty off a GPU): the device allocator's,
    and the pinned host allocator's pool growth (cudaHostAlloc, with the microseconds spent in it:
    a call can stall the host mid-run; on an H200 these stayed small, 1-2 ms a run)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    out = {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    out["num_host_alloc"] = int(host.get("num_host_alloc", 0))
    out["host_alloc_us"] = int(host.get("host_alloc_time.total", 0))
    return out


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """Collects the Triton kernel variants compiled inside the block: each one stalls the engine for
    ~1 s, so a timed run should compile none (the warm-up must have met every specialisation)."""
    found: list[str] = []
    try:
        from triton import knobs
    except ImportError:  # an older Triton without knobs: report nothing rather than fail the bench
        yield found
        return
    old = knobs.runtime.jit_post_compile_hook

    def hook(*, repr: str, **_: Any) -> None:
        found.append(repr)

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield found
    finally:
        knobs.runtime.jit_post_compile_hook = old


# --- one engine run ----------------------------------------------------------------------------
def run_engine(
    mode: str, model_dir: str, load_format: str, workload: Workload, engine_kwargs: dict[str, Any],
    device: torch.device, num_warmup: int, warmup_max_tokens: int, use_tqdm: bool,
    timeline: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """timeline: (PNG path, title) to draw, after the run, one layer's ops per stream in a step of
    the shape that held most of its GPU time."""
    from nanoflow.entrypoints.llm import LLM
    from nanoflow.sampling_params import SamplingParams

    opts = ENGINE_MODES[mode]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, load_format=load_format, **{**engine_kwargs, "skip_tokenizer_init": True, **opts})
    init_s = time.perf_counter() - t0
    engine = llm.engine
    cfg = engine.config
    runner = engine.runner
    out: dict[str, Any] = {
        "status": "ok",
        "options": opts,
        "fast_path": not cfg.enforce_eager,
        "pipeline": pipeline_summary(runner),
        "init_s": init_s,
        "engine_config": dataclasses.asdict(cfg.args),
        "max_model_len": engine.max_model_len,
        "kv_pool": {"pages": runner.num_pages, "tokens": runner.num_pages * PAGE_SIZE,
                    "page_bytes": runner.page_bytes, "gib": runner.num_pages * runner.page_bytes / 2**30},
    }

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)

    # Warm-up: compile, autotune and graph capture happen here, not in the timed run. Fresh
    # prompts of the workload's first lengths, so a prefix cache could not serve the timed run.
    warm = workload.warmup_requests(num_warmup, warmup_max_tokens)
    t = time.perf_counter()
    if warm:
        llm.generate([{"prompt_token_ids": p} for p, _ in warm], [params(o) for _, o in warm],
                     use_tqdm=False)
    sync(device)
    out["warmup"] = {"num_requests": len(warm), "max_tokens": warmup_max_tokens,
                     "elapsed_s": time.perf_counter() - t}
    preempt0 = engine.scheduler.num_preemptions
    replays0 = runner.graphs.num_replays if runner.graphs else 0
    alloc0 = allocator_counts(device)

    prompts = [{"prompt_token_ids": p} for p, _ in workload.requests]
    sampling = [params(o) for _, o in workload.requests]
    engine.stats.keep_timeline = True
    heap0 = heap_census()
    sync(device)
    t, wall = time.perf_counter(), time.time()
    with triton_compiles() as compiled, gc_pauses() as collected, sync_calls(device) as synced:
        outputs = llm.generate(prompts, sampling, use_tqdm=use_tqdm)
        sync(device)
    elapsed = time.perf_counter() - t
    if compiled:
        log.warning("%d Triton kernel variants were compiled during the timed run, e.g. %s", len(compiled),
                    compiled[0][:300])

    in_tok = out_tok = failed = mismatched = 0
    errors: list[str] = []
    for (prompt, want), o in zip(workload.requests, outputs, strict=True):
        if o.error:
            failed += 1
            errors.append(o.error)
            continue
        got = len(o.outputs[0].token_ids)
        in_tok += len(prompt)
        out_tok += got
        mismatched += got != want
    done = len(outputs) - failed
    out.update({
        "elapsed_s": elapsed,
        "window": [wall, wall + elapsed],  # time.time() of the timed run: where its power samples lie
        "num_requests": done,
        "num_failed": failed,
        "failed_examples": sorted(set(errors))[:3],
        "output_len_mismatches": mismatched,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "requests_per_s": done / elapsed,
        "total_tokens_per_s": (in_tok + out_tok) / elapsed,
        "output_tokens_per_s": out_tok / elapsed,
        "num_preemptions": engine.scheduler.num_preemptions - preempt0,
        "cuda_graph_steps": (runner.graphs.num_replays if runner.graphs else 0) - replays0,
        # the caching allocator going to the driver mid-run (cudaMalloc / cudaFree, a retry frees
        # every cached block first): each can stall the host on the GPU, so the GPU idles
        "allocator": {k: v - alloc0[k] for k, v in allocator_counts(device).items()},
        # GPU busy inside steps vs idle between them (CUDA events; generate() resets them per call).
        "step_stats": engine.stats.summary(),
        # tensor parallel, one host: each worker's plans read and GPU idle between its steps (issue 13)
        "worker_gpu_idle": engine.tp.worker_gpu_idle() if engine.tp is not None else None,
        "step_timeline": engine.stats.timeline_columns(),
        "triton_compiles_during_run": {"count": len(compiled), "examples": [c[:400] for c in compiled[:5]]},
        "gc": collected,  # the collector's pauses of the host during the timed run
        "gc_heap": {"start": heap0, "end": heap_census()},  # what its full passes scanned
        "sync_calls": synced,  # the host waiting for the GPU, by call site
        # each request's first output tokens (None: it failed), to compare runs (report.output_agreement)
        "output_heads": [None if o.error else list(o.outputs[0].token_ids[:report.OUTPUT_HEAD]) for o in outputs],
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
    })
    if timeline is not None:  # before shutdown: tensor-parallel workers run the step too
        out["timeline"] = bench_timeline(engine, out, workload, *timeline)
    llm.shutdown()  # tensor-parallel workers, if any, so the next system gets their memory
    return out


# --- orchestration -----------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    use_tqdm = not args.no_tqdm
    try:
        device = resolve_device(args.device)
        # One dtype for every system (the engine's "auto" could follow a float16 checkpoint while HF
        # ran bf16): bfloat16 on the GPU, float32 on the CPU unless asked otherwise.
        dtype = resolve_dtype(args.dtype, None, device)
    except ValueError as e:  # name the flag: "--dtype must be ..."
        raise ValueError(f"--{e}") from None
    compare = parse_compare(args.compare)
    model_dir, model_name, load_format = resolve_model(args)
    arch = ModelArch.from_hf(load_hf_config(model_dir))
    # The engine's own default, needed before it exists: to skip requests that cannot fit.
    max_model_len = args.max_model_len or arch.max_position_embeddings
    workload = build_workload(args.workload, args.num_requests, arch.vocab_size, max_model_len, args.seed)
    dtype_name = str(dtype).removeprefix("torch.")
    engine_kwargs = {**cli_engine_kwargs(args), "dtype": dtype_name, "device": str(device)}
    env = environment(device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"bench_{_safe(model_name)}_{_safe(workload.name)}_{_safe(env['device_name'])}_{stamp}"
    json_path = os.path.join(args.output_dir, stem + ".json")
    if args.output_json:  # vLLM's flag: the JSON exactly there, the pictures named after it
        json_path = args.output_json
        stem = os.path.splitext(os.path.basename(json_path))[0]
    png_path = None if args.no_plot else os.path.join(args.output_dir, stem + ".png")
    timeline_png = os.path.join(args.output_dir, stem + "_timeline.png") if args.timeline else None
    if png_path or timeline_png:  # with --output-json the pictures' folder need not be the JSON's
        os.makedirs(args.output_dir, exist_ok=True)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": shlex.join(sys.argv),  # the process's command line (the bench may run inside another tool)
        "model": {"name": model_name, "path": model_dir, "load_format": load_format,
                  "architecture": arch.architecture, "num_parameters": arch.num_parameters(),
                  "active_parameters": arch.active_parameters(), "num_layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "num_heads": arch.num_heads,
                  "num_kv_heads": arch.num_kv_heads, "vocab_size": arch.vocab_size},
        "workload": workload.summary(),
        "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "dtype_resolved": dtype_name,
                     "device_resolved": str(device), "systems": ["nanoflow", *compare],
                     "max_model_len_effective": max_model_len},
        "environment": env,
        "peak": None,
        "optimum_tokens_per_s": None,
        "systems": {},
        "speedups": {},
        "files": {"json": json_path, "png": png_path},
    }
    systems = ["nanoflow", *compare]
    print(f"nanoflow bench: {model_name} ({report.params_str(arch.num_parameters())} params), "
          f"{workload.name}, {len(workload.requests)} requests, systems {', '.join(systems)} on "
          f"{env['device_name']}", flush=True)
    stages = tqdm(total=1 + len(systems), desc="bench", unit="stage", disable=not use_tqdm, position=0)

    # The peak first, on a quiet GPU, in this process.
    stages.set_postfix_str("peak GEMM")
    if args.peak_tflops is not None:
        result["peak"] = {"kind": "given", "tflops": args.peak_tflops}
    elif args.peak_seconds > 0:
        on_gpu = device.type == "cuda"
        # A CPU "peak" is only a placeholder that keeps the report's arithmetic running: keep it short.
        seconds = args.peak_seconds if on_gpu else min(args.peak_seconds, 0.25)
        result["peak"] = measure_peak_tflops(device, seconds=seconds, warmup_seconds=0.5 if on_gpu else 0.05)
    if result["peak"]:
        result["optimum_tokens_per_s"] = optimum_tokens_per_s(
            result["peak"]["tflops"], arch.active_parameters(), args.tensor_parallel_size)
        _say(use_tqdm, report.peak_line(result))
    stages.update(1)
    report.write_json(result, json_path)

    # power and clocks over each engine run (CUDA machines with nvidia-smi): on a GPU at its power cap a
    # throughput ratio is an energy ratio (docs/pipeline.md, Where it stands)
    sampler = PowerSampler.for_devices(device, args.tensor_parallel_size)
    with sampler or contextlib.nullcontext():
        for name in systems:
            stages.set_postfix_str(name)
            _say(use_tqdm, f"[bench] {name}: running")
            t_sys = time.perf_counter()
            try:
                if name in ("hf", "hf-mean"):
                    from nanoflow.bench.hf_baseline import run_hf_baseline

                    res = run_hf_baseline(model_dir, workload, dtype, device, args.hf_max_batch,
                                          args.hf_num_requests, args.seed, use_tqdm,
                                          max_seconds=args.hf_max_seconds,
                                          shape="mean" if name == "hf-mean" else "requests")
                else:
                    timeline = (timeline_png, f"{name}: {model_name} on {env['device_name']}") \
                        if timeline_png and name == "nanoflow" else None
                    run = (name, model_dir, load_format, workload, engine_kwargs, device,
                           args.num_warmup, args.warmup_max_tokens, use_tqdm, timeline)
                    # on a GPU each system in a process of its own: under TP for executor/isolated.py's
                    # reasons; on one GPU so that none inherits the kernels an earlier one loaded (a
                    # kernel's first use held the host ~80 ms on an H200: ModelRunner.warm_logits)
                    res = run_isolated(run_engine, *run, name=f"nanoflow bench {name}") \
                        if device.type == "cuda" else run_engine(*run)
                    if res.get("timeline", {}).get("png"):
                        result["files"]["timeline_png"] = timeline_png
            except Exception as e:  # one system failing (e.g. out of memory) must not lose the others
                log.error("%s failed: %s", name, e)
                res = {"status": "error", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)}
            try:
                _free_memory(device)
                if device.type == "cuda":
                    # Non-zero here means the system leaked GPU memory into the next one's budget.
                    res["memory_allocated_after_free_gib"] = torch.cuda.memory_allocated(device) / 2**30
            except Exception as e:  # e.g. a sticky CUDA error: record it, let the next systems report theirs
                res["cleanup_error"] = f"{type(e).__name__}: {e}"
            if res.get("status") == "ok" and result["optimum_tokens_per_s"]:
                res["fraction_of_optimum"] = res["total_tokens_per_s"] / result["optimum_tokens_per_s"]
            if sampler and res.get("window"):
                res["power"] = sampler.summary(*res["window"], tokens=res["input_tokens"] + res["output_tokens"])
            result["systems"][name] = res
            wall = time.perf_counter() - t_sys
            if res["status"] == "ok":
                _say(use_tqdm, f"[bench] {name}: {res['total_tokens_per_s']:,.0f} total tok/s, "
                     f"{res['output_tokens_per_s']:,.0f} output tok/s over {res['num_requests']} requests in "
                     f"{res['elapsed_s']:.1f} s ({wall:.0f} s with setup)")
            else:
                _say(use_tqdm, f"[bench] {name}: {res['error']} ({wall:.0f} s)")
            if name == "nanoflow" and report.self_comparison({n: result["systems"].get(n, {}) for n in systems}):
                _say(use_tqdm, report.SELF_COMPARISON)  # before the second run, not only in the final table
            result["speedups"] = speedups(result["systems"])
            result["agreement"] = report.output_agreement(result["systems"])
            report.write_json(result, json_path)
            stages.update(1)
        stages.close()

    if png_path and any(s.get("status") == "ok" for s in result["systems"].values()):
        try:
            report.plot_result(result, png_path)
            for name in systems:  # one per-step timeline per engine run (nanoflow's is plain _steps.png)
                suffix = "_steps.png" if name == "nanoflow" else f"_steps_{name}.png"
                steps_png = png_path.removesuffix(".png") + suffix
                if report.plot_steps(result, steps_png, system=name):
                    result["files"][f"steps_png_{name}"] = steps_png
            report.write_json(result, json_path)
        except Exception as e:  # a missing matplotlib must not cost the numbers
            log.error("could not draw %s: %s", png_path, e)
            result["files"]["png"] = None
            report.write_json(result, json_path)
    print()
    print(report.format_table(result))
    pngs = [result["files"][k] for k in ("png", "timeline_png") if result["files"].get(k)]
    print(f"\nwrote {json_path}" + "".join(f" and {p}" for p in pngs))
    return 0 if all(s.get("status") == "ok" for s in result["systems"].values()) else 1


def _say(use_tqdm: bool, msg: str) -> None:
    """A progress line that survives in logs (tee'd output keeps lines, not tqdm redraws)."""
    if use_tqdm:
        tqdm.write(msg)
    else:
        print(msg, flush=True)


def speedups(systems: dict[str, dict[str, Any]]) -> dict[str, float]:
    ok = {n: s["total_tokens_per_s"] for n, s in systems.items() if s.get("status") == "ok"}
    return {f"{ours}/{n}": ok[ours] / ok[n] for ours in ("nanoflow", "nanoflow-fp8") if ours in ok
            for n in report.BASELINES if n in ok}
