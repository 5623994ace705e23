"""Gated MLP (gate_up GEMM -> SiLU-and-mul -> down GEMM) and Mixtral's top-k mixture of experts."""

from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels import activation, fused_moe, moe_route
from nanoflow.layers.linear import (
    CheckpointTensor,
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    _copy,
    _rank_slice,
)
from nanoflow.layers.parallel import ParallelState


class GatedMLP(nn.Module):
    """Three ops: gate_up GEMM, SiLU-and-mul, down GEMM, each into rows of an activation buffer."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, par: ParallelState, enforce_eager: bool):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, {0: intermediate, 1: intermediate}, False, dtype, par)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, dtype, par)
        self.enforce_eager = enforce_eager

    def gate_up(self, x: torch.Tensor, out: torch.Tensor | None = None, num_ctas: int | None = None) -> torch.Tensor:
        return self.gate_up_proj(x, out, num_ctas)

    def act(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        fn = activation.silu_and_mul_ref if self.enforce_eager else activation.silu_and_mul
        return fn(x, out=out)

    def down(self, x: torch.Tensor, out: torch.Tensor | None = None, num_ctas: int | None = None) -> torch.Tensor:
        return self.down_proj(x, out, num_ctas)


class MixtureOfExperts(nn.Module):
    """Softmax router, top-k experts per token, weights renormalised over the chosen k (Mixtral).
    Two ops: route (router GEMM + top-k) and experts.

    Tensor parallel: each expert's intermediate dimension is split across the ranks, like a dense
    MLP. Expert parallel (par.expert_parallel): rank r holds whole experts [r * E / N, (r + 1) * E / N)
    and computes only the (token, slot) pairs routed to them. Either way the router is replicated
    (every rank routes every token) and each rank's output is a partial sum, so the layer ends with
    the same single all-reduce.
    """

    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype: torch.dtype, par: ParallelState,
        enforce_eager: bool,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.par = num_experts, top_k, par
        self.shard: fused_moe.ExpertShard | None = None
        if par.expert_parallel:
            local, inter = par.split(num_experts, "num_local_experts"), intermediate
            self.shard = fused_moe.ExpertShard(par.rank * local, num_experts)
        else:
            local, inter = num_experts, par.split(intermediate, "expert intermediate size")
        self.router = Linear(hidden, num_experts, False, dtype)
        # [local experts, ...], indexed by global id - shard.first
        self.w13 = nn.Parameter(torch.empty(local, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden, inter, dtype=dtype), requires_grad=False)
        self.enforce_eager = enforce_eager

    def route(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
              slots: torch.Tensor | None = None) -> None:
        """Writes each token's top-k routing weights (x's dtype) and expert ids (int64) into the given rows.
        slots [T]: the rows' KV slots; a negative one (a CUDA graph's padding up to its bucket) gets
        expert id num_experts, which no rank holds, so the grouped GEMMs spend nothing on it."""
        fn = moe_route.moe_route_ref if self.enforce_eager else moe_route.moe_route
        fn(self.router(x), self.top_k, weights, experts, slots)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, out: torch.Tensor) -> None:
        """out = sum over each token's k experts of weight * expert(x). The fast path (Triton grouped
        GEMMs) never reads the routing on the host, so it runs inside CUDA graphs; the eager path
        loops over the experts present (a host sync). Expert parallel: out is this rank's partial sum."""
        fn = fused_moe.moe_experts_ref if self.enforce_eager else fused_moe.fused_moe
        fn(x, self.w13, self.w2, weights, experts, out, shard=self.shard)

    def load_expert(self, expert: int, which: str, tensor: CheckpointTensor) -> None:
        """which: 'w1' (gate), 'w3' (up) or 'w2' (down), as named in Mixtral checkpoints; expert: the
        global id. Expert parallel: another rank's expert is skipped (nothing read), a local one
        copied whole."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (num_local_experts={self.num_experts})")
        local = expert - (self.shard.first if self.shard is not None else 0)
        if not 0 <= local < self.w13.shape[0]:
            return
        inter = self.w2.shape[2]
        what = f"experts.{expert}.{which}"

        def part(dim: int) -> CheckpointTensor:
            # _copy checks a whole expert's shape; a tensor-parallel slice is checked along dim first
            return tensor if self.shard is not None else _rank_slice(tensor, dim, inter, self.par, what)

        if which == "w2":
            _copy(self.w2.data[local], part(1), what)
        else:
            off = 0 if which == "w1" else inter
            _copy(self.w13.data[local, off : off + inter], part(0), what)
