"""The all-kv-heads decode attention kernel (DecodeConfig(all_heads=True), experimental, issue 12).

A work item is (sequence, partition) and covers every kv head (or kv_heads_per_item of them), so
each step loads whole pages: one contiguous run of all heads' K (and V) per page, instead of one
4 KiB slice per head. Meant for capped grids, where today's per-head kernel keeps too few bytes in
flight per CTA. Launched by decode_attention.paged_decode_attention, which it shares the split
partitions and their reduce kernel with.
"""

import triton
import triton.language as tl

from nanoflow.kernels.attention_common import token_offsets
from nanoflow.kernels.decode_common import (
    full_steps,
    partial_step,
    softmax_step,
    store_item,
    work_item,
)


@triton.jit(do_not_specialize=["num_parts", "partition", "sliding_window"])
def decode_all_heads_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, seq_lens_ptr, num_seqs_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, num_kv_heads, num_head_blocks, num_parts, partition, sliding_window,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
    stride_cp, stride_ch, stride_ct,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    BATCHED: tl.constexpr, NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr, PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr, I32_OFFSETS: tl.constexpr, EVEN_HEADS: tl.constexpr,
    work_counter_ptr, share, num_sms, ctas_per_sm, smid_stride, DYNAMIC: tl.constexpr, SM_GATE: tl.constexpr,
):  # fmt: skip
    """Persistent over work items (seq, head block, partition); a head block is HEADS kv heads
    (all of them by default), padded to BLOCK_H. Each step loads BLOCK_N tokens of every kv head
    of the block: per page, one contiguous HEADS x PAGE_SIZE x HEAD_DIM run for K and one for V.

    BATCHED: rows are [BLOCK_H, BLOCK_G] (kv head, query head of its group padded to a power of two),
    one batched dot per step: [BLOCK_H, BLOCK_G, D] x [BLOCK_H, D, BLOCK_N]. Else rows are BLOCK_H * BLOCK_G
    and columns BLOCK_H * BLOCK_N (kv head major), one 2-D dot with the scores of a query head
    against another kv head's tokens masked to -inf (their p is 0, so p @ V adds nothing).
    Rows of padded heads (h >= HEADS or past num_kv_heads) load zeros, stay finite and are not stored.

    DYNAMIC: programs take work items from an atomic counter (work_counter_ptr[0], zero at launch)
    instead of striding over them. SM_GATE (with DYNAMIC; GPU only): the grid has ctas_per_sm
    programs for every SM; `share` of the num_sms SMs run up to ctas_per_sm each and the other
    programs exit at once (DecodeConfig.sm_gate). work_counter_ptr then holds 2 + 2 * num_sms zeros:
    the work counter, the SMs claimed, each SM's state and each SM's programs."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if SM_GATE:
        # The share is the first `share` SMs a program of this launch reaches, not a fixed set of
        # SM ids: beside a running GEMM, programs land only where its CTAs have left, and a fixed
        # set could leave the work to the few programs that happened to land there. The first
        # program on an SM claims it (state 3 while it decides, then 1 = in the share, 2 = not);
        # the others on that SM wait the few cycles that takes. At most ctas_per_sm run on one SM.
        # An SM off the stride joins while the share is empty: where another kernel fills every SM
        # on the stride (the other nano-batch's gated decode, launched a few us earlier), every
        # program of this launch lands off it, and without this they all left with the work undone
        # (H200, ping-pong on 66 SMs: a 447-decode attention "ran" in 12 us). The share may then be
        # one SM, so the gate is correct but not robust beside other kernels: CAPPED has no gate.
        smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        state_ptr = work_counter_ptr + 2 + smid
        state = tl.atomic_cas(state_ptr, 0, 3)
        if state == 0:
            state = 2
            if smid % smid_stride == 0 or tl.atomic_add(work_counter_ptr + 1, 0) == 0:
                if tl.atomic_add(work_counter_ptr + 1, 1) < share:
                    state = 1
            tl.atomic_xchg(state_ptr, state)
        while state == 3:
            state = tl.atomic_add(state_ptr, 0)
        if state != 1:
            return  # an SM outside the share: leave it to the work beside this kernel
        if tl.atomic_add(work_counter_ptr + 2 + num_sms + smid, 1) >= ctas_per_sm:
            return  # the SM already runs its share of programs
    offs_d = tl.arange(0, HEAD_DIM)
    if BATCHED:
        r_h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]: kv head of a row
        r_g = tl.arange(0, BLOCK_G)[None, :]  # [1, BLOCK_G]: query head within the group
        c_h = tl.arange(0, BLOCK_H)  # kv head of a K/V slice
        c_n = tl.arange(0, BLOCK_N)  # token of a K/V column
    else:
        r_h = tl.arange(0, BLOCK_H * BLOCK_G) // BLOCK_G
        r_g = tl.arange(0, BLOCK_H * BLOCK_G) % BLOCK_G
        c_h = tl.arange(0, BLOCK_H * BLOCK_N) // BLOCK_N
        c_n = tl.arange(0, BLOCK_H * BLOCK_N) % BLOCK_N
    num_work = tl.load(num_seqs_ptr) * num_head_blocks * num_parts
    # Two loops over the same body, on purpose: work from the counter needs a while loop, and the
    # static stride keeps tl.range's pipelining (and FLATTEN) on all SMs, where it was measured.
    if DYNAMIC:
        w = tl.atomic_add(work_counter_ptr, 1)
        while w < num_work:
            _work_item(
                w, q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, seq_lens_ptr,
                out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
                qk_scale, num_kv_heads, num_head_blocks, num_parts, partition, sliding_window,
                stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
                stride_cp, stride_ch, stride_ct, offs_d, r_h, r_g, c_h, c_n,
                GROUP, HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, SPLIT, BATCHED, NUM_STAGES, PRECISION,
                FP16_DOTS, I32_OFFSETS, EVEN_HEADS,
            )  # fmt: skip
            w = tl.atomic_add(work_counter_ptr, 1)
    else:
        for w in tl.range(pid, num_work, nprog, num_stages=NUM_STAGES, flatten=FLATTEN):
            _work_item(
                w, q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, seq_lens_ptr,
                out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
                qk_scale, num_kv_heads, num_head_blocks, num_parts, partition, sliding_window,
                stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
                stride_cp, stride_ch, stride_ct, offs_d, r_h, r_g, c_h, c_n,
                GROUP, HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, SPLIT, BATCHED, NUM_STAGES, PRECISION,
                FP16_DOTS, I32_OFFSETS, EVEN_HEADS,
            )  # fmt: skip


@triton.jit
def _work_item(
    w, q_ptr, k_cache_ptr, v_cache_ptr, page_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, num_kv_heads, num_head_blocks, num_parts, partition, sliding_window,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
    stride_cp, stride_ch, stride_ct, offs_d, r_h, r_g, c_h, c_n,
    GROUP: tl.constexpr, HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    BATCHED: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr, I32_OFFSETS: tl.constexpr, EVEN_HEADS: tl.constexpr,
):  # fmt: skip
    """One work item w: its online softmax over its tokens, stored normalised or as partials."""
    part, hb, b, lo, end = work_item(w, num_parts, num_head_blocks, partition, sliding_window, seq_lens_ptr)
    kvh_r = hb * HEADS + r_h
    row_ok = (r_h < HEADS) & (kvh_r < num_kv_heads) & (r_g < GROUP)  # the rows that are stored
    heads = kvh_r * GROUP + r_g  # query head of each row
    q = tl.load(
        q_ptr + b * stride_qb + tl.expand_dims(heads, -1) * stride_qh + offs_d,
        mask=tl.expand_dims(row_ok, -1), other=0.0,
    )  # fmt: skip
    if FP16_DOTS:
        q = q.to(tl.float16)
    kvh_c = hb * HEADS + c_h
    c_ok = (c_h < HEADS) & (kvh_c < num_kv_heads)
    head_off = kvh_c * stride_ch if I32_OFFSETS else kvh_c.to(tl.int64) * stride_ch
    page_row = page_tables_ptr + b * stride_pt
    m_i = tl.full(heads.shape, float("-inf"), dtype=tl.float32)
    l_i = tl.zeros(heads.shape, dtype=tl.float32)
    acc = tl.zeros(q.shape, dtype=tl.float32)  # [rows..., HEAD_DIM]
    # the partial first and last steps with token masks, then the full ones without (decode_common)
    for j in range(2):
        n0, run = partial_step(j, lo, end, BLOCK_N)
        if run:
            m_i, l_i, acc = _step(
                n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, head_off, c_ok, r_h, c_h, c_n, offs_d,
                qk_scale, stride_cp, stride_ct, m_i, l_i, acc,
                PAGE_SIZE, BATCHED, PRECISION, I32_OFFSETS, True, EVEN_HEADS,
            )  # fmt: skip
    full_lo, full_hi = full_steps(lo, end, BLOCK_N)
    for n0 in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES):
        m_i, l_i, acc = _step(
            n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, head_off, c_ok, r_h, c_h, c_n, offs_d,
            qk_scale, stride_cp, stride_ct, m_i, l_i, acc,
            PAGE_SIZE, BATCHED, PRECISION, I32_OFFSETS, False, EVEN_HEADS,
        )  # fmt: skip
    store_item(acc, m_i, l_i, heads, row_ok, b, part, lo, end, num_kv_heads * GROUP, num_parts,
               out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, stride_ob, stride_oh, HEAD_DIM, SPLIT)


@triton.jit
def _step(
    n0, lo, end, q, k_cache_ptr, v_cache_ptr, page_row, head_off, c_ok, r_h, c_h, c_n, offs_d,
    qk_scale, stride_cp, stride_ct, m_i, l_i, acc,
    PAGE_SIZE: tl.constexpr, BATCHED: tl.constexpr, PRECISION: tl.constexpr, I32_OFFSETS: tl.constexpr,
    MASKED: tl.constexpr, EVEN_HEADS: tl.constexpr,
):  # fmt: skip
    """One K/V step of the online softmax from token n0: every kv head's BLOCK_N tokens (MASKED:
    tokens outside [lo, end) count for nothing; else all are valid). EVEN_HEADS: every kv head of
    the block exists, so loads need no head mask."""
    tok_off, t_mask = token_offsets(n0, c_n, lo, end, page_row, stride_cp, stride_ct, PAGE_SIZE, I32_OFFSETS, MASKED)
    if BATCHED:  # [BLOCK_H, BLOCK_N, D]: for each page, HEADS x PAGE_SIZE x D contiguous elements
        kv_off = head_off[:, None, None] + tok_off[None, :, None] + offs_d[None, None, :]
        head_mask, tok_mask = c_ok[:, None, None], t_mask[None, :, None]
    else:  # [BLOCK_H * BLOCK_N, D], kv head major: the same contiguous runs
        kv_off = (head_off + tok_off)[:, None] + offs_d[None, :]
        head_mask, tok_mask = c_ok[:, None], t_mask[:, None]
    if MASKED:
        k = tl.load(k_cache_ptr + kv_off, mask=head_mask & tok_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=head_mask & tok_mask, other=0.0).to(q.dtype)
    elif EVEN_HEADS:
        k = tl.load(k_cache_ptr + kv_off).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + kv_off, mask=head_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=head_mask, other=0.0).to(q.dtype)
    if BATCHED:
        qk = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION) * qk_scale  # [H, G, N] fp32
        if MASKED:
            qk = tl.where(t_mask[None, None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 2))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [H * G, H * N] fp32
        mine = r_h[:, None] == c_h[None, :]  # a query head against its own kv head's tokens
        if MASKED:
            mine = mine & t_mask[None, :]
        qk = tl.where(mine, qk * qk_scale, float("-inf"))
        m_new, l_i, acc = softmax_step(qk, v, m_i, l_i, acc, PRECISION)
    return m_new, l_i, acc

