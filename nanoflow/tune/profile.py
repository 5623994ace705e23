"""Per-op times of one decoder layer on this device: the numbers the search works from (JSON-able).

Each op of the layer is timed alone at nano-batch sizes over a mixed step: decodes first (contexts
spread around `context_len`, each on its own pages: the pool's pages are reused only when the
contexts exceed it) then prefill chunks, as the engine orders its rows. Decode attention is timed
again at each SM cap. One sample runs the op over several layers back to back: each layer has its
own weights and KV cache, so a sample reads from memory what a real forward reads (one layer's
weights alone would stay in L2 between repeats). Times are per layer.

The interference table (NanoFlow's Table 3, measured here, GPU only): decode attention capped at
each num_ctas on one stream, launched first, beside another op of the layer on a second stream;
each keeps a fraction of its speed alone. Beside it, the same measurement for prefill attention
(uncapped) beside each dense GEMM of the layer. The whole forward at each size is timed too, so the
sum of the parts can be checked against the whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from nanoflow.config import PAGE_SIZE
from nanoflow.executor.model_runner import ModelRunner, pipeline_key
from nanoflow.executor.step_plan import StepPlan
from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.op import Buffers, run_sequential
from nanoflow.pipeline.executor import GreenContexts, PipelineExecutor
from nanoflow.pipeline.schedule import GEMM_OPS, Schedule
from nanoflow.tune.timing import Timer, graph_replay_error, kept_fractions

PROFILE_VERSION = 1
DECODE, PREFILL = "decode_attention", "prefill_attention"


@dataclass(frozen=True)
class Workload:
    """What a profiled step holds: round(decode_fraction x tokens) decodes, the rest prefill chunks;
    or, with budget_decodes, the steps a server runs (`nanoflow tune --decode-fraction serve`)."""

    context_len: int = 1024  # mean context of a decode
    decode_fraction: float = 0.5
    prefill_chunk: int = 512  # prefill tokens per sequence (none of them cached before)
    # pages in a random order (as a pool that has served a while hands them out) instead of
    # numbered one after the other: decode attention's rate may depend on it
    shuffle_pages: bool = False
    # serving steps: one of the whole token budget holds budget_decodes decodes and prefill chunks,
    # a smaller one only decodes (the scheduler leaves a step short of the budget only when no
    # prompt waits). None: decode_fraction at every size
    budget_decodes: int | None = None
    budget: int = 0

    def num_decodes(self, num_tokens: int) -> int:
        if self.budget_decodes is not None:
            return min(self.budget_decodes, num_tokens) if num_tokens >= self.budget else num_tokens
        return round(num_tokens * self.decode_fraction)

    def profiled(self) -> Workload:
        """The steps the op profile times: serving steps' decodes only, as the cost model reads op
        times against decode counts that grow with the step (the measured check, which has the
        last word, times the serving steps themselves)."""
        if self.budget_decodes is None:
            return self
        return dataclasses.replace(self, decode_fraction=1.0, budget_decodes=None)


def mixed_plan(num_tokens: int, w: Workload, vocab_size: int, num_pages: int, max_model_len: int) -> StepPlan:
    d = w.num_decodes(num_tokens)
    # contexts from L/2 to ~3L/2 (mean ~L): a kernel that only did well on equal lengths would show it
    contexts = [max(1, min(max_model_len - 1, w.context_len // 2 + (i * 37 % 64) * w.context_len // 64))
                for i in range(d)]
    chunk = max(1, min(w.prefill_chunk, max_model_len))
    rest, chunks = num_tokens - d, []
    while rest > 0:
        chunks.append((0, min(chunk, rest)))
        rest -= chunks[-1][1]
    plan = StepPlan.synthetic(contexts, chunks, vocab_size)
    return dataclasses.replace(plan, tables=fit_pages(plan, num_pages, w.shuffle_pages))


def fit_pages(plan: StepPlan, num_pages: int, shuffle: bool = False) -> list[list[int]]:
    """The plan's page tables (numbered consecutively) within a pool of num_pages, in random order if
    `shuffle`. Where the step's contexts need more pages than the pool holds, the pages the step only
    reads are shared between sequences (the kernels still read as many bytes), but every page it
    writes (each sequence's from its first new token on) is that sequence's own: a write into a page
    another sequence reads is a race between nano-batches on two streams that serving never has
    (2026-11-30, one H200: the tune's ping-pong steps of ~900 decodes and more came out 0.1-0.19 off
    the same schedule on one stream while the pages wrapped around the pool)."""
    order = random.Random(0).sample(range(num_pages), num_pages) if shuffle else list(range(num_pages))
    if sum(map(len, plan.tables)) <= num_pages:
        return [[order[p] for p in t] for t in plan.tables]
    first_written = [start // PAGE_SIZE for start in plan.starts]
    num_written = sum(len(t) - f for t, f in zip(plan.tables, first_written, strict=True))
    shared = num_pages - num_written
    if shared < 1:
        raise ValueError(f"the step writes {num_written} pages; the pool holds {num_pages}")
    own = iter(order[:num_written])
    return [[next(own) if i >= f else order[num_written + p % shared] for i, p in enumerate(t)]
            for t, f in zip(plan.tables, first_written, strict=True)]


def step_batch(runner: ModelRunner, num_tokens: int, w: Workload) -> tuple[ForwardBatch, Buffers]:
    """A prepared batch of the workload and its activation buffers, filled by one forward (so the
    timed ops see values of a real step, and their kernels are compiled)."""
    cfg = runner.config
    plan = mixed_plan(num_tokens, w, runner.arch.vocab_size, runner.num_pages, cfg.max_model_len)
    batch = runner.build(plan)
    bufs = runner.model.buffers(batch)
    run_sequential(runner.model.layer_ops, bufs, [batch])
    return batch, bufs


def profile_ops(runner: ModelRunner, sizes: Sequence[int], ctas: Sequence[int] = (), *,
                workload: Workload | None = None, layers: int = 4, warmup: int = 3, repeats: int = 10,
                pairs: bool = True, pair_tokens: int | None = None, pair_ops: Sequence[str] | None = None,
                pair_repeats: int = 3, peak_tflops: float | None = None, use_tqdm: bool = False) -> dict[str, Any]:
    """Times every op of a layer at each size (tokens per nano-batch), decode attention at each SM
    cap in `ctas`, and (on a GPU, `pairs`) the interference table at `pair_tokens`. peak_tflops (the
    GEMM rate measured by the caller, None on the CPU) goes into the profile as the roof that its
    GEMM times can be read against."""
    w = workload or Workload()
    t0 = time.perf_counter()
    model, device = runner.model, runner.device
    on_gpu = device.type == "cuda"
    ops = model.layer_ops[0]
    names = [op.name for op in ops]
    num_layers = len(model.layer_ops)
    # not layer 0, whose input norm has no residual add: the steady state is every later layer
    timed = list(range(1, num_layers))[:layers] or [0]
    timer = Timer(device, warmup, repeats, graphs=True)
    ctas = list(ctas) if on_gpu else []
    sizes = sorted(set(sizes))
    do_pairs = pairs and on_gpu and bool(ctas)
    candidates = [op.name for op in ops if op.name != DECODE and op.resource != "network"]
    partners = [n for n in (pair_ops or candidates) if n in names and n != DECODE]
    gemms = [n for n in names if n in GEMM_OPS] if PREFILL in names else []  # beside prefill attention
    total = len(sizes) * (len(names) + len(ctas) + 1) + \
        (len(ctas) * (len(partners) + 1) + (len(gemms) + 1 if gemms else 0) if do_pairs else 0)
    bar = tqdm(total=total, desc="profile", unit="op", disable=not use_tqdm)

    def over_layers(name: str, batch: ForwardBatch, bufs: Buffers, cap: int | None) -> Callable[[], None]:
        i = names.index(name)
        layer_ops = [model.layer_ops[layer][i] for layer in timed]

        def run() -> None:
            for op in layer_ops:
                op.run(batch, bufs, cap)

        return run

    op_ms: dict[str, list[float]] = {n: [] for n in names}
    capped: dict[str, list[float]] = {str(c): [] for c in ctas}
    forward_ms, batches = [], []
    with torch.inference_mode():
        for n in sizes:
            batch, bufs = step_batch(runner, n, w)
            d = batch.num_decodes
            batches.append({"num_tokens": n, "num_decodes": d, "prefill_tokens": n - d,
                            "num_prefills": batch.num_prefills,
                            "mean_context": statistics.fmean(batch.seq_lens_cpu[:d]) if d else 0.0})
            for name in names:
                bar.set_postfix_str(f"{n} tokens: {name}")
                op_ms[name].append(timer.ms(over_layers(name, batch, bufs, None)) / len(timed))
                bar.update()
            for c in ctas:
                bar.set_postfix_str(f"{n} tokens: {DECODE} on {c} CTAs")
                capped[str(c)].append(timer.ms(over_layers(DECODE, batch, bufs, c)) / len(timed))
                bar.update()
            bar.set_postfix_str(f"{n} tokens: whole forward")
            forward_ms.append(timer.ms(lambda batch=batch: model(batch)))
            bar.update()
            del batch, bufs
        if do_pairs:
            n = pair_tokens or min(sizes, key=lambda s: abs(s - sizes[-1] // 2))
            batch, bufs = step_batch(runner, n, w)
            alone_ms: dict[str, float] = {}  # each op's time alone, shared by both tables (same step)
            table = _interference(timer, DECODE, {str(c): over_layers(DECODE, batch, bufs, c) for c in ctas},
                                  {p: over_layers(p, batch, bufs, None) for p in partners},
                                  len(timed), pair_repeats, bar, alone_ms)
            # prefill attention (uncapped) beside each dense GEMM: recorded for the reader only; the
            # search does not use it, as no schedule runs prefill attention beside a GEMM (both compute-bound)
            prefill_pairs: dict[str, dict[str, Any]] = {}
            if gemms and batch.num_prefills:
                got = _interference(timer, PREFILL, {"uncapped": over_layers(PREFILL, batch, bufs, None)},
                                    {g: over_layers(g, batch, bufs, None) for g in gemms},
                                    len(timed), pair_repeats, bar, alone_ms)
                prefill_pairs = {g: v["uncapped"] for g, v in got.items()}
            elif gemms:
                bar.update(len(gemms) + 1)  # a step of decodes only: no prefill attention to pair
            interference = {"ctas": ctas, "unit": "kept: fraction of the op's speed alone (1: unharmed); ms per layer",
                            "launch": "each stream's calls in one CUDA graph (eager where one cannot be captured), "
                                      "both streams released by one gate, attention first",
                            "pairs": table, "prefill_pairs": prefill_pairs,
                            "num_tokens": n, "num_decodes": batch.num_decodes}
        else:
            why = "no CUDA device: streams do not run side by side here" if not on_gpu else \
                "not measured (no --ctas, or pairs turned off)"
            interference = {"needs_gpu": not on_gpu, "note": why, "pairs": {}, "prefill_pairs": {}}
    bar.close()
    key = pipeline_key(runner.config, runner.par.size)
    return {
        "version": PROFILE_VERSION, "kind": "nanoflow-tune-profile",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": key["gpu"], "key": key, "peak_tflops": peak_tflops,
        "num_layers": num_layers, "layers_timed": timed, "workload": dataclasses.asdict(w),
        "timer": {"kind": timer.kind, "warmup": warmup, "repeats": repeats, "unit": "ms per layer"},
        "ops": [{"name": op.name, "resource": op.resource, "reads": list(op.reads), "writes": list(op.writes)}
                for op in ops],
        "sizes": sizes, "batches": batches, "op_ms": op_ms, "ctas": ctas, "decode_attention_capped_ms": capped,
        "forward_ms": forward_ms, "interference": interference,
        "elapsed_s": time.perf_counter() - t0,
    }


def _interference(timer: Timer, first: str, runs: dict[str, Callable[[], None]],
                  partners: dict[str, Callable[[], None]], per: int, repeats: int, bar: tqdm,
                  alone_ms: dict[str, float], span_ms: float = 2.0) -> dict[str, dict[str, dict[str, Any]]]:
    """table[partner][key] for each run of the `first` op (keyed: an SM cap, or "uncapped") and each
    partner op: both alone and side by side (`first` launched first), each stream repeating its
    call until both carry about the same work, so that they overlap throughout; median over
    `repeats` of the fractions each kept ("attention_kept": the first op's). `alone_ms` caches each
    call's time alone (the first op's under "first@key"), so that tables of one step share it."""
    def alone(key: str, fn: Callable[[], None]) -> float:
        if key not in alone_ms:
            once = timer.side_by_side(fn, 1, None, 0)[0]
            reps = max(1, math.ceil(span_ms / max(once, 1e-3)))
            timed = timer.side_by_side_runs(fn, reps, None, 0, repeats)
            alone_ms[key] = statistics.median(ms / reps for ms, _ in timed)
        return alone_ms[key]

    op_alone = {name: alone(name, fn) for name, fn in partners.items()}
    table: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in partners}
    for key, attn in runs.items():
        what = f"{first} on {key} CTAs" if key.isdigit() else f"{first} ({key})"
        bar.set_postfix_str(f"interference: {what} alone")
        a = alone(f"{first}@{key}", attn)
        bar.update()
        for name, fn in partners.items():
            bar.set_postfix_str(f"interference: {name} beside {what}")
            g = op_alone[name]
            span = max(span_ms, a, g)
            ra, rg = max(1, round(span / max(a, 1e-3))), max(1, round(span / max(g, 1e-3)))
            kept = [kept_fractions(a, ra, g, rg, *got) for got in timer.side_by_side_runs(attn, ra, fn, rg, repeats)]
            table[name][key] = {
                "op_kept": statistics.median(k[1] for k in kept),
                "attention_kept": statistics.median(k[0] for k in kept),
                "op_alone_ms": g / per, "attention_alone_ms": a / per, "reps": [ra, rg]}
            bar.update()
    return table


class StepForwards:
    """One built step (step_batch's) and its forwards through schedules, each schedule's executor built
    once: a candidate that is timed and then checked runs the same executor, and the executors share
    one green context per SM count for their execution units (each context holds device memory)."""

    def __init__(self, runner: ModelRunner, batch: ForwardBatch) -> None:
        self.runner, self.batch = runner, batch
        self._built: list[tuple[Schedule | None, Callable[[], torch.Tensor]]] = []
        self._green = GreenContexts(runner.device)

    def forward(self, schedule: Schedule | None) -> Callable[[], torch.Tensor]:
        """One forward of the step through the schedule's pipeline executor (None: the sequential walk)."""
        for s, fn in self._built:
            if s == schedule:
                return fn
        model, batch, device = self.runner.model, self.batch, self.runner.device
        if schedule is None:
            fn = lambda: model(batch)  # noqa: E731
        else:
            ex = PipelineExecutor(schedule, model.layer_ops, device, green=self._green)
            walk = partial(ex.run, parts=ex.split(batch, model.prepare))
            fn = lambda: model(batch, walk)  # noqa: E731
        self._built.append((schedule, fn))
        return fn

    def ms(self, timer: Timer, schedule: Schedule | None = None) -> float:
        """Milliseconds of one forward through `schedule` (None: the sequential walk): what the
        search predicted, measured."""
        with torch.inference_mode():
            return timer.ms(self.forward(schedule))

    def error(self, schedule: Schedule) -> float:
        """How far one forward through `schedule`'s pipeline, over CUDA-graph replays
        (timing.graph_replay_error), is from the same schedule run eagerly on one stream: the same
        kernels, so a difference is a race between the streams or work left undone, not rounding (a
        schedule's nano-batches and capped kernels may round differently from the sequential walk,
        and random-weight models amplify that over the layers: 0.15-0.23 on Llama-3-8B's shape,
        2026-11-30)."""
        with torch.inference_mode():
            want = self.forward(schedule.on_one_stream())()
            run = self.forward(schedule)
            run()  # warm: kernels compiled, the allocator's pools filled, before the capture
            return graph_replay_error(run, want)
