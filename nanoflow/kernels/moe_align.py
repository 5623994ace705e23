"""MoE align in Triton: the (token, slot) pairs grouped by expert, each run block-aligned.

`fused_moe.align_ref` does this with ~14 small torch ops (0.3 ms at T=128 and 0.8 ms at T=2048 on
an H200, per layer, eager). Here it takes one launch, or two past one chunk of pairs, with no host
sync and shapes fixed by the pair count, so a CUDA graph can capture it. The result is
align_ref's, bit for bit: pairs keep their order within an expert.

Expert parallelism: a rank holds the experts [expert_offset, expert_offset + num_experts) and the
routing names global ids; the pairs of other ranks' experts are absent here (in no one-hot column),
so they take no slot, no block and no GEMM work.

The pairs are cut into chunks of CHUNK, one program each; a program holds its chunk as a
[CHUNK, E] one-hot tile (num_experts is small, 8-64):

1. `_count_kernel` writes each chunk's per-expert counts (skipped when there is one chunk);
2. `_place_kernel`, every program: the totals and the counts of the chunks before its own (a sum
   over the count rows), then padded starts and ends by a cumsum over the experts; it puts each
   of its pairs at start[e] + pairs of e in earlier chunks + its rank in the chunk (a cumsum of
   the one-hot column); it also writes its share of the sentinel slots (the padded tails of the
   experts it owns, a stride of the slots past num_padded) and of block_expert.

A single program can do the same in a loop over the chunks, but its work grows as pairs times
experts on one SM: on an H200 that version took 25 us at T=2048, E=8 and 200 us at T=2048, E=64
(top-2, graph replay), so the chunks go to programs of their own. Every slot is written by
exactly one program, so no barrier or atomic is needed and the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# entries of a program's [CHUNK, BLOCK_E] one-hot tile (CHUNK = _TILE // BLOCK_E)
_TILE = 4096


@triton.jit
def _one_hot(ids_ptr, num_pairs, chunk, expert_offset, num_experts, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """[CHUNK, BLOCK_E] int32 one-hot of chunk `chunk`'s local expert ids (id - expert_offset); rows
    past num_pairs, and rows of experts outside [0, num_experts) (another rank's), all 0."""
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pair, mask=pair < num_pairs, other=-1) - expert_offset
    # without the upper bound a foreign id in [num_experts, BLOCK_E) would hit a padding lane
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, -1)
    return (ids[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)


# token-count arguments are not specialised (==1, %16): each new step size would compile a variant
@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, counts_ptr, num_pairs, expert_offset, num_experts, BLOCK_E: tl.constexpr,
                  CHUNK: tl.constexpr):
    """counts[chunk, e]: pairs of local expert e in the chunk."""
    chunk = tl.program_id(0)
    hot = _one_hot(ids_ptr, num_pairs, chunk, expert_offset, num_experts, BLOCK_E, CHUNK)
    tl.store(counts_ptr + chunk * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(hot, axis=0))


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "capacity", "num_blocks"])
def _place_kernel(
    ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, expert_offset, num_experts, num_chunks, block_m, capacity, num_blocks,
    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_MP: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """One program per chunk (at least one). ids - expert_offset: in [0, E) for this rank's pairs,
    E <= BLOCK_E (other values are absent pairs); writes sorted
    [capacity], block_expert [num_blocks] and num_padded [1], all int32."""
    g = tl.program_id(0)
    programs = tl.num_programs(0)
    # lanes past num_experts match no id (_one_hot): their count is 0, so their range is the empty
    # [num_padded, num_padded), no slot or block start falls in it, and they need no mask
    experts = tl.arange(0, BLOCK_E)
    offs = tl.arange(0, CHUNK)
    hot = _one_hot(ids_ptr, num_pairs, g, expert_offset, num_experts, BLOCK_E, CHUNK)

    if ONE_CHUNK:  # this chunk is all the pairs: no count pass
        totals = tl.sum(hot, axis=0)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    else:
        totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for r0 in range(0, num_chunks, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            c = tl.load(counts_ptr + rows[:, None] * BLOCK_E + experts[None, :], mask=(rows < num_chunks)[:, None],
                        other=0)
            totals += tl.sum(c, axis=0)
            before += tl.sum(tl.where((rows < g)[:, None], c, 0), axis=0)
    padded = (totals + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    num_padded = tl.sum(padded, axis=0)

    # this chunk's pairs: dest = start[e] + pairs of e in earlier chunks + rank in this chunk
    pair = g * CHUNK + offs
    rank = tl.cumsum(hot, axis=0)  # inclusive: 1 for an expert's first pair in the chunk
    # one nonzero per row, so the row sum picks the pair's own expert's column
    dest = tl.sum(hot * ((starts + before)[None, :] + rank - 1), axis=1)
    # a pair with no column (another rank's expert) is skipped rather than written over slot 0
    tl.store(sorted_ptr + dest, pair, mask=(pair < num_pairs) & (tl.sum(hot, axis=1) > 0))

    # the sentinel, in the padded tail of each expert this program owns (e % programs == g) ...
    t = tl.arange(0, BLOCK_MP)
    tail = (t[None, :] < (padded - totals)[:, None]) & (experts % programs == g)[:, None]
    tail_slots = sorted_ptr + (starts + totals)[:, None] + t[None, :]
    tl.store(tail_slots, tl.full((BLOCK_E, BLOCK_MP), 0, tl.int32) + num_pairs, mask=tail)
    # ... and in its stride of the slots past num_padded
    for p0 in range(num_padded + g * CHUNK, capacity, programs * CHUNK):
        tl.store(sorted_ptr + p0 + offs, tl.full((CHUNK,), 0, tl.int32) + num_pairs, mask=p0 + offs < capacity)

    # its stride of block_expert: how many ends lie at or before the block's first slot (a
    # right-side searchsorted; experts with no pairs have end == start and are stepped over)
    for b0 in range(g * CHUNK, num_blocks, programs * CHUNK):
        blk = b0 + offs
        first = blk * block_m
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        # a block at or past num_padded has every end (the padding lanes' too) at or before its
        # first slot, so its count is >= num_experts: tested on the count, as `first < num_padded`
        # let the first block past the end through on an H200 (Triton 3.6)
        tl.store(block_expert_ptr + blk, tl.where(expert < num_experts, expert, -1), mask=blk < num_blocks)

    if g == 0:
        tl.store(num_padded_ptr, num_padded)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor, num_padded: torch.Tensor, chunk: int | None = None, expert_offset: int = 0,
) -> None:
    """Fills sorted_pairs [capacity], block_expert [capacity // block_m] and num_padded [1] (int32,
    on topk_ids' device) for the pairs of topk_ids (flattened; any int dtype) routed to the experts
    [expert_offset, expert_offset + num_experts), numbered from 0 in block_expert; pairs of other
    experts are left out. The caller sizes capacity (fused_moe.align_capacity) so any routing fits.
    chunk: pairs per program (a power of two; the default keeps the one-hot tile at _TILE)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n, cap = ids.numel(), sorted_pairs.numel()
    assert cap % block_m == 0 and block_expert.numel() == cap // block_m and num_padded.numel() == 1
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (sorted_pairs, block_expert, num_padded))
    assert n + num_experts * (block_m - 1) <= cap, "capacity too small for the worst routing"
    block_e = triton.next_power_of_2(num_experts)
    chunk = chunk or max(16, _TILE // block_e)
    assert chunk & (chunk - 1) == 0
    num_chunks = max(1, triton.cdiv(n, chunk))
    one_chunk = num_chunks == 1
    # per-chunk counts: scratch from the caching allocator (graph-safe), none for one chunk
    counts = sorted_pairs if one_chunk else torch.empty(num_chunks, block_e, dtype=torch.int32, device=ids.device)
    if not one_chunk:
        _count_kernel[(num_chunks,)](ids, counts, n, expert_offset, num_experts, BLOCK_E=block_e, CHUNK=chunk,
                                     num_warps=4)
    _place_kernel[(num_chunks,)](
        ids, counts, sorted_pairs, block_expert, num_padded,
        n, expert_offset, num_experts, num_chunks, block_m, cap, block_expert.numel(),
        BLOCK_E=block_e, CHUNK=chunk, ROWS=max(1, _TILE // block_e), BLOCK_MP=triton.next_power_of_2(block_m),
        ONE_CHUNK=one_chunk, num_warps=4,
    )  # fmt: skip
