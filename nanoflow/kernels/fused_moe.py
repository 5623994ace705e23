"""Mixture-of-experts FFN (Mixtral): tokens grouped by expert on the device, then two grouped GEMMs.

The fused path never synchronises with the host and every shape depends only on the token count,
so a CUDA graph can capture it:

1. `align`: the T * top_k (token, slot) pairs, numbered pair = token * top_k + slot, are sorted
   by expert into `sorted_pairs`, each expert's run padded to a multiple of BLOCK_M with the
   sentinel T * top_k. The array has a fixed capacity (T * top_k + E * (BLOCK_M - 1), rounded up
   to BLOCK_M): the most any routing can need. `block_expert` names each block's expert and
   `num_padded` (on the device) how many entries are live; the GEMM blocks past it exit at once.
2. `_moe_gemm_kernel`, GATED: act[pair] = silu(x[token] @ w1[e].T) * (x[token] @ w3[e].T), the
   gate and up halves of w13 accumulated side by side so SiLU-and-mul happens in registers and
   [T * top_k, 2 * I] never reaches memory.
3. `_moe_gemm_kernel`, not GATED: down[pair] = weight[pair] * (act[pair] @ w2[e].T), then
   out[token] = sum over the top_k slots of down (a [T, top_k, H] sum, no atomics: deterministic).

Tiles (moe_configs.py): each GEMM has its own, tuned per GPU, shape and token count; the two share
BLOCK_M, the align's block size. A config may also fetch the weight tiles by TMA (`tma_weights`) and
put the rows in slot order (`sorted_rows`: x gathered once before gate_up, act left in slot order
for down), so both GEMMs read contiguous A tiles, by TMA too; the tuning sweep picks per GPU.

Expert parallelism (`ExpertShard`): w13 and w2 hold one rank's whole experts and the routing names
global ids. The align leaves out the pairs of other ranks' experts (no slot, no block, no GEMM
work), so their rows of `down` are never written: they start at zero, and `out` is this rank's
partial sum, which the layer's all-reduce adds up over the ranks.

References: `moe_experts_ref` (the eager path: a loop over the experts present, which reads the
expert ids on the host) and `moe_per_token_ref` (each token alone, the plainest statement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanoflow.kernels.activation import silu_and_mul_ref
from nanoflow.kernels.attention_common import dot_precision
from nanoflow.kernels.moe_align import moe_align
from nanoflow.kernels.moe_configs import MoEConfig, MoEConfigs, pick_config


@dataclass(frozen=True)
class ExpertShard:
    """Expert parallelism: w13 and w2 hold the experts [first, first + w13.shape[0]) of the model's
    `total`, and topk_ids name experts by their global ids; a pair routed to another expert is
    another rank's and adds nothing here."""

    first: int
    total: int


def _first_expert(shard: ExpertShard | None) -> int:
    return shard.first if shard is not None else 0


# --- references ---------------------------------------------------------------------------------


