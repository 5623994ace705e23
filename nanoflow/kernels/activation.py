"""SiLU-and-multiply: the gated activation between the gate_up and down GEMMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2 * I] holding gate then up; returns silu(gate) * up, [T, I]: a new tensor, or `out` written."""
    gate, up = x.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if out is None:
        return y
    assert out.shape == y.shape
    return out.copy_(y)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    # F.silu returns the input dtype, so round before the multiply as the reference does
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of silu_and_mul_ref. x: [T, 2 * I] (rows may be strided, last dim contiguous)."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(T, inter, device=x.device, dtype=x.dtype)
    assert out.shape == (T, inter) and out.stride(-1) == 1
    if T > 0:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out
