"""Chunked-prefill attention over the paged KV cache: a varlen batch of query chunks, each the
last positions of its sequence's context, attending causally to that context.

The PyTorch reference, the Triton kernel, and the host-side tile planner (prefill_tiles) that the
model runner uses to build the kernel's work list. What both attention modules share, the
cache-read conventions included, is in attention_common.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanoflow.kernels.attention_common import (
    LOG2E,
    check_paged_inputs,
    dot_precision,
    fp16_dots,
    gather_pages,
    token_offsets,
)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [sum(query_lens), Hq, D], any strides (e.g. the q part of a fused qkv buffer); sequence
    i's queries are the last query_lens[i] positions of its seq_lens[i]-token context and attend
    causally to everything before them. Written into `out` (any view of q's shape) when given."""
    page_size = k_cache.shape[2]
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape
    start = 0
    for i, (qlen, ctx) in enumerate(zip(query_lens, seq_lens, strict=True)):
        pages = page_tables[i, : (ctx + page_size - 1) // page_size].long()
        k = gather_pages(k_cache, pages)[:, :ctx].to(q.dtype)  # [Hkv, ctx, D]
        v = gather_pages(v_cache, pages)[:, :ctx].to(q.dtype)
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
        page_row = page_tables_ptr + b * stride_pt
        # Key tiles that every query of the tile sees whole (before the first query, inside the last
        # one's window) need no mask; only the causal edge and a window's start do. The masked
        # tiles go first, through one masked copy of the tile (decode_common says why one copy).
        start = (lo // BLOCK_N) * BLOCK_N
        hi_up = tl.cdiv(hi, BLOCK_N) * BLOCK_N
        full_lo = tl.where(sliding_window > 0, tl.cdiv(tl.maximum(hi - sliding_window, 0), BLOCK_N) * BLOCK_N, 0)
        full_hi = ((first + 1) // BLOCK_N) * BLOCK_N
        no_full = full_hi <= full_lo
        full_lo = tl.where(no_full, hi_up, full_lo)
        full_hi = tl.where(no_full, hi_up, full_hi)
        n_head = (full_lo - start) // BLOCK_N
        for i in tl.range(0, n_head + tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_N)):
            n0 = tl.where(i < n_head, start + i * BLOCK_N, full_hi + (i - n_head) * BLOCK_N)
            m_i, l_i, acc = _tile(n0, hi, q, q_pos, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n, offs_d,
                                  qk_scale, sliding_window, stride_cp, stride_ct, m_i, l_i, acc,
                                  PAGE_SIZE, PRECISION, True)
        for n0 in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES):
            m_i, l_i, acc = _tile(n0, hi, q, q_pos, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n, offs_d,
                                  qk_scale, sliding_window, stride_cp, stride_ct, m_i, l_i, acc,
                                  PAGE_SIZE, PRECISION, False)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _tile(
    n0, hi, q, q_pos, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n, offs_d, qk_scale, sliding_window,
    stride_cp, stride_ct, m_i, l_i, acc, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile from n0 of the online softmax. MASKED: keys past hi, after a query (causal) or
    before its window count for nothing, and a row may see no key of the tile; else every row sees
    every key."""
    tok_off, t_mask = token_offsets(n0, offs_n, 0, hi, page_row, stride_cp, stride_ct, PAGE_SIZE, False, MASKED)
    row = tok_off + kv_base
    tok = n0 + offs_n
    # to q's dtype: a no-op for a 16/32-bit cache, the widening of an fp8 one
    if MASKED:
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :]).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        mask = t_mask[None, :] & (tok[None, :] <= q_pos[:, None])
        if sliding_window > 0:
            mask &= tok[None, :] > q_pos[:, None] - sliding_window
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:  # a row can see no key of this tile (causal edge, window): keep it NaN-free
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


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
    seq_lens[b]-token context (so query length <= seq_len); out gets those rows only. q may have any
    row and head strides (e.g. the q part of a fused qkv buffer; a non-contiguous last dim costs a
    copy); out: None or a view of q's shape with a contiguous last dim (e.g. rows of a
    [T_total, Hq * D] buffer viewed as [T, Hq, D]).

    Each program computes block_m rows: all query heads of one kv head x prefill_block_q(group,
    block_m) queries. tiles: [N, 2] int32 on the device, one program per kv head each: (sequence,
    query block), from prefill_tiles() with that block_q; rows with sequence -1 are idle (a CUDA
    graph's spare capacity). None: every sequence x every block up to max_query_len (host int;
    None uses T, always enough but launches idle programs), last blocks first.
    """
    check_paged_inputs(q, k_cache, v_cache)
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
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_N=block_n, NUM_STAGES=num_stages, PRECISION=dot_precision(q.dtype),
        FP16_DOTS=fp16_dots(q, k_cache),
        num_warps=num_warps,
    )  # fmt: skip
    return out
