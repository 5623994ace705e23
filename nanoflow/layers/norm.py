"""RMSNorm layer; its fused residual-add form is the one every decoder layer uses."""

from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels import rms_norm as k
from nanoflow.layers.linear import CheckpointTensor, _copy


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, enforce_eager: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.enforce_eager = enforce_eager

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        fn = k.rms_norm_ref if self.enforce_eager else k.rms_norm
        return fn(x, self.weight, self.eps, out=out)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """residual += x (in place: the residual stream), then returns its norm (in `out` when given)."""
        if not self.enforce_eager:
            return k.fused_add_rms_norm(x, residual, self.weight, self.eps, out=out)[0]
        normed, total = k.fused_add_rms_norm_ref(x, residual, self.weight, self.eps, out=out)
        residual.copy_(total)
        return normed

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
        _copy(self.weight.data, tensor, name)
