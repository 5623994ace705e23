"""Decode attention over the paged KV cache: one query per sequence, at position seq_len - 1.

The PyTorch reference, the per-head Triton kernel (persistent over (sequence, kv head, partition)
work items), the reduce kernel that merges the partitions of long contexts, and the launcher. What
both attention modules share, the cache-read conventions included, is in attention_common.py; what
the decode kernels share (DecodeConfig, the partition plan, a work item's bounds and store) in
decode_common.py.

One more kernel for capped grids (experimental, issue 12), same arguments, same reduce kernel:
DecodeConfig(all_heads=True) (decode_all_heads.py: work items cover every kv head, so each step
loads whole pages, one contiguous run of all heads per page).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from nanoflow.kernels.attention_common import (
    LOG2E,
    check_paged_inputs,
    dot_precision,
    fp16_dots,
    gather_pages,
    i32_offsets,
    num_sms,
    token_offsets,
)
from nanoflow.kernels.decode_all_heads import decode_all_heads_kernel
from nanoflow.kernels.decode_common import CAPPED as CAPPED  # the capped-grid default, for callers of this module
from nanoflow.kernels.decode_common import GATED_EVEN as GATED_EVEN  # the gated one before it
from nanoflow.kernels.decode_common import (
    DecodeConfig,
    decode_plan,
    default_config,
    full_steps,
    partial_step,
    softmax_step,
    store_item,
    work_item,
)

REDUCE_HEADS = 16  # q heads per work item of the reduce kernel: a 16 x 128 fp32 tile is 16 registers a thread


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at position seq_lens - 1; any strides (e.g. the q part
    of a fused qkv buffer). Returns [B, Hq, D]: `out` (any view of that shape) when given."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    # gather first, convert after: only the pages read are widened
    k = gather_pages(k_cache, page_tables.long()).to(q.dtype)  # [B, Hkv, N, D]
    v = gather_pages(v_cache, page_tables.long()).to(q.dtype)
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
    res = torch.matmul(probs, v).reshape(B, Hq, D)
    return res if out is None else out.copy_(res)


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
    I32_OFFSETS: tl.constexpr,
):  # fmt: skip
    """Persistent over work items (seq, kv_head, partition): a capped grid still covers all work.
    All GROUP query heads of a kv head share each K/V tile (rows of one tl.dot, padded to 16).
    I32_OFFSETS: the layer's cache has < 2**31 elements, so K/V offsets fit 32 bits (see i32_offsets)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    num_work = tl.load(num_seqs_ptr) * num_kv_heads * num_parts
    for w in tl.range(pid, num_work, nprog, num_stages=NUM_STAGES, flatten=FLATTEN):
        part, kvh, b, lo, end = work_item(w, num_parts, num_kv_heads, partition, sliding_window, seq_lens_ptr)
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
        kv_base = kvh * stride_ch if I32_OFFSETS else tl.cast(kvh, tl.int64) * stride_ch
        page_row = page_tables_ptr + b * stride_pt
        # the partial first and last steps with token masks, then the full ones without (decode_common)
        for j in range(2):
            n0, run = partial_step(j, lo, end, BLOCK_N)
            if run:
                m_i, l_i, acc = _head_step(n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n,
                                           offs_d, qk_scale, stride_cp, stride_ct, m_i, l_i, acc,
                                           PAGE_SIZE, PRECISION, I32_OFFSETS, True)
        full_lo, full_hi = full_steps(lo, end, BLOCK_N)
        for n0 in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES):
            m_i, l_i, acc = _head_step(n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n,
                                       offs_d, qk_scale, stride_cp, stride_ct, m_i, l_i, acc,
                                       PAGE_SIZE, PRECISION, I32_OFFSETS, False)
        # the reduce kernel recomputes which partitions are non-empty
        store_item(acc, m_i, l_i, heads, g_mask, b, part, lo, end, num_kv_heads * GROUP, num_parts,
                   out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, stride_ob, stride_oh, HEAD_DIM, SPLIT)