def moe_experts_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    out: torch.Tensor, shard: ExpertShard | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_weights [T, k] (x's dtype),
    topk_ids [T, k] int; writes sum_k weight * down(silu(gate) * up) into out [T, H], over the pairs
    of w13's experts (shard: which those are). Syncs (.tolist())."""
    out.zero_()
    first = _first_expert(shard)
    for e in topk_ids.unique().tolist():
        if not 0 <= e - first < w13.shape[0]:
            continue  # another rank's expert
        rows, slot = torch.where(topk_ids == e)
        h = silu_and_mul_ref(F.linear(x[rows], w13[e - first]))
        out.index_add_(0, rows, F.linear(h, w2[e - first]) * topk_weights[rows, slot, None])
    return out


def moe_per_token_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    shard: ExpertShard | None = None,
) -> torch.Tensor:
    """The same sum as moe_experts_ref, token by token and slot by slot, in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s]) - _first_expert(shard)
            if not 0 <= e < w13.shape[0]:
                continue
            gate_up = w13[e].float() @ x[t].float()
            h = silu_and_mul_ref(gate_up[None])[0]
            out[t] += float(topk_weights[t, s]) * (w2[e].float() @ h)
    return out.to(x.dtype)


# --- align --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aligned:
    # [capacity] int32: pair ids grouped by (local) expert; num_pairs marks padding; expert parallel:
    # only the pairs of this rank's experts
    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor  # [capacity // block_m] int32: each block's expert (-1 past num_padded)
    num_padded: torch.Tensor  # [1] int32: live entries of sorted_pairs (a multiple of block_m)
    num_pairs: int  # T * top_k (all of them, this rank's or not: pair ids index the [T * top_k] rows)
    block_m: int


def align_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Entries any routing of num_pairs pairs can need: each (local) expert pads at most block_m - 1."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0) -> Aligned:
    """Groups the (token, slot) pairs by expert, block-aligned: align_ref's result, bit for bit,
    from one Triton launch, two past one chunk of pairs (moe_align.py), instead of ~14 small torch
    ops. No host sync. num_experts: this rank's, the ids [expert_offset, expert_offset + num_experts)."""
    n, dev = topk_ids.numel(), topk_ids.device
    cap = align_capacity(n, num_experts, block_m)
    sorted_pairs = torch.empty(cap, dtype=torch.int32, device=dev)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    moe_align(topk_ids, num_experts, block_m, sorted_pairs, block_expert, num_padded, expert_offset=expert_offset)
    return Aligned(sorted_pairs, block_expert, num_padded, n, block_m)


def align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0) -> Aligned:
    """Groups the (token, slot) pairs by expert, block-aligned, with torch ops of fixed shapes only
    (no nonzero/unique/.item()), so it runs inside a CUDA graph. Pairs keep their order within an
    expert (stable), so the result is deterministic. Only the pairs of the experts [expert_offset,
    expert_offset + num_experts) are placed, numbered from 0 (expert parallel: this rank's)."""
    ids = topk_ids.reshape(-1).long() - expert_offset
    n, dev = ids.numel(), ids.device
    cap = align_capacity(n, num_experts, block_m)
    local = (ids >= 0) & (ids < num_experts)
    experts = torch.arange(num_experts, device=dev)
    # [n, E] one-hot: a column's running sum is each pair's rank among its expert's pairs (a sort
    # would do too; this is one cumsum and stable by construction); another rank's pair: a 0 row
    hot = (ids[:, None] == experts[None, :]).to(torch.int32)
    ranks = hot.cumsum(0, dtype=torch.int32)
    counts = ranks[-1] if n else torch.zeros(num_experts, dtype=torch.int32, device=dev)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0, dtype=torch.int32)
    starts = ends - padded
    safe = torch.where(local, ids, 0)
    rank = ranks.gather(1, safe[:, None])[:, 0] - 1
    # another rank's pairs go to one extra slot past the end, cut off below (shapes stay fixed)
    dest = torch.where(local, starts.gather(0, safe) + rank, cap).long()
    sorted_pairs = torch.full((cap + 1,), n, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, torch.arange(n, dtype=torch.int32, device=dev))
    sorted_pairs = sorted_pairs[:cap]
    block_starts = torch.arange(0, cap, block_m, dtype=torch.int32, device=dev)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    num_padded = ends[-1:]
    block_expert = torch.where(block_starts < num_padded, block_expert, -1)
    return Aligned(sorted_pairs, block_expert, num_padded, n, block_m)


# --- grouped GEMM ---------------------------------------------------------------------------------


