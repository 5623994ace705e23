"""What the decode attention kernels share: their launch parameters (DecodeConfig), the split of
long contexts into partitions (decode_plan), and the Triton pieces every kernel inlines: a work
item's bounds and the store of its result (normalised, or the partials the reduce kernel merges).

The per-head kernel (decode_attention.py) has a work item per (sequence, kv head, partition); the
all-heads kernel (decode_all_heads.py) one per (sequence, block of kv heads, partition).
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl


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
    # all-heads kernel on a capped grid (num_ctas = the share of SMs): sm_gate launches
    # gate_ctas_per_sm programs for every SM; the first num_ctas SMs they reach form the share (the
    # programs elsewhere exit at once) and take work items from an atomic counter, so each SM of the
    # share runs several programs (one computes while another waits on its loads). Needs a config
    # of which that many fit one SM (shared memory, registers); experimental, issue 12.
    sm_gate: bool = False
    gate_ctas_per_sm: int = 2
    # sm_gate: only SMs whose id is a multiple of this may join the share (2: at most one SM of each
    # pair of neighbouring ids), so a share claimed first-come does not crowd into a few SM clusters
    gate_smid_stride: int = 1
    # all-heads kernel without the gate: programs take work items from an atomic counter instead of
    # a static stride, so programs that start late beside a running GEMM take fewer (no tail)
    dynamic: bool = False

    def resolved(
        self, head_dim: int, elem_size: int, fp8_cache: bool = False, num_kv_heads: int | None = None
    ) -> DecodeConfig:
        """This config with the None fields filled in for the head_dim, q's element size and cache
        (and, for all_heads, the number of kv heads)."""
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
        """Defaults of the all-heads kernel (kernel_check's decode_all_heads section sweeps around
        them; the H200 measurements are in docs/pipeline_history.md). The trade-off, for Llama-3-8B's 8 kv
        heads x 128 in bf16:
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


# The kernel a capped grid runs (decode attention beside a GEMM in a pipeline) unless told
# otherwise: the all-heads kernel, 4 kv heads a work item, 4 warps, 5 stages (the most robust row of
# the H200 sweeps), gate_ctas_per_sm (2) programs per SM of the share, placed wherever the GPU has
# room and taking work items from a counter (programs that start late take fewer). No SM gate
# (sm_gate): the gate's share is whichever SMs have room when its programs land, and its other
# programs leave at once, so beside kernels that hold most SMs the share forms on a few and stays
# there, and beside the other nano-batch's gated decode (ping-pong on 66 SMs, even ids) it once
# left all the work undone (fixed since, decode_all_heads.py). H200, 2026-11-30 (eighth stop),
# Llama-2-70B TP2, fp8, 1,024 decodes, ping-pong on 66 SMs: each decode attention 1,797 us gated
# against 410 with the counter, the step 645 ms against 157 (sequential 165); Llama-3-8B TP2 1.14x /
# 1.08x over sequential at 1,024 / 512 decodes; benchmarks/results/tp2_overlap_diag_h200_20261130/.
# The one-GPU pipeline wins measured with the gate (docs/pipeline.md) are to be measured again.
CAPPED = DecodeConfig(all_heads=True, dynamic=True, kv_heads_per_item=4, num_warps=4, num_stages=5)
# CAPPED until then, for the benchmarks' comparisons: the same kernel behind the SM gate, its share
# taken first-come among even SM ids (spread over the GPU rather than crowded into neighbours)
GATED_EVEN = dataclasses.replace(CAPPED, dynamic=False, sm_gate=True, gate_smid_stride=2)

# An fp8 cache's decodes on all SMs when there are many of them: the all-heads kernel, 4 kv heads a
# work item, one 2-D dot, 5 stages. H200, kernel_check 2026-11-30 (fifth stop), TB/s of fp8 cache:
# at 512 x 1,024 3.22 against the per-head default's 2.41; at 256 x 1,024 2.25 against 2.36 (too
# few items of 4 heads to fill 132 SMs evenly), so the threshold sits between the two batches.
FP8_MANY = DecodeConfig(all_heads=True, kv_heads_per_item=4, batched_dot=False, num_stages=5)
FP8_MANY_MIN_HEAD_ITEMS = 3072  # sequences x kv heads


def default_config(batch: int, num_kv_heads: int, fp8_cache: bool) -> DecodeConfig:
    """The config of a decode launch on all SMs that names none, from host-known shapes: a batch of
    `batch` rows (a CUDA graph's capacity) over num_kv_heads kv heads."""
    if fp8_cache and batch * num_kv_heads >= FP8_MANY_MIN_HEAD_ITEMS:
        return FP8_MANY
    return DecodeConfig()


