"""The baseline a user has without a serving engine: Hugging Face `generate` on static batches.

Same config.json as the engine run, random weights (the rate does not depend on their values),
SDPA attention, greedy, every row forced to the full output length (min_new_tokens =
max_new_tokens), prompts of equal length so no padding is wasted. The batch is the largest that
fits (estimated from free memory, shrunk on out-of-memory), capped by --hf-max-batch. Throughput is
a per-token rate, so a subset of the workload is enough; for a trace the prompts and outputs take
the trace's mean lengths (kinder to HF than padding real mixed lengths would be).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoflow.bench.workloads import Workload
from nanoflow.models.arch import ModelArch

log = logging.getLogger(__name__)

_MAX_OOM_RETRIES = 6


def hf_shape(workload: Workload) -> tuple[int, int]:
    """(input length, output length) of every HF request."""
    if workload.kind == "fixed":
        return len(workload.requests[0][0]), workload.requests[0][1]
    ins, outs = workload.input_lens, workload.output_lens
    return max(1, round(sum(ins) / len(ins))), max(1, round(sum(outs) / len(outs)))


def estimate_batch(arch: ModelArch, free_bytes: int, input_len: int, output_len: int, itemsize: int) -> int:
    """Sequences that fit in `free_bytes`: KV cache of the full length plus the prefill activations
    of one layer (MLP intermediates dominate); deliberately generous per sequence, since an
    out-of-memory costs a retry while a too-small batch only understates HF a little."""
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * itemsize
    inter = arch.intermediate_size * max(1, arch.experts_per_token)
    act_per_token = (3 * inter + 6 * arch.hidden_size) * itemsize
    per_seq = (input_len + output_len) * kv_per_token + input_len * act_per_token + 8 * arch.vocab_size
    budget = free_bytes * 0.92 - (1 << 30)
    return max(1, int(budget // per_seq))


def run_hf_baseline(
    model_dir: str, workload: Workload, dtype: torch.dtype, device: torch.device, max_batch: int,
    num_requests: int | None, seed: int, use_tqdm: bool = True,
) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: only when the baseline runs

    on_gpu = device.type == "cuda"
    cfg = AutoConfig.from_pretrained(model_dir)
    arch = ModelArch.from_hf(cfg)
    input_len, output_len = hf_shape(workload)
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

    if on_gpu:
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
        estimate = estimate_batch(arch, free, input_len, output_len, dtype.itemsize)
    else:
        estimate = max_batch
    batch = max(1, min(max_batch, estimate))
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def generate(model: torch.nn.Module, bs: int, new_tokens: int) -> tuple[float, int]:
        """(seconds, new tokens per row) of one generate call; prompt creation is not timed."""
        ids = torch.randint(0, arch.vocab_size, (bs, input_len), generator=gen).to(device)
        mask = torch.ones_like(ids)
        if on_gpu:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, int(out.shape[1] - input_len)

    # Warm-up: cuBLAS handles, SDPA kernel choice, allocator pools.
    generate(model, min(2, batch), min(4, output_len))

    retries = 0
    while True:
        limit = min(num_requests or batch, len(workload.requests))
        bs = min(batch, limit)
        num_batches = max(1, limit // bs)  # whole batches only: a small tail batch would understate HF
        elapsed, new_tokens, mismatches = 0.0, 0, 0
        bar = tqdm(total=num_batches * bs, desc=f"hf generate (batch {bs})", unit="req", disable=not use_tqdm,
                   leave=False)
        oom = False
        try:
            for _ in range(num_batches):
                seconds, got = generate(model, bs, output_len)
                elapsed += seconds
                new_tokens += got * bs
                mismatches += bs if got != output_len else 0
                bar.update(bs)
        except torch.OutOfMemoryError:
            if bs == 1 or retries >= _MAX_OOM_RETRIES:
                raise
            oom = True
        finally:
            bar.close()
        if not oom:
            break
        # Out here the failed call's frames (and its partial KV cache) are gone, so memory can be freed.
        retries += 1
        batch = max(1, bs * 3 // 4)
        log.warning("hf generate ran out of memory at batch %d; retrying at %d", bs, batch)
        gc.collect()
        torch.cuda.empty_cache()

    n = num_batches * bs
    in_tokens = n * input_len
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "status": "ok",
        "elapsed_s": elapsed,
        "init_s": init_s,
        "num_requests": n,
        "num_failed": 0,
        "input_tokens": in_tokens,
        "output_tokens": new_tokens,
        "output_len_mismatches": mismatches,
        "requests_per_s": n / elapsed,
        "total_tokens_per_s": (in_tokens + new_tokens) / elapsed,
        "output_tokens_per_s": new_tokens / elapsed,
        "peak_memory_gib": peak,
        "batch_size": bs,
        "num_batches": num_batches,
        "batch_estimate": estimate,
        "oom_retries": retries,
        "input_len": input_len,
        "output_len": output_len,
        "attn_implementation": "sdpa",
        "note": ("static batches of equal-length random prompts"
                 + (", at the trace's mean input/output lengths" if workload.kind == "trace" else "")),
    }
