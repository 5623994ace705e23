from __future__ import annotations

import torch

from nanoflow.kernels.activation import silu_and_mul, silu_and_mul_ref


def test_silu_and_mul(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(7, 2 * 80, device=device, dtype=dtype)  # I not a power of two: masked tail
    out = torch.full((7, 80), float("nan"), device=device, dtype=dtype)
    assert silu_and_mul(x, out=out) is out
    assert_rel(out, silu_and_mul_ref(x), dtype)


def test_silu_and_mul_strided_rows(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(5, 2 * 1100 + 30, device=device, dtype=dtype)[:, : 2 * 1100]  # > one block per row
    assert_rel(silu_and_mul(x), silu_and_mul_ref(x), dtype)


def test_silu_and_mul_ref_out_rows_of_bigger_buffer(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(7, 2 * 80, device=device, dtype=dtype)
    ref = silu_and_mul_ref(x)
    for fn in (silu_and_mul, silu_and_mul_ref):
        buf = torch.full((10, 80), float("nan"), device=device, dtype=dtype)
        out = buf[1:8]
        assert fn(x, out=out) is out
        assert buf[:1].isnan().all() and buf[8:].isnan().all()
        assert_rel(out, ref, dtype)
