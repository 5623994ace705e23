"""Attention over the paged KV cache: decode (one query per sequence) and chunked prefill.

The new tokens' K/V are already in the cache (rope_kv_write runs first), so both read keys and
values only through the page table. Cache layout: see rotary.py. The cache is in q's dtype or
float8_e4m3fn (EngineConfig.kv_cache_dtype); fp8 K/V tiles are converted to q's dtype right after
the load, so the dots and the fp32 accumulation are those of a 16/32-bit cache.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache[pages] laid out as [..., num_kv_heads, len(pages) * page_size, head_dim]."""
    g = cache[pages]  # [..., P, Hkv, page, D]
    g = g.transpose(-4, -3)  # [..., Hkv, P, page, D]
    return g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1])


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at position seq_lens - 1. Returns [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    # gather first, convert after: only the pages read are widened
    k = _gather_pages(k_cache, page_tables.long()).to(q.dtype)  # [B, Hkv, N, D]
    v = _gather_pages(v_cache, page_tables.long()).to(q.dtype)
    qg = q.view(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, N]
    pos = torch.arange(k.shape[2], device=q.device)
    lens = seq_lens.to(q.device).long()[:, None]
    valid = pos[None, :] < lens
    if sliding_window is not None:
        valid &= pos[None, :] >= lens - sliding_window
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    # Slots past a sequence's length, and page 0 behind the table's padding, may never have been
    # written: leftover memory can hold inf or NaN (in fp8 the bytes 0x7f/0xff are NaN), and a
    # masked slot still adds 0 * v = NaN to probs @ v. v is a gathered copy, not the cache.
    v.masked_fill_(~valid[:, None, :, None], 0)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [sum(query_lens), Hq, D]; sequence i's queries are the last query_lens[i] positions of
    its seq_lens[i]-token context and attend causally to everything before them."""
    page_size = k_cache.shape[2]
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for i, (qlen, ctx) in enumerate(zip(query_lens, seq_lens, strict=True)):
        pages = page_tables[i, : (ctx + page_size - 1) // page_size].long()
        k = _gather_pages(k_cache, pages)[:, :ctx].to(q.dtype)  # [Hkv, ctx, D]
        v = _gather_pages(v_cache, pages)[:, :ctx].to(q.dtype)
        k = k.repeat_interleave(Hq // Hkv, dim=0)
        v = v.repeat_interleave(Hq // Hkv, dim=0)
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        qi = q[start : start + qlen].transpose(0, 1)  # [Hq, qlen, D]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


# ----------------------------------------------------------------------------------------------
# Triton fast path
# ----------------------------------------------------------------------------------------------
#
# Both kernels read K/V tiles of BLOCK_N tokens through the page table: token n of a sequence
# lives in page page_tables[b, n // page_size] at offset n % page_size, and one (page, kv head)
# is a contiguous page_size x head_dim tile, so each tile row is a contiguous head_dim vector.
# Scores are kept in the log2 domain (scale * log2(e) folded in) so the softmax uses exp2.

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. None means the default for the cache's dtype, from
    the H100 sweeps of benchmarks/kernel_check.py: 128-token steps x 4 warps x 8 stages for a 16-bit
    cache (2.83 / 2.71 TB/s at 256 x 1024 and 64 x 4096 on all SMs, 1.14 / 1.37 on 32 CTAs) and
    64 x 4 x 6 for fp8 (1.93-1.97 TB/s of fp8 bytes, 1.4x faster than the same context in bf16; a
    16-bit shape reached 1.52 there, its tiles being converted by too few warps per load in flight)."""

    # tokens per step (a power of two, a multiple of page_size)
    block_n: int | None = None
    num_warps: int | None = None
    # software-pipelining depth. The page-table load takes stages of its own, so only about
    # (num_stages - 2) / 2 K/V steps are in flight: capped grids want 8 (~200 KiB of shared memory).
    num_stages: int | None = None
    partition_size: int | None = None  # tokens per work item; None: chosen from the shapes
    ctas_per_sm: int = 2  # grid size for num_ctas=None is ctas_per_sm * number of SMs
    min_partition: int = 512  # smallest automatic partition: each work item pays a pipeline ramp
    # flatten the (work item x step) loop nest into one pipelined loop (tl.range(flatten=True)), so
    # loads of the next work item start before the current one ends; experimental
    flatten: bool = False

    def resolved(self, head_dim: int, elem_size: int, fp8_cache: bool = False) -> DecodeConfig:
        """This config with the None fields filled in for the head_dim, q's element size and cache."""
        if fp8_cache:
            block_n, warps, stages = 64, 4, 6
        else:
            # 64 KiB of K+V per step: 128 tokens for bf16 x head_dim 128, 64 for fp32
            block_n = min(max(triton.next_power_of_2(max(1, (64 * 1024) // (2 * head_dim * elem_size))), 16), 128)
            # 16-bit: 8 stages keep ~3 K/V steps in flight; as fast as 8 warps x 4 stages on all SMs
            # and 1.3-1.5x faster on capped grids (H100, kernel_check_h100_20261125_two_items.json)
            warps, stages = (4, 8) if elem_size <= 2 else (8, 4)
        return dataclasses.replace(
            self, block_n=self.block_n or block_n, num_warps=self.num_warps or warps,
            num_stages=self.num_stages or stages)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dot (TF32 would cost ~1e-3 relative error); ignored for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fp16_dots(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """An fp8 cache with a 16-bit q: the dots run in fp16 (q converted once per program). fp8 -> fp16
    is one instruction per two values on sm89+, while fp8 -> bf16 goes through fp16 and costs three:
    enough to make the fp8 decode kernel slower than the bf16 one (H100: 1.2 vs 2.9 TB/s of cache).
    fp16 also holds p and any fp8 value exactly; q overflows only beyond 65504."""
    return k_cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16)


def _check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
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


# Batch-dependent integers are not specialised on (== 1, multiple of 16): otherwise every new mix
# of batch size and context split would compile another variant in the middle of serving.
@triton.jit(do_not_specialize=["num_parts", "partition", "sliding_window"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, seq_lens_ptr, num_seqs_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, num_kv_heads, num_parts, partition, sliding_window,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
    stride_cp, stride_ch, stride_ct,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr, PRECISION: tl.constexpr, FP16_DOTS: tl.constexpr,
):  # fmt: skip
    """Persistent over work items (seq, kv_head, partition): a capped grid still covers all work.
    All GROUP query heads of a kv head share each K/V tile (rows of one tl.dot, padded to 16)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    num_work = tl.load(num_seqs_ptr) * num_kv_heads * num_parts
    for w in tl.range(pid, num_work, nprog, num_stages=NUM_STAGES, flatten=FLATTEN):
        # partition fastest: neighbouring CTAs share one long sequence's work
        part = w % num_parts
        kvh = (w // num_parts) % num_kv_heads
        b = w // (num_parts * num_kv_heads)
        seq_len = tl.load(seq_lens_ptr + b)
        start = part * partition
        end = tl.minimum(start + partition, seq_len)
        lo = tl.where(sliding_window > 0, tl.maximum(start, seq_len - sliding_window), start)
        heads = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None], other=0.0,
        )  # fmt: skip
        if FP16_DOTS:
            q = q.to(tl.float16)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        kv_base = tl.cast(kvh, tl.int64) * stride_ch
        # start is BLOCK_N-aligned; only a sliding window gives an unaligned lo, so align it down.
        # An empty item (lo >= end) runs zero iterations.
        for n0 in tl.range((lo // BLOCK_N) * BLOCK_N, end, BLOCK_N, num_stages=NUM_STAGES):
            tok = n0 + offs_n
            t_mask = (tok >= lo) & (tok < end)
            page = tl.load(page_tables_ptr + b * stride_pt + tok // PAGE_SIZE, mask=t_mask, other=0)
            row = page.to(tl.int64) * stride_cp + kv_base + (tok % PAGE_SIZE) * stride_ct
            # to q's dtype: a no-op for a 16/32-bit cache, the widening of an fp8 one
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, BLOCK_N], fp32
            qk = tl.where(t_mask[None, :], qk * qk_scale, float("-inf"))
            # every step holds >= 1 valid token, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SPLIT:
            # unnormalised partials; the reduce kernel recomputes which partitions are non-empty
            row_p = (b * num_kv_heads * GROUP + heads) * num_parts + part
            keep = g_mask & (lo < end)
            tl.store(part_acc_ptr + row_p[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])
            tl.store(part_m_ptr + row_p, m_i, mask=keep)
            tl.store(part_l_ptr + row_p, l_i, mask=keep)
        else:
            # an empty sequence (seq_len 0, e.g. CUDA-graph padding) gets zeros, not NaN
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit(do_not_specialize=["num_parts", "partition", "sliding_window"])
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr, num_seqs_ptr, out_ptr,
    num_q_heads, num_parts, partition, sliding_window,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Merges the partitions of each (seq, q head); persistent like the main kernel."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_P)
    for w in tl.range(pid, tl.load(num_seqs_ptr) * num_q_heads, nprog):
        b = w // num_q_heads
        h = w % num_q_heads
        seq_len = tl.load(seq_lens_ptr + b)
        lo = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
        # exactly the partitions the main kernel wrote
        p_lo = lo // partition
        p_hi = tl.minimum(tl.cdiv(seq_len, partition), num_parts)
        m = tl.full([], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        base = tl.cast(w, tl.int64) * num_parts
        for p0 in tl.range(p_lo, p_hi, BLOCK_P):
            p = p0 + offs_p
            p_mask = p < p_hi
            m_p = tl.load(part_m_ptr + base + p, mask=p_mask, other=float("-inf"))
            l_p = tl.load(part_l_ptr + base + p, mask=p_mask, other=0.0)
            a_p = tl.load(
                part_acc_ptr + (base + p)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_mask[:, None], other=0.0,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(m_p, 0))  # finite: each chunk has >= 1 written partition
            alpha = tl.exp2(m - m_new)
            w_p = tl.exp2(m_p - m_new)
            acc = acc * alpha + tl.sum(a_p * w_p[:, None], 0)
            l_sum = l_sum * alpha + tl.sum(l_p * w_p, 0)
            m = m_new
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def _decode_plan(
    batch: int, num_kv_heads: int, max_context: int, grid_cap: int, cfg: DecodeConfig
) -> tuple[int, int]:
    """(partition_size, num_parts) from host-known shapes only, so CUDA graphs can capture it."""
    if cfg.partition_size is not None:
        part = triton.cdiv(cfg.partition_size, cfg.block_n) * cfg.block_n
    else:
        # split until there are >= 2 items per CTA (load balance), but not below min_partition
        want = max(1, triton.cdiv(2 * grid_cap, batch * num_kv_heads))
        part = triton.cdiv(triton.cdiv(max_context, want), cfg.block_n) * cfg.block_n
        part = max(part, triton.cdiv(cfg.min_partition, cfg.block_n) * cfg.block_n)
    part = min(part, triton.cdiv(max_context, cfg.block_n) * cfg.block_n)
    return part, triton.cdiv(max_context, part)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    num_seqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_decode_attention_ref. q: [B, Hq, D] (last dim contiguous);
    page_tables: [B, max_pages] int32; seq_lens: [B] int32, 0 <= seq_len <= max_pages * page_size.

    num_ctas caps the (persistent) grid, e.g. to leave SMs to a concurrent GEMM; None fills the
    GPU. num_seqs ([1] int32 on the device, <= B) computes only the first num_seqs rows and leaves
    the others untouched: a CUDA graph captured for B rows then serves every smaller batch. A
    sequence with seq_len 0 gets zeros. No host syncs: CUDA-graph capturable.
    """
    _check_paged_inputs(q, k_cache, v_cache)
    # tiles are sized by q's dtype, the one they are computed in (an fp8 tile is widened after its
    # load): an fp8 cache keeps the tile shape of its model dtype and halves the bytes per step
    cfg = (config or DecodeConfig()).resolved(q.shape[-1], q.element_size(), k_cache.dtype == torch.float8_e4m3fn)
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    assert cfg.block_n % page_size == 0 and cfg.block_n >= 16 and cfg.block_n & (cfg.block_n - 1) == 0
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(-1) == 1
    if B == 0:
        return out
    if num_ctas is None:
        on_gpu = q.is_cuda
        grid_cap = cfg.ctas_per_sm * _num_sms(q.device.index or 0) if on_gpu else 1 << 30
    else:
        grid_cap = max(1, num_ctas)
    max_context = page_tables.shape[1] * page_size
    part, num_parts = _decode_plan(B, Hkv, max_context, grid_cap, cfg)
    split = num_parts > 1
    if split:
        part_acc = torch.empty(B, Hq, num_parts, D, device=q.device, dtype=torch.float32)
        part_m = torch.empty(B, Hq, num_parts, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    window = sliding_window or 0
    if num_seqs is None:
        num_seqs = torch.full((1,), B, dtype=torch.int32, device=q.device)
    num_work = B * Hkv * num_parts
    _decode_kernel[(min(num_work, grid_cap),)](
        q, k_cache, v_cache, page_tables, seq_lens, num_seqs,
        out, part_acc, part_m, part_l,
        scale * _LOG2E, Hkv, num_parts, part, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_N=cfg.block_n, SPLIT=split,
        NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten, PRECISION=_dot_precision(q.dtype),
        FP16_DOTS=_fp16_dots(q, k_cache),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    if split:
        _decode_reduce_kernel[(min(B * Hq, grid_cap),)](
            part_acc, part_m, part_l, seq_lens, num_seqs, out,
            Hq, num_parts, part, window,
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_P=16, num_warps=4,
        )  # fmt: skip
    return out


PREFILL_BLOCK_M = 64  # MMA rows per prefill program: the query heads of one kv head x its queries


def prefill_block_q(group: int, block_m: int = PREFILL_BLOCK_M) -> int:
    """Queries per prefill program (and per tile of prefill_tiles) when each program holds all
    `group` query heads of a kv head (padded to a power of two) in its block_m rows."""
    return max(1, block_m // triton.next_power_of_2(group))


def prefill_tiles(query_lens: np.ndarray, seq_lens: np.ndarray, first_seq: int, block_q: int) -> np.ndarray:
    """The prefill kernel's work list for sequences first_seq, first_seq + 1, ... with these query
    and context lengths: [N, 2] int32 rows of (sequence, block of block_q queries), the blocks that
    see the most keys first, so the longest programs start early and the launch ends with short ones."""
    query_lens, seq_lens = np.asarray(query_lens, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    blocks = -(-query_lens // block_q)
    seq = np.repeat(np.arange(query_lens.size), blocks)
    blk = np.arange(seq.size) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    keys = seq_lens[seq] - query_lens[seq] + np.minimum((blk + 1) * block_q, query_lens[seq])
    order = np.argsort(-keys, kind="stable")
    return np.stack((seq[order] + first_seq, blk[order]), 1).astype(np.int32)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, query_start_loc_ptr, seq_lens_ptr, tiles_ptr, out_ptr,
    qk_scale, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_pt,
    stride_cp, stride_ch, stride_ct,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr,
):  # fmt: skip
    """One program: the GROUP query heads of one kv head x the tile's BLOCK_Q queries of one
    sequence, as the GROUP_PAD * BLOCK_Q rows of one MMA, so every K/V tile read serves all heads
    of the group (row r: head r // BLOCK_Q, query r % BLOCK_Q). A tile is (sequence, query block);
    tiles past their sequence's queries are idle."""
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    b = tl.load(tiles_ptr + 2 * tile)
    m_blk = tl.load(tiles_ptr + 2 * tile + 1)
    b_safe = tl.maximum(b, 0)
    q_start = tl.load(query_start_loc_ptr + b_safe)
    q_len = tl.load(query_start_loc_ptr + b_safe + 1) - q_start
    if (b >= 0) & (m_blk < tl.cdiv(q_len, BLOCK_Q)):
        seq_len = tl.load(seq_lens_ptr + b)
        offs_r = tl.arange(0, GROUP_PAD * BLOCK_Q)
        offs_m = m_blk * BLOCK_Q + offs_r % BLOCK_Q  # query index in the sequence's chunk
        heads = kvh * GROUP + offs_r // BLOCK_Q
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = (offs_m < q_len) & (offs_r // BLOCK_Q < GROUP)
        q_pos = seq_len - q_len + offs_m  # queries are the last q_len positions of the context
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=m_mask[:, None], other=0.0,
        )  # fmt: skip
        if FP16_DOTS:
            q = q.to(tl.float16)
        first = seq_len - q_len + m_blk * BLOCK_Q
        hi = tl.minimum(first + BLOCK_Q, seq_len)  # causal: nothing past the last query
        lo = tl.where(sliding_window > 0, tl.maximum(first - sliding_window + 1, 0), 0)
        m_i = tl.full([GROUP_PAD * BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD * BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD * BLOCK_Q, HEAD_DIM], dtype=tl.float32)
        kv_base = tl.cast(kvh, tl.int64) * stride_ch
        for n0 in tl.range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N, num_stages=NUM_STAGES):
            tok = n0 + offs_n
            t_mask = tok < hi
            page = tl.load(page_tables_ptr + b * stride_pt + tok // PAGE_SIZE, mask=t_mask, other=0)
            row = page.to(tl.int64) * stride_cp + kv_base + (tok % PAGE_SIZE) * stride_ct
            # to q's dtype: a no-op for a 16/32-bit cache, the widening of an fp8 one
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            mask = t_mask[None, :] & (tok[None, :] <= q_pos[:, None])
            if sliding_window > 0:
                mask &= tok[None, :] > q_pos[:, None] - sliding_window
            qk = tl.where(mask, qk * qk_scale, float("-inf"))
            # a row can see no key of this tile (causal edge, window): keep it NaN-free
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(qk - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    tiles: torch.Tensor | None = None,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,  # H100 sweep with GQA packing: 136 us at 3 stages vs 145 at 2 (kernel_check)
) -> torch.Tensor:
    """Triton version of paged_prefill_attention_ref for a whole varlen batch in one launch.

    q: [T, Hq, D]; query_start_loc: [B + 1] int32 and seq_lens: [B] int32 on the device; sequence
    b's queries q[query_start_loc[b]:query_start_loc[b + 1]] are the last positions of its
    seq_lens[b]-token context (so query length <= seq_len); out gets those rows only.

    Each program computes block_m rows: all query heads of one kv head x prefill_block_q(group,
    block_m) queries. tiles: [N, 2] int32 on the device, one program per kv head each: (sequence,
    query block), from prefill_tiles() with that block_q; rows with sequence -1 are idle (a CUDA
    graph's spare capacity). None: every sequence x every block up to max_query_len (host int;
    None uses T, always enough but launches idle programs), last blocks first.
    """
    _check_paged_inputs(q, k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    T, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[1], k_cache.shape[2]
    B = seq_lens.shape[0]
    if block_n is None:
        block_n = 64 if q.element_size() <= 2 else 32  # fp32: half the tile, to fit shared memory
    assert block_n % page_size == 0 and min(block_m, block_n) >= 16
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(-1) == 1
    group = Hq // Hkv
    block_q = prefill_block_q(group, block_m)
    if tiles is None:
        max_q = T if max_query_len is None else max_query_len
        nm = triton.cdiv(max_q, block_q)
        # the last blocks of every sequence (the most keys) first, like prefill_tiles
        seqs = torch.arange(B, dtype=torch.int32, device=q.device)
        blocks = torch.arange(nm - 1, -1, -1, dtype=torch.int32, device=q.device)
        tiles = torch.stack((seqs.repeat(nm), blocks.repeat_interleave(B)), 1)
    assert tiles.dtype == torch.int32 and tiles.is_contiguous() and tiles.shape[1:] == (2,)
    if tiles.shape[0] == 0:
        return out
    _prefill_kernel[(Hkv, tiles.shape[0])](
        q, k_cache, v_cache, page_tables, query_start_loc, seq_lens, tiles, out,
        scale * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_N=block_n, NUM_STAGES=num_stages, PRECISION=_dot_precision(q.dtype),
        FP16_DOTS=_fp16_dots(q, k_cache),
        num_warps=num_warps,
    )  # fmt: skip
    return out
