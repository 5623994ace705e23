"""Linear layers that know how a checkpoint tensor maps onto their (possibly sharded, fused) weight.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (their partial outputs are summed by an all-reduce op that the caller runs). Fused
layers (qkv, gate_up) hold several checkpoint tensors stacked along the output dimension, so one
GEMM replaces several.

Checkpoint tensors arrive as LazyTensors: narrowing one to a rank's slice reads nothing, and
`_copy` reads just that slice from the file, so no process ever holds a whole sharded tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels.linear import linear_ref, persistent_linear
from nanoflow.layers.parallel import ParallelState


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, num_ctas: int | None = None) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, out, num_ctas)

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
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

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
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

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, num_ctas: int | None = None) -> torch.Tensor:
        return _linear(x, self.weight, self.bias if self.par.rank == 0 else None, out, num_ctas)

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
        if name == "bias":
            _copy(self.bias.data, tensor, name)
            return
        size = self.weight.shape[1]
        _copy(self.weight.data, _rank_slice(tensor, 1, size, self.par, name), name)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
            num_ctas: int | None) -> torch.Tensor:
    """x @ weight.T (+ bias), into `out` (rows of an activation buffer) when given. A cap (a pipeline
    schedule's share of the SMs for this GEMM; the eager path passes none) runs the persistent
    Triton GEMM on that many CTAs; uncapped, cuBLAS (the PyTorch reference)."""
    if num_ctas is not None:
        return persistent_linear(x, weight, bias, out, num_ctas)
    return linear_ref(x, weight, bias, out)


class LazyTensor:
    """A checkpoint tensor not read yet. narrow() and integer indexing (as on a torch.Tensor) only
    narrow the region; read() loads that region alone. `source` is a safetensors slice (get_slice),
    valid while its file is open, i.e. while the loader's iteration is at this tensor."""

    def __init__(self, source, index: tuple | None = None, shape: tuple[int, ...] | None = None) -> None:
        self._source = source
        full = tuple(source.get_shape())
        self._index = index if index is not None else tuple(slice(0, n) for n in full)
        self.shape = torch.Size(shape if shape is not None else full)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        if not (0 <= start and length >= 0 and start + length <= self.shape[dim]):
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {tuple(self.shape)}")
        pos = self._positions()[dim]
        base = self._index[pos].start
        index = self._index[:pos] + (slice(base + start, base + start + length),) + self._index[pos + 1 :]
        return LazyTensor(self._source, index, (*self.shape[:dim], length, *self.shape[dim + 1 :]))

    def __getitem__(self, i: int) -> LazyTensor:
        if not isinstance(i, int) or not 0 <= i < self.shape[0]:
            raise IndexError(f"LazyTensor supports an integer index in [0, {self.shape[0]}), got {i!r}")
        pos = self._positions()[0]
        index = self._index[:pos] + (self._index[pos].start + i,) + self._index[pos + 1 :]
        return LazyTensor(self._source, index, tuple(self.shape[1:]))

    def read(self) -> torch.Tensor:
        return self._source[self._index] if self._index else self._source[:]

    def _positions(self) -> list[int]:
        """Where in the source's index each of this view's dimensions sits (integer indices drop one)."""
        return [i for i, ix in enumerate(self._index) if isinstance(ix, slice)]


CheckpointTensor = torch.Tensor | LazyTensor


def _rank_slice(tensor: CheckpointTensor, dim: int, size: int, par: ParallelState, what: str) -> CheckpointTensor:
    """This rank's `size` entries of the checkpoint tensor along dim, after checking the full extent."""
    if tensor.dim() <= dim or tensor.shape[dim] != size * par.size:
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(tensor.shape)}, model expects "
                         f"{size * par.size} along dimension {dim}")
    return tensor.narrow(dim, par.rank * size, size)


def _copy(dst: torch.Tensor, src: CheckpointTensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(src.shape)}, model expects "
                         f"{tuple(dst.shape)}")
    dst.copy_(src.read() if isinstance(src, LazyTensor) else src)
