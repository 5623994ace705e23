"""What the decode and prefill attention modules share: the page gather of their references, the
input checks, the precision choices of their Triton kernels, and how those find a token's K/V
(token_offsets).

The new tokens' K/V are already in the cache (rope_kv_write runs first), so both attentions read
keys and values only through the page table. Cache layout: see kv_cache.py. The cache is in q's
dtype or float8_e4m3fn (EngineConfig.kv_cache_dtype); fp8 K/V tiles are converted to q's dtype right
after the load, so the dots and the fp32 accumulation are those of a 16/32-bit cache.

Both Triton kernels read K/V tiles of BLOCK_N tokens through the page table: token n of a sequence
lives in page page_tables[b, n // page_size] at offset n % page_size, and one (page, kv head) is a
contiguous page_size x head_dim tile, so each tile row is a contiguous head_dim vector. Scores are
kept in the log2 domain (scale * log2(e) folded in) so the softmax uses exp2.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache[pages] laid out as [..., num_kv_heads, len(pages) * page_size, head_dim]."""
    g = cache[pages]  # [..., P, Hkv, page, D]
    g = g.transpose(-4, -3)  # [..., Hkv, P, page, D]
    return g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1])


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dot (TF32 would cost ~1e-3 relative error); ignored for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def fp16_dots(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """An fp8 cache with a 16-bit q: the dots run in fp16 (q converted once per program). fp8 -> fp16
    is one instruction per two values on sm89+, while fp8 -> bf16 goes through fp16 and costs three:
    enough to make the fp8 decode kernel slower than the bf16 one (H100: 1.2 vs 2.9 TB/s of cache).
    fp16 also holds p and any fp8 value exactly; q overflows only beyond 65504."""
    return k_cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16)


def i32_offsets(*caches: torch.Tensor) -> bool:
    """Whether every element offset into these caches (one layer's K or V) fits 32 bits: then the
    decode kernels compute K/V addresses in int32. The 64-bit products cost 9-23% of the
    instructions of a decode step's inner loop (sm_90a SASS, Triton 3.7.1: per-head kernel 811 ->
    625 instructions a warp at 4 warps, all-heads 427 -> 389 at 8), and a capped grid runs out of
    issue slots and latency hiding before it runs out of bytes in flight (docs/pipeline_history.md)."""
    return all(sum((n - 1) * st for n, st in zip(c.shape, c.stride(), strict=True)) < 2**31 for c in caches)


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    D = q.shape[-1]
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "cache: [pages, kv_heads, page, D]"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.shape[-1] == D and q.shape[-2] % k_cache.shape[1] == 0
    assert k_cache.dtype == v_cache.dtype, "k and v caches must share a dtype"
    assert q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"q must be bf16, fp16 or fp32, not {q.dtype}"
    cache_ok = k_cache.dtype in (q.dtype, torch.float8_e4m3fn)
    assert cache_ok, f"the cache must be in q's dtype ({q.dtype}) or float8_e4m3fn, not {k_cache.dtype}"
    assert D >= 16 and D & (D - 1) == 0, "head_dim must be a power of two >= 16"
    page_size = k_cache.shape[2]
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"


@triton.jit
def token_offsets(n0, offs, lo, end, page_row, stride_cp, stride_ct,
                  PAGE_SIZE: tl.constexpr, I32_OFFSETS: tl.constexpr, MASKED: tl.constexpr):
    """(cache offset of each token n0 + offs within its kv head, which of them lie in [lo, end)),
    from the sequence's page-table row. MASKED: the page-table read is masked to [lo, end); else
    every token is valid (the steps wholly inside a work item) and the read needs no mask."""
    tok = n0 + offs
    t_mask = (tok >= lo) & (tok < end)
    if MASKED:
        page = tl.load(page_row + tok // PAGE_SIZE, mask=t_mask, other=0)
    else:
        page = tl.load(page_row + tok // PAGE_SIZE)
    if not I32_OFFSETS:
        page = page.to(tl.int64)
    return page * stride_cp + (tok % PAGE_SIZE) * stride_ct, t_mask
