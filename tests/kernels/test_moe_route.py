"""MoE routing (nanoflow/kernels/moe_route.py): the Triton kernel against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.moe_route import moe_route, moe_route_ref


def _both(logits: torch.Tensor, top_k: int, slots: torch.Tensor | None, wdtype: torch.dtype) -> tuple:
    T = logits.shape[0]
    want_w = torch.empty(T, top_k, device=logits.device, dtype=wdtype)
    want_e = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    got_w, got_e = torch.full_like(want_w, float("nan")), torch.full_like(want_e, -5)
    moe_route_ref(logits, top_k, want_w, want_e, slots)
    moe_route(logits, top_k, got_w, got_e, slots)
    return got_w, got_e, want_w, want_e


@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (45, 8, 2), (33, 6, 2), (20, 4, 1), (70, 64, 6)])
@pytest.mark.parametrize("with_slots", [False, True], ids=["all-live", "padding"])
def test_route_matches_ref(T: int, E: int, top_k: int, with_slots: bool, device: str) -> None:
    torch.manual_seed(T * E + top_k)
    logits = torch.randn(T, E, device=device)  # fp32: no two equal, so the order is the reference's
    slots = torch.where(torch.rand(T, device=device) < 0.7, torch.arange(T, device=device), -1) if with_slots else None
    got_w, got_e, want_w, want_e = _both(logits, top_k, slots, torch.float32)
    assert torch.equal(got_e, want_e)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w.sum(1), torch.ones(T, device=device), rtol=1e-5, atol=1e-5)
    if slots is not None:
        assert (got_e[slots < 0] == E).all() and (got_e[slots >= 0] < E).all()


def test_bf16_logits_with_ties(device: str) -> None:
    """bf16 router logits (the model's) often tie: the kernel takes the lowest expert id among equal
    probabilities, torch.topk any of them; the chosen probabilities are the same either way."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 8, device=device) * 0.05).to(torch.bfloat16)
    got_w, got_e, want_w, want_e = _both(logits, 2, None, torch.bfloat16)
    probs = torch.softmax(logits.float(), dim=-1)
    torch.testing.assert_close(probs.gather(1, got_e), probs.gather(1, want_e))
    torch.testing.assert_close(got_w, want_w, rtol=1.6e-2, atol=1e-3)  # a bf16 ulp of rounding apart
    tied = probs.gather(1, got_e)[:, 0] == probs.gather(1, got_e)[:, 1]
    assert (got_e[tied, 0] < got_e[tied, 1]).all()


def test_route_writes_rows_of_a_wider_buffer_and_nothing_for_no_tokens(device: str) -> None:
    logits = torch.randn(5, 8, device=device)
    w = torch.zeros(5, 4, device=device)[:, :2]  # row stride 4
    e = torch.zeros(5, 2, device=device, dtype=torch.int64)
    moe_route(logits, 2, w, e)
    want_w, want_e = torch.empty(5, 2, device=device), torch.empty_like(e)
    moe_route_ref(logits, 2, want_w, want_e)
    assert torch.equal(e, want_e)
    torch.testing.assert_close(w, want_w)
    moe_route(logits[:0], 2, w[:0], e[:0])  # T = 0: no launch