# token-count arguments are not specialised (==1, %16): an eager step of a new size (above the
# graphs' buckets) would compile a variant inside the timed run
@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, weight_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    stride_am, stride_we, stride_wn, stride_om,
    num_pairs, N, K, num_blocks_m,
    ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_W: tl.constexpr, SORTED_A: tl.constexpr,
):  # fmt: skip
    """out[pair, n] = A[pair // ROW_DIV] @ W[e, n] over one expert's block of sorted pairs.
    GATED: W holds N gate rows then N up rows; out = silu(gate) * up. MUL_WEIGHT: times weight[pair].
    TMA_W: w_ptr is a tensor descriptor of W as [E * rows, K] with [BLOCK_N, BLOCK_K] blocks: the
    weight tiles come by TMA (no address math or load instructions in the warps; rows past the
    expert's read the next expert's or zeros, in columns never stored).
    SORTED_A: A is already in slot order (row s for the pair in slot s of sorted_pairs), so a block's
    rows are contiguous; with TMA_W, a_ptr is then a descriptor of A with [BLOCK_M, BLOCK_K] blocks
    too (gathered rows, which Hopper's TMA cannot fetch, stay pointer loads); GATED, out's row is then
    the slot too, not the pair (every row of the block is written; padding slots hold rows never read
    for a live pair), as down reads it."""
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row blocks share each weight tile while it is in L2
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the live blocks: the grid is sized for the worst routing
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    live = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if not (SORTED_A and TMA_W):  # else A's tiles come by its descriptor
        rows_a = slots.to(tl.int64) if SORTED_A else pairs // ROW_DIV
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    if TMA_W:  # the tile's first row in the [E * rows, K] view
        w_row0 = expert.to(tl.int32) * (2 * N if GATED else N) + pid_n * BLOCK_N
    else:  # columns past N wrap onto real rows (never stored): the weight loads need no N mask
        w_rows = (offs_n % N).to(tl.int64)
        w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if not EVEN_K:
            k_mask = offs_k < K - k0 * BLOCK_K
        if SORTED_A and TMA_W:
            a = a_ptr.load([pid_m * BLOCK_M, k0 * BLOCK_K])
        elif SORTED_A:  # every slot's row exists: no row mask
            a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        elif EVEN_K:  # the model shapes: unmasked loads, plain wide copies
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=live[:, None] & k_mask[None, :], other=0.0)
        if TMA_W:  # the descriptor zero-fills columns past K
            w = w_ptr.load([w_row0, k0 * BLOCK_K]).T
        elif EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            if TMA_W:
                w_up = w_ptr.load([w_row0 + N, k0 * BLOCK_K]).T
            elif EVEN_K:
                w_up = tl.load(w_ptrs + N * stride_wn)
            else:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        if not (SORTED_A and TMA_W):
            a_ptrs += BLOCK_K
        if not TMA_W:
            w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    # round where the reference rounds: each GEMM's output, SiLU's output, the weighted product
    y = acc.to(dtype).to(tl.float32)
    if GATED:
        y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    if MUL_WEIGHT:
        y = y * tl.load(weight_ptr + pairs, mask=live, other=0.0).to(tl.float32)[:, None]
    if SORTED_A and GATED:
        out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(dtype), mask=n_mask[None, :])
    else:
        out_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(dtype), mask=live[:, None] & n_mask[None, :])


