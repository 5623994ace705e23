"""The persistent, SM-capped GEMM (nanoflow/kernels/linear.py) against F.linear."""

from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.linear import GemmConfig, linear_ref, persistent_linear

SMALL = GemmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2)
CASES = {
    # name: (M, N, K, bias, num_ctas, config): ragged M/N edges, uneven K, fewer CTAs than tiles
    "one-row": (1, 64, 48, False, 1, SMALL),
    "ragged-capped": (37, 80, 40, False, 3, SMALL),
    "bias-many-ctas": (50, 96, 64, True, 64, SMALL),
    "default-tiles": (130, 96, 80, True, 2, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_persistent_linear(case: tuple, device: str, dtype: torch.dtype, assert_rel) -> None:
    M, N, K, bias, num_ctas, cfg = case
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype) * K**-0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    assert_rel(persistent_linear(x, w, b, num_ctas=num_ctas, config=cfg), linear_ref(x, w, b), dtype)


def test_persistent_linear_into_buffer_rows(device: str, dtype: torch.dtype, assert_rel) -> None:
    """x and out as row slices of wider buffers (the activation buffers' layout); rows outside stay."""
    buf_in = torch.randn(20, 72, device=device, dtype=dtype)
    buf_out = torch.full((20, 64), 7.0, device=device, dtype=dtype)
    w = torch.randn(48, 40, device=device, dtype=dtype)
    x, out = buf_in[3:15, :40], buf_out[3:15, :48]
    persistent_linear(x, w, out=out, num_ctas=2, config=SMALL)
    assert_rel(out, linear_ref(x, w), dtype)
    assert (buf_out[:3] == 7).all() and (buf_out[15:] == 7).all() and (buf_out[:, 48:] == 7).all()
