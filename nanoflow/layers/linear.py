"""Linear layers that know how a checkpoint tensor maps onto their (possibly sharded, fused) weight.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (their partial outputs are summed by an all-reduce op that the caller runs). Fused
layers (qkv, gate_up) hold several checkpoint tensors stacked along the output dimension, so one
GEMM replaces several.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoflow.layers.parallel import ParallelState


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param = self.weight if name == "weight" else self.bias
        _copy(param.data, tensor, name)


class ColumnParallelLinear(Linear):
    """Output rows split across ranks; `shards` lists the output sizes of fused checkpoint tensors."""

    def __init__(
        self, in_features: int, shards: dict[str | int, int], bias: bool, dtype: torch.dtype, par: ParallelState
    ) -> None:
        self.par = par
        self.shard_sizes = {k: par.split(v, f"output size of shard {k}") for k, v in shards.items()}
        self.shard_offsets: dict[str | int, int] = {}
        off = 0
        for k, v in self.shard_sizes.items():
            self.shard_offsets[k] = off
            off += v
        super().__init__(in_features, off, bias, dtype)

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param = self.weight if name == "weight" else self.bias
        if shard is None:
            (shard,) = self.shard_sizes
        size, off = self.shard_sizes[shard], self.shard_offsets[shard]
        _copy(param.data.narrow(0, off, size), _rank_slice(tensor, 0, size, self.par, f"{name}[{shard}]"),
              f"{name}[{shard}]")


class RowParallelLinear(Linear):
    """Input columns split across ranks; the bias is added once (rank 0) so the all-reduce sums it once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, par: ParallelState):
        self.par = par
        super().__init__(par.split(in_features, "input size of a row-parallel layer"), out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.par.rank == 0 else None)

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        if name == "bias":
            _copy(self.bias.data, tensor, name)
            return
        size = self.weight.shape[1]
        _copy(self.weight.data, _rank_slice(tensor, 1, size, self.par, name), name)


def _rank_slice(tensor: torch.Tensor, dim: int, size: int, par: ParallelState, what: str) -> torch.Tensor:
    """This rank's `size` entries of the checkpoint tensor along dim, after checking the full extent."""
    if tensor.dim() <= dim or tensor.shape[dim] != size * par.size:
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(tensor.shape)}, model expects "
                         f"{size * par.size} along dimension {dim}")
    return tensor.narrow(dim, par.rank * size, size)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(src.shape)}, model expects "
                         f"{tuple(dst.shape)}")
    dst.copy_(src)
