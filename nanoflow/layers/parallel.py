"""Which tensor-parallel rank a layer is built for; world size 1 is the plain single-device case.

`expert_parallel` changes how a mixture-of-experts layer is split: whole experts per rank instead of
a slice of every expert (nanoflow.layers.mlp.MixtureOfExperts); everything else is split as without it.

Device collectives (all-reduce, all-gather, broadcast of device tensors) run on the default
process group (NCCL on GPUs, gloo on the CPU). Host-side messages (each step's batch description,
the KV page count) run on `control_group`, a gloo group: on GPUs they never wait for the device.
Where every rank is on one host, `plans` is the plan channel (nanoflow.executor.plan_channel): rank 0's
`broadcast_object` then writes into a shared-memory ring and returns without waiting for the workers.
Starting and stopping the processes is nanoflow.executor.distributed's job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    size: int = 1
    control_group: Any = field(default=None, compare=False, repr=False)
    # Rank 0: the ring's writer end (send(obj)); other ranks: their reader end (recv()). None: gloo.
    plans: Any = field(default=None, compare=False, repr=False)
    # An all-reduce beside NCCL's (executor.symm_all_reduce): fast(x) sums x in place and returns
    # True, or returns False for a tensor it does not take (decided from shapes: alike on every rank).
    fast_all_reduce: Callable[[torch.Tensor], bool] | None = field(default=None, compare=False, repr=False)
    # MoE layers hold experts [rank * E / size, (rank + 1) * E / size) whole (EngineConfig.expert_parallel)
    expert_parallel: bool = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and (self.fast_all_reduce is None or not self.fast_all_reduce(x)):
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, in place on every rank."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable obj (the other ranks pass None), returned on every rank. Through the plan
        channel rank 0 does not wait for the others to receive it (the messages keep their order)."""
        if self.size == 1:
            return obj
        if self.plans is not None:
            if self.rank == 0:
                self.plans.send(obj)
                return obj
            return self.plans.recv()
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV pages that fit on every GPU)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def max_each(self, values: Sequence[float]) -> list[float]:
        """Elementwise, the largest of every rank's values: the same list on every rank (e.g. each CUDA
        graph's replay time, so that every rank picks the same graph)."""
        if self.size == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return t.tolist()

    def check_same(self, what: str, value: Any) -> None:
        """Raises ValueError on every rank unless repr(value) is the same on all of them: tables each
        rank builds on its own (graphs to capture, pipeline schedules) that must match, or the ranks'
        collectives would pair up wrongly. Raising everywhere keeps a mismatch from becoming a hang."""
        if self.size == 1:
            return
        # 56 bits: the digest and its negation both fit an int64 (MIN of both = min and -max)
        digest = int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")
        if self.min(digest) != -self.min(-digest):
            raise ValueError(f"{what} differ between the tensor-parallel ranks (rank {self.rank}: {value!r:.300})")

    def split(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({self.size})")
        return total // self.size
