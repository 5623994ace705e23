"""The baseline a user has without a serving engine: Hugging Face `generate` on static batches.

It runs the workload's own requests, in their order, as vLLM's benchmark_throughput.py `run_hf` does:
a request joins the current static batch while the batch, padded to its longest prompt and run to
its longest output, still fits in the GPU memory that was free after loading (estimate_batch) and
in --hf-max-batch if one is given (the largest batch that fits: no cap by default on a GPU; 256 on
the CPU, which has no memory figures). Prompts are left-padded under an attention mask; greedy,
and every row runs to the batch's longest output (min_new_tokens = max_new_tokens), because a
static batch ends only when its longest member does. Only real tokens count towards the rate
(each request's own prompt and output length); the padding and the surplus generation are what
static batching costs HF, and padding_efficiency (real / computed tokens) says how much that was.

Same config.json as the engine run, random weights (the rate does not depend on their values), SDPA
attention. The rate is per token, so whole batches from the start of the workload are enough: up to
--hf-num-requests requests, and no new batch after --hf-max-seconds.

`--compare hf-mean` (shape "mean") is the kinder variant kept for comparison: every request takes the workload's mean
prompt and output lengths, so nothing is padded. On a fixed workload (512x512) the two are the same.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoflow.bench.peak import sync
from nanoflow.bench.workloads import Workload
from nanoflow.model_arch import ModelArch

log = logging.getLogger(__name__)

Request = tuple[list[int], int]  # (prompt token ids, output length)
Fits = Callable[[int, int, int], bool]  # (batch size, longest prompt, longest output) -> fits in memory

# After an out-of-memory the estimate was too optimistic: later batches get this share of its budget.
_OOM_BUDGET_SHRINK = 0.75
_CPU_MAX_BATCH = 256


def mean_requests(requests: Sequence[Request]) -> list[Request]:
    """Every request at the mean prompt and output length: its prompt cut, or repeated, to that length."""
    n = len(requests)
    mean_in = max(1, round(sum(len(p) for p, _ in requests) / n))
    mean_out = max(1, round(sum(o for _, o in requests) / n))
    return [((p * -(-mean_in // len(p)))[:mean_in], mean_out) for p, _ in requests]


def estimate_batch(arch: ModelArch, free_bytes: int, input_len: int, output_len: int, itemsize: int) -> int:
    """Sequences that fit in `free_bytes` at the larger of generate's two peaks: the prefill (the
    prompts' KV cache plus one layer's activations, MLP intermediates dominating) and the last
    decode step (the whole KV cache, activations negligible). shared/gpu-facts.md measured batch
    384 of 512 + 512 tokens at 48 GiB above the weights: the second peak, as this predicts. An
    estimate too high costs an out-of-memory retry (the batch runs in halves, later ones smaller)."""
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * itemsize
    inter = arch.intermediate_size * max(1, arch.experts_per_token)
    act_per_token = (3 * inter + 6 * arch.hidden_size) * itemsize
    prefill = input_len * (kv_per_token + act_per_token)
    last_step = (input_len + output_len) * kv_per_token
    per_seq = max(prefill, last_step) + 8 * arch.vocab_size
    budget = free_bytes * 0.92 - (1 << 30)
    return max(1, int(budget // per_seq))


def next_batch(lens: Sequence[tuple[int, int]], start: int, fits: Fits, max_batch: int) -> int:
    """End of the static batch that begins at `start`: requests (input, output length) join in
    order while the batch, padded to its longest prompt and run to its longest output, still fits
    and holds at most max_batch. The first request always joins, however long."""
    end, (max_in, max_out) = start + 1, lens[start]
    while end < len(lens) and end - start < max_batch:
        new_in, new_out = max(max_in, lens[end][0]), max(max_out, lens[end][1])
        if not fits(end - start + 1, new_in, new_out):
            break
        end, max_in, max_out = end + 1, new_in, new_out
    return end


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on the left, so that every row's prompt ends in the last
    column, where generate appends the new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def generate_batch(model: torch.nn.Module, prompts: Sequence[list[int]], new_tokens: int, pad_id: int,
                   device: torch.device) -> tuple[float, torch.Tensor]:
    """(seconds, generated ids [batch, new]) of one generate call; building the inputs is not timed."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    sync(device)
    return time.perf_counter() - t, out[:, ids.shape[1]:]


def _generate_or_oom(*args: Any) -> tuple[float, torch.Tensor] | None:
    """generate_batch, or None when it ran out of memory: once this returns, the failed call's
    frames (and the partial KV cache they hold) are gone, so the caller can free that memory."""
    try:
        return generate_batch(*args)
    except torch.OutOfMemoryError:
        return None


