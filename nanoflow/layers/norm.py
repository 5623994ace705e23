"""RMSNorm layer: the fused residual-add form is the one every decoder layer uses."""

from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels import rms_norm as k
from nanoflow.layers.linear import CheckpointTensor, _copy


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, use_triton: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.use_triton = use_triton

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, residual stream); with residual=None the input starts the stream."""
        if residual is None:
            fn = k.rms_norm if self.use_triton else k.rms_norm_ref
            return fn(x, self.weight, self.eps), x
        fn = k.fused_add_rms_norm if self.use_triton else k.fused_add_rms_norm_ref
        return fn(x, residual, self.weight, self.eps)

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
        _copy(self.weight.data, tensor, name)
