"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _check_out(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    # the dtype a fresh output would have, so both paths round the result the same way
    assert out.shape == x.shape and out.dtype == torch.promote_types(weight.dtype, x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns a new tensor, or `out` (x's shape, the promoted dtype of x and weight) written."""
    # Same op order as transformers' LlamaRMSNorm so fp32 results match bit for bit.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    if out is None:
        return y
    _check_out(out, x, weight)
    return out.copy_(y)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), the first in `out` when given.

    Unlike the Triton version, `residual` is left as it is: x + residual is a new tensor.
    """
    residual = x + residual
    return rms_norm_ref(residual, weight, eps, out), residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    stride_x, stride_r, stride_o, n_cols, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """One row per program; the whole row sits in registers (hidden sizes up to ~16k)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # round the sum to the input dtype like `x + residual` does, then normalise that
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    # the reference rounds the normalised row to the input dtype before the weight multiply
    y = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor | None
) -> torch.Tensor:
    H = x.shape[-1]
    assert weight.shape == (H,) and weight.is_contiguous()
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2 if residual is None else residual.view(-1, H)  # view: the new residual goes in place
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    else:
        _check_out(out, x, weight)
    o2 = out.view(-1, H)  # view: the kernel writes into the caller's rows
    assert o2.stride(-1) == 1
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, o2,
            x2.stride(0), r2.stride(0), o2.stride(0), H, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(max(block // 512, 1), 16),
        )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of rms_norm_ref. x: [..., H] (rows may be strided), weight: [H]. out: None or
    x's shape in the promoted dtype of x and weight, with a contiguous last dim and rows a
    .view(-1, H) can flatten (e.g. a row slice of a bigger buffer)."""
    return _rms_norm_launch(x, None, weight, eps, out)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of fused_add_rms_norm_ref: returns (rms_norm(x + residual), x + residual),
    the first in `out` when given (as for rms_norm).

    In place: x + residual is written into `residual`, which is returned as the second value (the
    reference returns a new tensor instead). residual must have x's shape and dtype and a contiguous
    last dim (a .view(-1, H) must work).
    """
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    return _rms_norm_launch(x, residual, weight, eps, out), residual