def _launch(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None, al: Aligned, row_div: int,
    n: int, gated: bool, cfg: MoEConfig,
) -> None:
    """cfg.sorted_rows: a's rows are slots, and so are gate_up's output rows (act, which down reads)."""
    assert a.stride(-1) == 1 and w.is_contiguous() and out.stride(-1) == 1 and cfg.block_m == al.block_m
    K = a.shape[1]
    assert w.shape[2] == K and w.shape[1] == (2 * n if gated else n)
    num_blocks_m = al.block_expert.numel()
    grid = (num_blocks_m * triton.cdiv(n, cfg.block_n),)
    tma = cfg.tma_weights
    if tma and (K * w.element_size()) % 16:
        raise ValueError(f"tma_weights needs rows of a multiple of 16 bytes (K = {K})")
    w_arg = TensorDescriptor.from_tensor(w.view(-1, K), block_shape=[cfg.block_n, cfg.block_k]) if tma else w
    sorted_a = cfg.sorted_rows
    if sorted_a:
        assert a.shape[0] == al.sorted_pairs.numel(), "sorted rows: a has a row per slot"
    a_arg = TensorDescriptor.from_tensor(a, block_shape=[cfg.block_m, cfg.block_k]) if tma and sorted_a else a
    _moe_gemm_kernel[grid](
        a_arg, w_arg, out, weights if weights is not None else out, al.sorted_pairs, al.block_expert, al.num_padded,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        al.num_pairs, n, K, num_blocks_m,
        ROW_DIV=row_div, GATED=gated, MUL_WEIGHT=weights is not None, PRECISION=dot_precision(a.dtype),
        EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, TMA_W=tma,
        SORTED_A=sorted_a,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def act_rows(al: Aligned, cfg: MoEConfig) -> int:
    """Rows of gate_up's output: one per pair, or (sorted_rows) one per slot of the align."""
    return al.sorted_pairs.numel() if cfg.sorted_rows else al.num_pairs


def rows_in_slot_order(x: torch.Tensor, al: Aligned, top_k: int) -> torch.Tensor:
    """x's rows in slot order, [capacity, H]: slot s holds its pair's token; padding slots repeat the
    last token (finite rows whose results no live pair reads). One gather, ~1% of the GEMM after it."""
    return x.index_select(0, (al.sorted_pairs // top_k).clamp_(max=x.shape[0] - 1))


def moe_gate_up(x: torch.Tensor, w13: torch.Tensor, al: Aligned, top_k: int, act: torch.Tensor,
                cfg: MoEConfig) -> torch.Tensor:
    """act [act_rows, I] = silu(x[token] @ w1[e].T) * (x[token] @ w3[e].T): a row per pair, or
    (cfg.sorted_rows) per slot, x then gathered into slot order first."""
    assert act.shape == (act_rows(al, cfg), w13.shape[1] // 2)
    if al.num_pairs:
        if cfg.sorted_rows:
            _launch(rows_in_slot_order(x, al, top_k), w13, act, None, al, 1, act.shape[1], True, cfg)
        else:
            _launch(x, w13, act, None, al, top_k, act.shape[1], True, cfg)
    return act


def moe_down(act: torch.Tensor, w2: torch.Tensor, al: Aligned, topk_weights: torch.Tensor, down: torch.Tensor,
             cfg: MoEConfig) -> torch.Tensor:
    """down [T * top_k, H] (pair rows) = weight[pair] * (act[pair] @ w2[e].T); act as moe_gate_up wrote
    it for the same cfg.sorted_rows."""
    assert down.shape == (al.num_pairs, w2.shape[1]) and topk_weights.is_contiguous()
    assert act.shape[0] == act_rows(al, cfg)
    if al.num_pairs:
        _launch(act, w2, down, topk_weights.reshape(-1), al, 1, down.shape[1], False, cfg)
    return down


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    out: torch.Tensor, cfg: MoEConfig | MoEConfigs | None = None, shard: ExpertShard | None = None,
) -> torch.Tensor:
    """Triton version of moe_experts_ref, without a host sync. out: [T, H] rows (e.g. a row slice of
    a bigger buffer); scratch of [T * top_k, I + H] (sorted rows: [capacity, H + I] + [T * top_k, H])
    comes from the caching allocator (graph-safe).
    cfg: each projection's tiles (one MoEConfig: the same for both; None: pick_config's).
    shard (expert parallel): out is the sum over the pairs of this rank's experts only."""
    T, top_k = topk_ids.shape
    E, H = w13.shape[0], x.shape[1]
    assert x.shape[0] == T and out.shape == (T, H) and out.is_contiguous()
    assert shard is None or 0 <= shard.first and shard.first + E <= shard.total
    if cfg is None:
        cfg = pick_config(T, top_k, w13, shard.total if shard is not None else None)
    elif isinstance(cfg, MoEConfig):
        cfg = MoEConfigs.same(cfg)
    al = align(topk_ids, E, cfg.block_m, _first_expert(shard))
    act = torch.empty(act_rows(al, cfg.gate_up), w2.shape[2], device=x.device, dtype=x.dtype)
    # expert parallel: the GEMMs never visit another rank's pairs, so their rows must start at zero
    # to add nothing to the sum (one memset, far cheaper than the GEMMs the align saved)
    down = (torch.zeros if shard is not None else torch.empty)(T, top_k, H, device=x.device, dtype=x.dtype)
    moe_gate_up(x, w13, al, top_k, act, cfg.gate_up)
    moe_down(act, w2, al, topk_weights, down.view(T * top_k, H), cfg.down)
    return torch.sum(down, dim=1, out=out)
