"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers' LlamaRMSNorm so fp32 results match bit for bit.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


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
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    H = x.shape[-1]
    assert weight.shape == (H,) and weight.is_contiguous()
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2 if residual is None else residual.view(-1, H)  # view: the new residual goes in place
    out = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out,
            x2.stride(0), r2.stride(0), out.stride(0), H, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(max(block // 512, 1), 16),
        )  # fmt: skip
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of rms_norm_ref. x: [..., H] (last dim contiguous), weight: [H]."""
    return _rms_norm_launch(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of fused_add_rms_norm_ref: returns (rms_norm(x + residual), x + residual).

    In place: x + residual is written into `residual`, which is returned as the second value.
    residual must have x's shape and dtype and a contiguous last dim (a .view(-1, H) must work).
    """
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    return _rms_norm_launch(x, residual, weight, eps), residual
