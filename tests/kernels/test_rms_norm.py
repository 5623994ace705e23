from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref


@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 256)], ids=str)
def test_rms_norm(shape: tuple[int, ...], device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    assert_rel(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)


def test_rms_norm_strided_rows_fp32_weight(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(6, 160, device=device, dtype=dtype)[:, :128]
    w = torch.randn(128, device=device, dtype=torch.float32)  # promotes the output like the ref
    out, ref = rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    assert out.dtype == ref.dtype
    assert_rel(out, ref, dtype)


def test_fused_add_rms_norm_in_place(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(9, 96, device=device, dtype=dtype)
    residual = torch.randn(9, 96, device=device, dtype=dtype)
    w = torch.randn(96, device=device, dtype=dtype)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual.clone(), w, 1e-6)
    out, res = fused_add_rms_norm(x, residual, w, 1e-6)
    assert res.data_ptr() == residual.data_ptr()  # documented: new residual written in place
    assert_rel(res, ref_res, dtype)
    assert_rel(out, ref_out, dtype)


# --- out=: the normalised rows written into rows of a bigger buffer (a nano-batch's slice)


def test_rms_norm_out_rows_of_bigger_buffer(device: str, dtype: torch.dtype, assert_rel) -> None:
    x = torch.randn(6, 160, device=device, dtype=dtype)[:, :128]
    w = torch.randn(128, device=device, dtype=dtype)
    ref = rms_norm_ref(x, w, 1e-6)
    for fn in (rms_norm, rms_norm_ref):
        buf = torch.full((11, 128), float("nan"), device=device, dtype=dtype)
        out = buf[3:9]
        assert fn(x, w, 1e-6, out=out) is out
        assert buf[:3].isnan().all() and buf[9:].isnan().all()
        assert_rel(out, ref, dtype)


def test_fused_add_rms_norm_out_rows_of_bigger_buffer(device: str, dtype: torch.dtype, assert_rel) -> None:
    """out= takes the normalised rows; the residual semantics stay: the kernel updates `residual` in
    place, the reference returns a new tensor and leaves `residual` as it was."""
    x = torch.randn(9, 96, device=device, dtype=dtype)
    residual = torch.randn(9, 96, device=device, dtype=dtype)
    w = torch.randn(96, device=device, dtype=dtype)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual.clone(), w, 1e-6)

    ref_buf = torch.full((12, 96), float("nan"), device=device, dtype=dtype)
    before = residual.clone()
    got, got_res = fused_add_rms_norm_ref(x, residual, w, 1e-6, out=ref_buf[1:10])
    assert got.data_ptr() == ref_buf[1:10].data_ptr() and torch.equal(got, ref_out)
    assert torch.equal(got_res, ref_res) and torch.equal(residual, before)
    assert ref_buf[:1].isnan().all() and ref_buf[10:].isnan().all()

    buf = torch.full((12, 96), float("nan"), device=device, dtype=dtype)
    out, res = fused_add_rms_norm(x, residual, w, 1e-6, out=buf[1:10])
    assert out.data_ptr() == buf[1:10].data_ptr() and res is residual
    assert buf[:1].isnan().all() and buf[10:].isnan().all()
    assert_rel(res, ref_res, dtype)
    assert_rel(out, ref_out, dtype)
