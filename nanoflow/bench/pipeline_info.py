"""The pipeline side of a bench run: which nano-batch pipeline an engine ran (for the JSON, so that
`nanoflow` vs `nanoflow-sequential` says what was compared), and `--timeline`: one step of the
shape that held most of the run's GPU time, one layer's ops per stream over time (nanoflow.pipeline.timeline)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import traceback
from typing import Any

from nanoflow.bench.workloads import Workload
from nanoflow.config import PAGE_SIZE, pages_for
from nanoflow.executor.step_plan import StepPlan
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.timeline import plot_timeline, record_timeline

log = logging.getLogger(__name__)

TIMELINE_LAYER = 1  # not layer 0, whose first op also embeds; any later layer runs the same ops


def schedule_summary(ex: PipelineExecutor) -> dict[str, Any]:
    s = ex.schedule
    return {"min_tokens": s.min_tokens, "max_tokens": s.max_tokens,
            "partitions": {k: list(v) for k, v in s.partitions.items()}, "num_streams": s.num_streams,
            "predicted_ms": s.predicted_ms,
            # what decides how the streams share the GPU: decode attention's SM caps, the units' SMs
            "decode_ctas": sorted({st.num_ctas for st in s.steps if st.op == "decode_attention" and st.num_ctas}),
            "units": list(s.units)}


def pipeline_summary(runner: Any) -> list[dict[str, Any]] | str:
    """Each schedule the runner's pipeline holds, or "sequential" (no pipeline: --pipeline off, or
    auto with none tuned for this GPU and model)."""
    return [schedule_summary(ex) for ex in runner.executors] or "sequential"


def representative_step(step_timeline: dict[str, list] | None, budget: int, max_seqs: int,
                        mean_context: int) -> tuple[int, int, int]:
    """(tokens, decodes, context tokens per decode) of the step shape that held the most GPU time:
    the steps are grouped by token count in eighths of the budget, and the heaviest group gives its
    medians (a decode-heavy run draws its decode steps, not the few full ones). Without a timeline:
    a full budget, half of it decoding at mean_context."""
    t = step_timeline or {}
    tokens = t.get("tokens") or []
    if not tokens:
        return budget, min(budget // 2, max_seqs), mean_context
    busy = t.get("gpu_busy_ms") or [1.0] * len(tokens)
    width = max(1, -(-budget // 8))
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(tokens):
        groups.setdefault((n - 1) // width, []).append(i)
    rows = max(groups.values(), key=lambda g: sum(busy[i] for i in g))
    n = int(statistics.median(tokens[i] for i in rows))
    decodes = min(int(statistics.median(t["decodes"][i] for i in rows)), n, max_seqs)
    per_seq = [t["decode_context_tokens"][i] / t["decodes"][i] for i in rows if t["decodes"][i]]
    return n, decodes, int(statistics.median(per_seq)) if per_seq else mean_context


def shaped_step_plan(tokens: int, num_decodes: int, context: int, num_pages: int, max_model_len: int,
                     vocab_size: int) -> StepPlan:
    """A step of exactly `tokens` tokens: num_decodes decodes of `context` tokens each (fewer or
    shorter where the KV pool is too small) and the rest as prefill chunks from position 0 of at
    most max_model_len tokens each. Every sequence has pages of its own."""
    def prefill_pages(d: int) -> int:
        rest = tokens - d
        return (rest // max_model_len) * pages_for(max_model_len) + pages_for(rest % max_model_len)

    d = max(0, min(num_decodes, tokens))
    while d and prefill_pages(d) + d > num_pages:  # every decode needs at least one page
        d -= 1
    if prefill_pages(d) > num_pages:
        raise ValueError(f"a {tokens}-token step does not fit a KV pool of {num_pages} pages")
    per_seq = min(pages_for(max(1, context)), (num_pages - prefill_pages(d)) // d) if d else 0
    context = max(1, min(context, per_seq * PAGE_SIZE, max_model_len))
    chunks, rest = [], tokens - d
    while rest:
        chunks.append((0, min(rest, max_model_len)))
        rest -= chunks[-1][1]
    # nothing sampled: the step is timed, not decoded
    return dataclasses.replace(StepPlan.synthetic([context] * d, chunks, vocab_size), sample_at=[])


def bench_timeline(engine: Any, run: dict[str, Any], workload: Workload, png_path: str,
                   title: str) -> dict[str, Any]:
    """After an engine run (its pages all free again): one step shaped like the run's heaviest steps
    (representative_step), the ops of TIMELINE_LAYER timed per stream, drawn to png_path. What it
    could not do goes into the result as an error: the run's numbers stand without the picture."""
    runner, cfg = engine.runner, engine.config
    out: dict[str, Any] = {"layer": TIMELINE_LAYER, "png": None}
    try:
        # a decode's context where the run kept no step timeline: halfway through a mean request
        ins, outs = workload.input_lens, workload.output_lens
        mean_context = (sum(ins) + sum(outs) // 2) // max(1, len(ins))
        tokens, decodes, context = representative_step(run.get("step_timeline"), cfg.max_num_batched_tokens,
                                                       cfg.max_num_seqs, mean_context)
        plan = shaped_step_plan(tokens, decodes, context, runner.num_pages, engine.max_model_len,
                                runner.arch.vocab_size)
        ex = runner.executor_for(tokens)
        out["step"] = {"tokens": tokens, "decodes": plan.num_decodes,
                       "decode_context": plan.seq_lens[0] if plan.num_decodes else None,
                       "prefill_chunks": [len(t) for t in plan.token_ids[plan.num_decodes:]]}
        out["schedule"] = schedule_summary(ex) if ex else "sequential"
        out["clock"] = ("CUDA events on each op's stream" if runner.device.type == "cuda"
                        else "perf_counter: the CPU runs the schedule's ops in issue order, never overlapped")
        t = time.perf_counter()
        layer = min(TIMELINE_LAYER, runner.arch.num_layers - 1)
        out["layer"] = layer
        out["records"] = record_timeline(runner, plan, layer)
        out["layer_ms"] = max(r["end_ms"] for r in out["records"])
        out["elapsed_s"] = time.perf_counter() - t
        step = out["step"]
        plot_timeline(out["records"], png_path, f"{title}\nlayer {layer} of a {tokens}-token step: "
                      f"{step['decodes']} decodes of {step['decode_context'] or 0} tokens, prefill chunks "
                      f"{step['prefill_chunks'] or 'none'}; {'pipelined' if ex else 'sequential'}")
        out["png"] = png_path
    except Exception as e:  # e.g. no matplotlib, or a pool too small for the step
        log.error("timeline failed: %s", e)
        out.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    return out
