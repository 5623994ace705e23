"""The TMA decode attention kernel (DecodeConfig(tma=True), experimental, issue 12).

Work items are (sequence, head block, partition) as in the all-heads kernel, but each step is one
page of the head block, fetched with two bulk tensor copies (TMA: one for K, one for V) instead of
per-thread pointer loads. In the cache layout [pages, kv heads, page_size, head_dim] one page of
HEADS consecutive kv heads is one contiguous [HEADS * page_size, head_dim] tile, so a 2-D
descriptor over the cache viewed as [pages * kv heads * page_size, head_dim] addresses it by one
row coordinate. A bulk copy is issued by one thread and lands in shared memory on its own, so a
CTA keeps several 64 KiB steps in flight without spending its warps' issue slots on addresses:
what a capped grid (a third of the SMs, beside a GEMM) needs to stream the cache.

The scores are one 2-D dot per step: rows are (kv head, query head of its group), columns (kv head,
token); a row's scores against another kv head's tokens are masked to -inf, so p @ V adds nothing
from them. Launched by decode_attention.paged_decode_attention, which it shares the split
partitions and their reduce kernel with.
"""

import triton
import triton.language as tl

from nanoflow.kernels.decode_common import softmax_step, store_item, work_item


@triton.jit(do_not_specialize=["num_parts", "partition", "sliding_window"])
def decode_tma_kernel(
    q_ptr, k_desc, v_desc, page_tables_ptr, seq_lens_ptr, num_seqs_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, num_kv_heads, num_head_blocks, num_parts, partition, sliding_window,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_pt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr, FP16_DOTS: tl.constexpr,
):  # fmt: skip
    """Persistent over work items (seq, head block, partition); a head block is HEADS kv heads
    (num_kv_heads is a multiple of HEADS: the launcher picks such a HEADS). Rows of q are
    HEADS * BLOCK_G (kv head major, the group padded to a power of two); columns of a step are
    HEADS * PAGE_SIZE (kv head major: the page's tile as it lies in memory)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ROWS: tl.constexpr = HEADS * BLOCK_G
    COLS: tl.constexpr = HEADS * PAGE_SIZE
    offs_d = tl.arange(0, HEAD_DIM)
    r_h = tl.arange(0, ROWS) // BLOCK_G
    r_g = tl.arange(0, ROWS) % BLOCK_G
    c_h = tl.arange(0, COLS) // PAGE_SIZE
    c_t = tl.arange(0, COLS) % PAGE_SIZE
    same_head = r_h[:, None] == c_h[None, :]
    num_work = tl.load(num_seqs_ptr) * num_head_blocks * num_parts
    for w in tl.range(pid, num_work, nprog):
        part, hb, b, lo, end = work_item(w, num_parts, num_head_blocks, partition, sliding_window, seq_lens_ptr)
        row_ok = r_g < GROUP
        heads = (hb * HEADS + r_h) * GROUP + r_g  # query head of each row
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)  # fmt: skip
        if FP16_DOTS:
            q = q.to(tl.float16)
        page_row = page_tables_ptr + b * stride_pt
        head_row = hb * HEADS * PAGE_SIZE  # the block's first row within a page's tile
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        # start is page-aligned; only a sliding window gives an unaligned lo, so align it down.
        # Every step then holds >= 1 valid token of every head, so m_new is finite on every row.
        for n0 in tl.range((lo // PAGE_SIZE) * PAGE_SIZE, end, PAGE_SIZE, num_stages=NUM_STAGES):
            page = tl.load(page_row + n0 // PAGE_SIZE)
            row0 = page * (num_kv_heads * PAGE_SIZE) + head_row
            k = k_desc.load([row0, 0]).to(q.dtype)  # [COLS, HEAD_DIM]
            v = v_desc.load([row0, 0]).to(q.dtype)
            tok = n0 + c_t
            t_ok = (tok >= lo) & (tok < end)
            # slots past the sequence's end may never have been written: leftover bytes can be
            # inf or NaN, and 0 * NaN is NaN, so their V rows are zeroed (their p is 0 already)
            v = tl.where(t_ok[:, None], v, 0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [ROWS, COLS] fp32
            qk = tl.where(same_head & t_ok[None, :], qk * qk_scale, float("-inf"))
            m_i, l_i, acc = softmax_step(qk, v, m_i, l_i, acc, PRECISION)
        store_item(acc, m_i, l_i, heads, row_ok, b, part, lo, end, num_kv_heads * GROUP, num_parts,
                   out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, stride_ob, stride_oh, HEAD_DIM, SPLIT)
