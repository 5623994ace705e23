"""Decode attention over the paged KV cache: one query per sequence, at position seq_len - 1.

The PyTorch reference and the Triton kernel (persistent over (sequence, kv head, partition) work
items, with a reduce kernel that merges the partitions of long contexts). What both attention
modules share, the cache-read conventions included, is in attention_common.py.

DecodeConfig(all_heads=True) selects a second kernel (experimental, for capped grids, issue 12):
work items (sequence, partition) covering every kv head, so each step loads whole pages (one
contiguous run of all heads per page) and each item is Hkv times longer; same reduce kernel.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanoflow.kernels.attention_common import LOG2E, check_paged_inputs, dot_precision, fp16_dots, gather_pages, num_sms
from nanoflow.kernels.decode_all_heads import decode_all_heads_kernel
from nanoflow.kernels.decode_tma import decode_tma_kernel


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
    # --- the all-heads kernel (decode_all_heads_kernel; experimental, issue 12): a work item is
    # (sequence, partition) and covers the kv heads of the sequence, so each step loads whole pages
    # (all heads: one contiguous Hkv x page_size x head_dim run per page, for K and for V) and the
    # items are Hkv times longer (the pipeline ramp of each item is paid Hkv times less often).
    # block_n / num_warps / num_stages keep their meaning; their defaults differ (resolved()).
    all_heads: bool = False
    # kv heads per work item (None: as many as fit 64 KiB of K+V per step: all 8 of Llama-3-8B
    # in bf16). Fewer heads per item = fewer bytes per step = deeper pipelines in the same shared
    # memory, but shorter runs per page and more work items.
    kv_heads_per_item: int | None = None
    # True: one batched 3-D tl.dot per step, [heads, G, D] x [heads, D, block_n] (MMA v2: Triton
    # puts the warps on the head axis, one warp per kv head at 8 warps x 8 heads). False: one 2-D
    # dot for all heads, [heads * G, D] x [D, heads * block_n], the (query head, other kv head)
    # blocks masked out: the plain 2-D path of the per-head kernel, at heads times the useful FLOPs.
    batched_dot: bool = True
    # --- the TMA kernel (decode_tma_kernel; experimental, issue 12): all-heads work items whose
    # steps are one page of the head block, fetched by two bulk tensor copies (K and V). block_n
    # is the page size; kv_heads_per_item must divide the kv heads (None: as many as fit 64 KiB of
    # K+V per step); num_stages defaults to 3 (three 64 KiB buffers).
    tma: bool = False

    def resolved(
        self, head_dim: int, elem_size: int, fp8_cache: bool = False, num_kv_heads: int | None = None
    ) -> DecodeConfig:
        """This config with the None fields filled in for the head_dim, q's element size and cache
        (and, for all_heads, the number of kv heads)."""
        if self.tma:
            return self._resolved_tma(head_dim, 1 if fp8_cache else elem_size, num_kv_heads or 1)
        if self.all_heads:
            return self._resolved_all_heads(head_dim, elem_size, fp8_cache, num_kv_heads or 1)
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

    def _resolved_all_heads(self, head_dim: int, elem_size: int, fp8_cache: bool, num_kv_heads: int) -> DecodeConfig:
        """Defaults of the all-heads kernel, not measured on a GPU yet (kernel_check's
        decode_all_heads section sweeps around them). The trade-off, for Llama-3-8B's 8 kv heads x
        128 in bf16:
        - block_n = 16 tokens (one page of every head: 32 KiB of K + 32 KiB of V, each one
          contiguous run) is the smallest step: p @ V's K dimension (block_n) must be >= 16. So a
          step is 64 KiB, 8x the bytes per token of the per-head kernel's steps.
        - Triton gives the page-table load (it feeds the K/V addresses) stages of its own: K/V
          loads are issued L = (num_stages - 1) // 2 steps ahead into L shared-memory buffers of
          one step each. Compiled for sm_90a (Triton 3.7.1 on the CPU, ptxas -v), 8 warps:
          num_stages 5 -> L = 2, 136 KiB of shared memory, 128 KiB of K/V in flight per CTA;
          num_stages 7 -> L = 3, 200 KiB (of 227), 192 KiB in flight; 3 -> L = 1, 72 KiB. The
          streaming read that reaches 3.66 TB/s on 44 CTAs keeps ~96 KiB in flight per CTA, and
          the per-head kernel's capped-grid default also spends ~200 KiB (8 stages). 204-206
          registers a thread, no spills (4 warps spill: each warp then holds two heads' fp32
          accumulators).
        - Fewer heads per item (kv_heads_per_item=4: 32 KiB steps) buy a deeper pipeline in less
          shared memory (9 stages: L = 4, 132 KiB) at shorter runs per page and 2x the work items.
        - fp8 halves the bytes: block_n 32 (two pages a step) keeps 64 KiB steps (255 registers,
          no spills at 7 stages)."""
        cache_bytes = 1 if fp8_cache else elem_size
        block_n = self.block_n or (32 if fp8_cache else 16)
        if self.kv_heads_per_item:
            heads = min(self.kv_heads_per_item, num_kv_heads)
        else:  # as many heads as fit 64 KiB of K + V per step, a power of two
            fit = max(1, (64 * 1024) // (2 * block_n * head_dim * cache_bytes))
            heads = min(num_kv_heads, 1 << (fit.bit_length() - 1))
        step = 2 * block_n * triton.next_power_of_2(heads) * head_dim * cache_bytes
        latency = max(1, min(4, (192 * 1024) // step))  # K/V steps in flight = shared-memory buffers
        return dataclasses.replace(
            self, block_n=block_n, kv_heads_per_item=heads,
            num_warps=self.num_warps or (8 if heads >= 8 else 4),
            num_stages=self.num_stages or 2 * latency + 1)

    def _resolved_tma(self, head_dim: int, cache_bytes: int, num_kv_heads: int) -> DecodeConfig:
        # block_n is the page size: the launcher sets it from the cache before resolving
        page = self.block_n or 16
        want = self.kv_heads_per_item or max(1, (64 * 1024) // (2 * page * head_dim * cache_bytes))
        # a bulk copy's box is at most 256 rows; the head block must tile the kv heads exactly
        heads = min(want, 256 // page, num_kv_heads)
        while num_kv_heads % heads:
            heads -= 1
        return dataclasses.replace(self, all_heads=True, block_n=page, kv_heads_per_item=heads,
                                   num_warps=self.num_warps or 4, num_stages=self.num_stages or 3)

    def smem_per_stage(self, head_dim: int, cache_bytes: int, num_kv_heads: int) -> int:
        """Bytes of K + V one step loads (one shared-memory buffer of the software pipeline), for a
        resolved config."""
        heads = triton.next_power_of_2(self.kv_heads_per_item or num_kv_heads) if self.all_heads else 1
        return 2 * self.block_n * heads * head_dim * cache_bytes



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


def _launch_tma(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_tables: torch.Tensor,
    seq_lens: torch.Tensor, num_seqs: torch.Tensor, out: torch.Tensor, part_acc: torch.Tensor,
    part_m: torch.Tensor, part_l: torch.Tensor, scale: float, window: int, num_parts: int, part: int,
    grid: int, cfg: DecodeConfig,
) -> None:  # fmt: skip
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the TMA kernel reads a contiguous cache"
    B, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[1], k_cache.shape[2]
    heads = cfg.kv_heads_per_item
    # the cache as rows of head_dim: one page of `heads` kv heads is `heads * page_size` rows
    rows = k_cache.shape[0] * Hkv * page_size
    k_desc, v_desc = (TensorDescriptor(c, [rows, D], [D, 1], [heads * page_size, D]) for c in (k_cache, v_cache))
    decode_tma_kernel[(grid,)](
        q, k_desc, v_desc, page_tables, seq_lens, num_seqs,
        out, part_acc, part_m, part_l,
        scale * LOG2E, Hkv, Hkv // heads, num_parts, part, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
        GROUP=Hq // Hkv, BLOCK_G=triton.next_power_of_2(Hq // Hkv), HEADS=heads, HEAD_DIM=D,
        PAGE_SIZE=page_size, SPLIT=num_parts > 1, NUM_STAGES=cfg.num_stages,
        PRECISION=dot_precision(q.dtype), FP16_DOTS=fp16_dots(q, k_cache),
        num_warps=cfg.num_warps,
    )  # fmt: skip


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
    """Triton version of paged_decode_attention_ref. q: [B, Hq, D] with any row and head strides
    (e.g. the q part of a fused qkv buffer; a non-contiguous last dim costs a copy); out: None or a
    view of q's shape with a contiguous last dim (e.g. rows of a [T_total, Hq * D] buffer viewed as
    [B, Hq, D]); page_tables: [B, max_pages] int32; seq_lens: [B] int32, 0 <= seq_len <= max_pages *
    page_size.

    num_ctas caps the (persistent) grid, e.g. to leave SMs to a concurrent GEMM; None fills the
    GPU. num_seqs ([1] int32 on the device, <= B) computes only the first num_seqs rows and leaves
    the others untouched: a CUDA graph captured for B rows then serves every smaller batch. A
    sequence with seq_len 0 gets zeros. No host syncs: CUDA-graph capturable.
    config.all_heads=True runs the all-heads kernel instead (same arguments and results).
    """
    check_paged_inputs(q, k_cache, v_cache)
    # tiles are sized by q's dtype, the one they are computed in (an fp8 tile is widened after its
    # load): an fp8 cache keeps the tile shape of its model dtype and halves the bytes per step
    config = config or DecodeConfig()
    if config.tma:  # one page per step
        config = dataclasses.replace(config, block_n=k_cache.shape[2])
    cfg = config.resolved(
        q.shape[-1], q.element_size(), k_cache.dtype == torch.float8_e4m3fn, num_kv_heads=k_cache.shape[1]
    )
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
        grid_cap = cfg.ctas_per_sm * num_sms(q.device.index or 0) if on_gpu else 1 << 30
    else:
        grid_cap = max(1, num_ctas)
    max_context = page_tables.shape[1] * page_size
    # work items per (sequence, partition): one per kv head, or one per block of kv heads
    heads_per_item = cfg.kv_heads_per_item if cfg.all_heads else 1
    num_head_blocks = triton.cdiv(Hkv, heads_per_item)
    part, num_parts = _decode_plan(B, num_head_blocks, max_context, grid_cap, cfg)
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
    if cfg.all_heads:
        block_h = triton.next_power_of_2(heads_per_item)
        # Triton >= 3.3 takes dots with M < 16 (it pads the MMA rows itself): the group is not
        # padded in the batched dot, which keeps q's shared-memory copy at heads x G x D
        # (Triton 3.7 for sm_90a: 200 KiB instead of 224 KiB of shared memory at 7 stages).
        block_g = triton.next_power_of_2(group)
        if not cfg.batched_dot:
            block_g = max(block_g, 16 // block_h)  # >= 16 rows in all
        decode_all_heads_kernel[(min(num_work, grid_cap),)](
            q, k_cache, v_cache, page_tables, seq_lens, num_seqs,
            out, part_acc, part_m, part_l,
            scale * LOG2E, Hkv, num_head_blocks, num_parts, part, window,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, BLOCK_G=block_g, HEADS=heads_per_item, BLOCK_H=block_h, HEAD_DIM=D,
            PAGE_SIZE=page_size, BLOCK_N=cfg.block_n, SPLIT=split, BATCHED=cfg.batched_dot,
            NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten, PRECISION=dot_precision(q.dtype),
            FP16_DOTS=fp16_dots(q, k_cache),
            num_warps=cfg.num_warps,
        )  # fmt: skip
    else:
        _decode_kernel[(min(num_work, grid_cap),)](
            q, k_cache, v_cache, page_tables, seq_lens, num_seqs,
            out, part_acc, part_m, part_l,
            scale * LOG2E, Hkv, num_parts, part, window,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE_SIZE=page_size,
            BLOCK_N=cfg.block_n, SPLIT=split,
            NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten, PRECISION=dot_precision(q.dtype),
            FP16_DOTS=fp16_dots(q, k_cache),
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
