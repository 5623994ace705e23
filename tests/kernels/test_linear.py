"""The persistent, SM-capped GEMM (nanoflow/kernels/linear.py) against F.linear, and cuBLAS sized for
a share of the SMs (cublas_sms) against cuBLAS on all of them."""

from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.linear import GemmConfig, carveout_available, cublas_sms, linear_ref, persistent_linear

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


@pytest.mark.parametrize("num_ctas", [None, 8, 10_000])
def test_cublas_sms_computes_the_same_and_restores(num_ctas: int | None, device: str, dtype: torch.dtype,
                                                   assert_rel) -> None:
    """Inside: the same product (on a GPU, cuBLASLt's kernel sized for num_ctas SMs; a cap beyond
    the GPU carves out nothing; on the CPU nothing changes); after: the BLAS library and carveout
    as they were."""
    x = torch.randn(130, 96, device=device, dtype=dtype)
    w = torch.randn(80, 96, device=device, dtype=dtype) * 96**-0.5
    ref = linear_ref(x, w)
    on_gpu = device == "cuda" and carveout_available()

    def settings() -> tuple:
        return (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental())

    before = settings() if on_gpu else None
    with cublas_sms(num_ctas, torch.device(device)):
        out = linear_ref(x, w)
        if on_gpu and num_ctas is not None:
            assert torch._C._get_sm_carveout_experimental() == max(0, torch.cuda.get_device_properties(
                0).multi_processor_count - num_ctas)
    assert_rel(out, ref, dtype)
    if on_gpu:
        assert settings() == before
