"""MoE routing in Triton: softmax over the router logits, the top-k experts of each token, their
probabilities renormalised over the k (Mixtral), and the padding rows of a CUDA graph's bucket (a
negative KV slot) sent to no expert.

`moe_route_ref` does this with ~8 small torch ops a layer (softmax, topk, sum, divide, two copies,
a where); on a Mixtral decode step of ~600 tokens each is a few microseconds of launch-bound
kernel, ~1 ms a step over 32 layers. Here it is one launch: a program holds BLOCK_T rows of logits,
takes the k largest probabilities one after another (the lowest expert id among equal ones) and
writes the weights and ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def moe_route_ref(logits: torch.Tensor, top_k: int, weights: torch.Tensor, experts: torch.Tensor,
                  slots: torch.Tensor | None = None) -> None:
    """weights [T, top_k] (their dtype) and experts [T, top_k] (int64) of router logits [T, E]: the
    top_k softmax probabilities renormalised to sum to 1, and their expert ids. slots [T] (the KV
    slot mapping): rows with a negative slot, a CUDA graph's padding, get expert id E, which no
    rank holds, so the grouped GEMMs spend nothing on them."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, e = torch.topk(probs, top_k, dim=-1)
    weights.copy_(w / w.sum(dim=-1, keepdim=True))
    experts.copy_(e if slots is None else torch.where(slots[:, None] >= 0, e, logits.shape[1]))


@triton.jit
def _route_kernel(
    logits_ptr, slots_ptr, weights_ptr, experts_ptr, num_tokens, stride_l, stride_w, stride_e,
    E: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    x = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :],
                mask=row_ok[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the tokens: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]  # padded columns: 0 (exp(-inf)), below every real probability
    vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), 1)
        vals = tl.where(kcols[None, :] == k, best[:, None], vals)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)  # taken: below every probability left
    vals = vals / tl.sum(vals, 1)[:, None]
    if HAS_SLOTS:
        live = tl.load(slots_ptr + rows, mask=row_ok, other=0) >= 0
        ids = tl.where(live[:, None], ids, E)
    out_mask = row_ok[:, None] & (kcols < TOP_K)[None, :]
    tl.store(weights_ptr + rows[:, None] * stride_w + kcols[None, :], vals.to(weights_ptr.dtype.element_ty),
             mask=out_mask)
    tl.store(experts_ptr + rows[:, None] * stride_e + kcols[None, :], ids.to(tl.int64), mask=out_mask)


def moe_route(logits: torch.Tensor, top_k: int, weights: torch.Tensor, experts: torch.Tensor,
              slots: torch.Tensor | None = None) -> None:
    """Triton version of moe_route_ref (same arguments and results; among equal probabilities the
    lowest expert id wins). No host sync: CUDA-graph capturable."""
    T, E = logits.shape
    assert weights.shape == experts.shape == (T, top_k) and 0 < top_k <= E
    assert weights.stride(1) == 1 and experts.stride(1) == 1 and experts.dtype == torch.int64
    assert logits.stride(1) == 1 and (slots is None or slots.shape == (T,))
    if T == 0:
        return
    block_t = 32
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, slots if slots is not None else logits, weights, experts, T,
        logits.stride(0), weights.stride(0), experts.stride(0),
        E=E, BLOCK_E=triton.next_power_of_2(E), TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_T=block_t, HAS_SLOTS=slots is not None, num_warps=4,
    )  # fmt: skip