def decode_plan(
    batch: int, num_kv_heads: int, max_context: int, grid_cap: int, cfg: DecodeConfig, items_per_cta: int = 2
) -> tuple[int, int]:
    """(partition_size, num_parts) from host-known shapes only, so CUDA graphs can capture it."""
    if cfg.partition_size is not None:
        part = triton.cdiv(cfg.partition_size, cfg.block_n) * cfg.block_n
    else:
        # split until there are >= items_per_cta items per CTA (load balance), but not below min_partition
        want = max(1, triton.cdiv(items_per_cta * grid_cap, batch * num_kv_heads))
        part = triton.cdiv(triton.cdiv(max_context, want), cfg.block_n) * cfg.block_n
        part = max(part, triton.cdiv(cfg.min_partition, cfg.block_n) * cfg.block_n)
    part = min(part, triton.cdiv(max_context, cfg.block_n) * cfg.block_n)
    return part, triton.cdiv(max_context, part)


@triton.jit
def work_item(w, num_parts, num_head_blocks, partition, sliding_window, seq_lens_ptr):
    """(partition, head block, sequence, first token, end) of work item w. Partition fastest:
    neighbouring CTAs share one long sequence's work. A sliding window moves the first token up."""
    part = w % num_parts
    hb = (w // num_parts) % num_head_blocks
    b = w // (num_parts * num_head_blocks)
    seq_len = tl.load(seq_lens_ptr + b)
    start = part * partition
    end = tl.minimum(start + partition, seq_len)
    lo = tl.where(sliding_window > 0, tl.maximum(start, seq_len - sliding_window), start)
    return part, hb, b, lo, end


# A work item's steps are BLOCK_N-aligned: only a sliding window gives an unaligned lo, and its step
# is aligned down, so every step holds >= 1 valid token of every head (m_new stays finite). Only the
# first step (a window's unaligned lo) and the last can be partial. They run first, through one
# masked copy of the step (one copy, not two: each copy of a step's code holds registers of its own);
# the steps wholly inside [lo, end) run a copy without token masks, 16-35% fewer instructions a step
# (benchmarks/decode_sass.py), which is what a CTA on a capped grid runs short of.
@triton.jit
def full_steps(lo, end, BLOCK_N: tl.constexpr):
    """[first, end) of the work item's steps that lie wholly inside [lo, end) (may be empty)."""
    full_lo = tl.cdiv(lo, BLOCK_N) * BLOCK_N
    return full_lo, tl.maximum((end // BLOCK_N) * BLOCK_N, full_lo)


@triton.jit
def partial_step(j, lo, end, BLOCK_N: tl.constexpr):
    """(first token, whether it exists) of the item's partial first (j = 0) or last (j = 1) step. An
    empty item (lo >= end) has none; an item inside one step has only the first."""
    start = (lo // BLOCK_N) * BLOCK_N
    full_lo, full_hi = full_steps(lo, end, BLOCK_N)
    n0 = tl.where(j == 0, start, full_hi)
    return n0, (j == 0) & (start < full_lo) & (lo < end) | (j == 1) & (full_hi < end)


@triton.jit
def softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One step of the online softmax over 2-D scores qk [rows, N] (log2 domain, masked to -inf;
    every row holds >= 1 valid score, so the new max is finite): the new (m, l, acc) after p @ v."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_item(
    acc, m_i, l_i, heads, row_ok, b, part, lo, end, num_q_heads, num_parts,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Stores a work item's rows (heads: the query head of each row, any shape; acc: that shape x
    HEAD_DIM). SPLIT: the unnormalised partials, into the reduce kernel's [B, Hq, num_parts] rows;
    else the normalised output, where an empty sequence (seq_len 0, e.g. CUDA-graph padding) gets
    zeros, not NaN."""
    offs_d = tl.arange(0, HEAD_DIM)
    if SPLIT:
        row_p = (b * num_q_heads + heads) * num_parts + part
        keep = row_ok & (lo < end)
        tl.store(part_acc_ptr + tl.expand_dims(row_p, -1) * HEAD_DIM + offs_d, acc, mask=tl.expand_dims(keep, -1))
        tl.store(part_m_ptr + row_p, m_i, mask=keep)
        tl.store(part_l_ptr + row_p, l_i, mask=keep)
    else:
        o = acc / tl.expand_dims(tl.where(l_i > 0, l_i, 1.0), -1)
        o_ptrs = out_ptr + b * stride_ob + tl.expand_dims(heads, -1) * stride_oh + offs_d
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=tl.expand_dims(row_ok, -1))