@triton.jit
def _head_step(
    n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, kv_base, offs_n, offs_d, qk_scale, stride_cp, stride_ct,
    m_i, l_i, acc, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, I32_OFFSETS: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One step of one kv head's online softmax from token n0 (MASKED: tokens outside [lo, end)
    count for nothing; else all are valid)."""
    tok_off, t_mask = token_offsets(n0, offs_n, lo, end, page_row, stride_cp, stride_ct, PAGE_SIZE, I32_OFFSETS,
                                    MASKED)
    row = tok_off + kv_base
    # to q's dtype: a no-op for a 16/32-bit cache, the widening of an fp8 one
    if MASKED:
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :]).to(q.dtype)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :]).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], fp32
    if MASKED:
        qk = tl.where(t_mask[None, :], qk, float("-inf"))
    return softmax_step(qk, v, m_i, l_i, acc, PRECISION)


def gate_census(gate_counts: torch.Tensor, num_sms: int, ctas_per_sm: int) -> dict[str, Any]:
    """Where one gated launch's programs landed, from the gate_counts it left (paged_decode_attention):
    the SMs that joined the share and the programs each ran (at most ctas_per_sm; an SM of the share
    with fewer runs short of the gate's point). Syncs with the device."""
    state, programs = gate_counts[2 : 2 + num_sms].tolist(), gate_counts[2 + num_sms :].tolist()
    share = [min(n, ctas_per_sm) for st, n in zip(state, programs, strict=True) if st == 1]
    return {"share_sms": len(share), "programs_on_share": sum(share),
            "share_sms_by_programs": {n: share.count(n) for n in sorted(set(share))},
            "share_smids": [i for i, st in enumerate(state) if st == 1]}


@triton.jit(do_not_specialize=["num_parts", "partition", "sliding_window"])
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr, num_seqs_ptr, out_ptr,
    num_q_heads, num_parts, partition, sliding_window,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Merges the partitions of each (seq, block of BLOCK_H q heads); persistent like the main
    kernel. Why blocks of heads: with one head per work item a capped grid's few programs each took
    dozens of dependent load rounds (132 programs, 256 sequences x 16 heads: 72 us a launch beside a
    GEMM, TP2 on an H200, where the attention itself took 113); a [BLOCK_H, HEAD_DIM] tile per
    partition takes BLOCK_H times fewer."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, BLOCK_H)
    head_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    for w in tl.range(pid, tl.load(num_seqs_ptr) * head_blocks, nprog):
        b = w // head_blocks
        h = (w % head_blocks) * BLOCK_H + offs_h
        h_mask = h < num_q_heads
        seq_len = tl.load(seq_lens_ptr + b)
        lo = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
        # exactly the partitions the main kernel wrote: each holds >= 1 token, so its m is finite
        p_lo = lo // partition
        p_hi = tl.minimum(tl.cdiv(seq_len, partition), num_parts)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
        rows = (tl.cast(b, tl.int64) * num_q_heads + h) * num_parts
        for p in tl.range(p_lo, p_hi):
            m_p = tl.load(part_m_ptr + rows + p, mask=h_mask, other=0.0)  # 0, not -inf: no NaN lanes
            l_p = tl.load(part_l_ptr + rows + p, mask=h_mask, other=0.0)
            a_p = tl.load(part_acc_ptr + (rows + p)[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=h_mask[:, None], other=0.0)
            m_new = tl.maximum(m, m_p)
            alpha = tl.exp2(m - m_new)
            w_p = tl.exp2(m_p - m_new)
            acc = acc * alpha[:, None] + a_p * w_p[:, None]
            l_sum = l_sum * alpha + l_p * w_p
            m = m_new
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])


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
    gate_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_decode_attention_ref. q: [B, Hq, D] with any row and head strides
    (e.g. the q part of a fused qkv buffer; a non-contiguous last dim costs a copy); out: None or a
    view of q's shape with a contiguous last dim (e.g. rows of a [T_total, Hq * D] buffer viewed as
    [B, Hq, D]); page_tables: [B, max_pages] int32; seq_lens: [B] int32, 0 <= seq_len <= max_pages *
    page_size.

    num_ctas caps the (persistent) grid, e.g. to leave SMs to a concurrent GEMM; None fills the
    GPU. num_seqs ([1] int32 on the device, <= B) computes only the first num_seqs rows and leaves
    the others untouched: a CUDA graph captured for B rows then serves every smaller batch. A
    sequence with seq_len 0 gets zeros. No host syncs: CUDA-graph capturable.
    config.all_heads=True runs the all-heads kernel instead (same arguments and results); with
    config.sm_gate or config.dynamic and num_ctas, num_ctas is a share of the SMs and the grid
    gate_ctas_per_sm programs for each (the gate keeps them on the share's SMs, the counter does not);
    gate_counts (int32, 2 + 2 * SMs, on the GPU), if given, is the gate's scratch, zeroed here and left
    as the launch left it: [work items taken + programs, SMs claimed, each SM's state (1: in the share),
    each SM's programs] (a census of where the programs landed, for benchmarks).
    """
    check_paged_inputs(q, k_cache, v_cache)
    # tiles are sized by q's dtype, the one they are computed in (an fp8 tile is widened after its
    # load): an fp8 cache keeps the tile shape of its model dtype and halves the bytes per step
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if config is None:
        config = default_config(q.shape[0], k_cache.shape[1], fp8) if num_ctas is None else DecodeConfig()
    cfg = config.resolved(q.shape[-1], q.element_size(), fp8, num_kv_heads=k_cache.shape[1])
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
    gated = cfg.all_heads and cfg.sm_gate and num_ctas is not None
    # a work counter balances the load itself: one item per program is enough (the split costs a
    # reduce launch, which on a capped grid beside a GEMM is slow)
    dynamic = gated or (cfg.all_heads and cfg.dynamic)
    if num_ctas is None:
        on_gpu = q.is_cuda
        grid_cap = cfg.ctas_per_sm * num_sms(q.device.index or 0) if on_gpu else 1 << 30
    else:  # with a counter: a share of num_ctas SMs, gate_ctas_per_sm programs for each
        grid_cap = max(1, num_ctas) * (cfg.gate_ctas_per_sm if dynamic else 1)
    max_context = page_tables.shape[1] * page_size
    # work items per (sequence, partition): one per kv head, or one per block of kv heads
    heads_per_item = cfg.kv_heads_per_item if cfg.all_heads else 1
    num_head_blocks = triton.cdiv(Hkv, heads_per_item)
    part, num_parts = decode_plan(B, num_head_blocks, max_context, grid_cap, cfg, items_per_cta=1 if dynamic else 2)
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
    num_work = B * num_head_blocks * num_parts
    # what both kernels take: tensors, their strides, and the launch constants they share
    tensors = (q, k_cache, v_cache, page_tables, seq_lens, num_seqs, out, part_acc, part_m, part_l)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    shared = dict(GROUP=group, HEAD_DIM=D, PAGE_SIZE=page_size, BLOCK_N=cfg.block_n, SPLIT=split,
                  NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten, PRECISION=dot_precision(q.dtype),
                  FP16_DOTS=fp16_dots(q, k_cache), I32_OFFSETS=i32_offsets(k_cache, v_cache), num_warps=cfg.num_warps)
    if cfg.all_heads:
        block_h = triton.next_power_of_2(heads_per_item)
        # Triton >= 3.3 takes dots with M < 16 (it pads the MMA rows itself): the group is not
        # padded in the batched dot, which keeps q's shared-memory copy at heads x G x D
        # (Triton 3.7 for sm_90a: 200 KiB instead of 224 KiB of shared memory at 7 stages).
        block_g = triton.next_power_of_2(group)
        if not cfg.batched_dot:
            block_g = max(block_g, 16 // block_h)  # >= 16 rows in all
        # gated: programs on every SM (the gate keeps the share's); without a GPU there is no SM id,
        # and the grid is the share's programs, taking items from the counter as on the GPU
        gate = gated and q.is_cuda
        sms = num_sms(q.device.index or 0) if gate else 1
        # gated: twice the programs the SMs hold. Where the scheduler hands freed slots to the SMs
        # outside the share first (their programs exit at once), the surplus still reaches the share's
        # SMs that have fewer than gate_ctas_per_sm; the rest exit at once (gate_counts counts them).
        grid = 2 * cfg.gate_ctas_per_sm * sms if gate else min(num_work, grid_cap)
        # the work counter (and, gated on the GPU, the gate's SM claims: see the kernel)
        if gate and gate_counts is not None:
            assert gate_counts.shape == (2 + 2 * sms,) and gate_counts.dtype == torch.int32
            counter = gate_counts.zero_()
        elif dynamic:
            counter = torch.zeros(2 + 2 * sms if gate else 1, dtype=torch.int32, device=q.device)
        else:
            counter = seq_lens  # unread
        decode_all_heads_kernel[(grid,)](
            *tensors, scale * LOG2E, Hkv, num_head_blocks, num_parts, part, window, *strides,
            BLOCK_G=block_g, HEADS=heads_per_item, BLOCK_H=block_h, BATCHED=cfg.batched_dot,
            EVEN_HEADS=Hkv % heads_per_item == 0 and block_h == heads_per_item,
            work_counter_ptr=counter, share=num_ctas or 1, num_sms=sms, ctas_per_sm=cfg.gate_ctas_per_sm,
            smid_stride=cfg.gate_smid_stride if (num_ctas or 1) * cfg.gate_smid_stride <= sms else 1,
            DYNAMIC=dynamic, SM_GATE=gate, **shared,
        )  # fmt: skip
    else:
        _decode_kernel[(min(num_work, grid_cap),)](
            *tensors, scale * LOG2E, Hkv, num_parts, part, window, *strides,
            BLOCK_G=max(16, triton.next_power_of_2(group)), **shared,
        )  # fmt: skip
    if split:
        block_h = min(triton.next_power_of_2(Hq), REDUCE_HEADS)
        _decode_reduce_kernel[(min(B * triton.cdiv(Hq, block_h), grid_cap),)](
            part_acc, part_m, part_l, seq_lens, num_seqs, out,
            Hq, num_parts, part, window,
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    return out