def run_hf_baseline(
    model_dir: str, workload: Workload, dtype: torch.dtype, device: torch.device, max_batch: int | None,
    num_requests: int | None, seed: int, use_tqdm: bool = True, max_seconds: float = 60.0,
    shape: str = "requests",
) -> dict[str, Any]:
    """Runs whole static batches of the workload's first requests (see the module docstring);
    max_seconds <= 0 means no time cap."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: only when the baseline runs

    if shape not in ("requests", "mean"):
        raise ValueError(f"shape must be 'requests' or 'mean', got {shape!r}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"--hf-max-batch must be at least 1, got {max_batch}")
    requests = list(workload.requests[:num_requests] if num_requests else workload.requests)
    on_gpu = device.type == "cuda"
    if max_batch is None:
        max_batch = len(requests) if on_gpu else _CPU_MAX_BATCH
    if shape == "mean":
        requests = mean_requests(requests)
    lens = [(len(p), o) for p, o in requests]

    cfg = AutoConfig.from_pretrained(model_dir)
    arch = ModelArch.from_hf(cfg)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    pad_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    model.generation_config.pad_token_id = pad_id
    init_s = time.perf_counter() - t0

    sync(device)
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    budget_scale = 1.0

    def fits(bs: int, max_in: int, max_out: int) -> bool:
        # Without memory figures (the CPU) only --hf-max-batch bounds a batch.
        return free is None or bs <= estimate_batch(arch, int(free * budget_scale), max_in, max_out, dtype.itemsize)

    # Warm-up (cuBLAS handles, SDPA kernel choice, allocator pools), padded like the timed batches.
    _generate_or_oom(model, [p for p, _ in requests[:2]], min(4, lens[0][1]), pad_id, device)

    batch_sizes: list[int] = []
    elapsed, in_tokens, out_tokens, padded_tokens, mismatches, failed, retries = 0.0, 0, 0, 0, 0, 0, 0
    pending: list[range] = []  # halves of a batch that ran out of memory: they go before any new batch
    cursor = 0
    bar = tqdm(total=len(requests), desc="hf generate", unit="req", disable=not use_tqdm, leave=False)
    t_start = time.perf_counter()
    while pending or cursor < len(requests):
        if (max_seconds > 0 and time.perf_counter() - t_start >= max_seconds
                and (batch_sizes or failed)):
            break
        if pending:
            batch = pending.pop(0)
        else:
            batch = range(cursor, next_batch(lens, cursor, fits, max_batch))
            cursor = batch.stop
        max_in, max_out = max(lens[i][0] for i in batch), max(lens[i][1] for i in batch)
        res = _generate_or_oom(model, [requests[i][0] for i in batch], max_out, pad_id, device)
        if res is None:
            retries += 1
            budget_scale *= _OOM_BUDGET_SHRINK
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            if len(batch) == 1:
                failed += 1
                log.warning("hf generate ran out of memory on one request (%d in, %d out); skipped it",
                            max_in, max_out)
            else:
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                log.warning("hf generate ran out of memory at batch %d; retrying it in halves", len(batch))
            continue
        seconds, new = res
        elapsed += seconds
        batch_sizes.append(len(batch))
        in_tokens += sum(lens[i][0] for i in batch)
        out_tokens += sum(lens[i][1] for i in batch)
        padded_tokens += len(batch) * (max_in + max_out)
        mismatches += len(batch) if new.shape[1] != max_out else 0
        bar.update(len(batch))
    bar.close()

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    if not batch_sizes:
        return {"status": "error", "error": f"hf generate ran out of memory on all {failed} requests it tried",
                "init_s": init_s, "num_failed": failed, "oom_retries": retries, "shape": shape}
    n = sum(batch_sizes)
    note = ("equal-length prompts at the workload's mean input/output lengths, no padding" if shape == "mean"
            else "the workload's first requests in order, static batches left-padded to their longest prompt "
                 "and run to their longest output; only real tokens counted")
    return {
        "status": "ok",
        "elapsed_s": elapsed,
        "init_s": init_s,
        "num_requests": n,
        "num_failed": failed,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_len_mismatches": mismatches,
        "requests_per_s": n / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "peak_memory_gib": peak,
        "free_memory_gib": None if free is None else free / 2**30,
        "shape": shape,
        "batch_size": max(batch_sizes),
        "batch_sizes": batch_sizes,
        "num_batches": len(batch_sizes),
        "padded_tokens": padded_tokens,
        "padding_efficiency": (in_tokens + out_tokens) / padded_tokens,
        "oom_retries": retries,
        "attn_implementation": "sdpa",
        "note": note,
    }
