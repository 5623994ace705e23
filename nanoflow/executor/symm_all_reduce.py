"""The tensor-parallel all-reduce over torch's symmetric memory (`--all-reduce symm-mem`).

Why beside NCCL: a step's all-reduces are 2-32 MiB (tokens x hidden x 2 bytes), where NCCL's ring
pays its protocol and channel set-up on every call; torch's two-shot all-reduce reads the peers'
halves straight from their memory over NVLink (a reduce-scatter, then an all-gather), synchronised
by signal pads in the same symmetric allocation. Only peer-to-peer loads: the multicast (multimem)
ops are never called, and multicast stays off in every process (distributed.NO_MULTICAST).

One symmetric buffer of the largest message (token budget x hidden size) is allocated and
rendezvoused once per rank on the default group; each call copies its tensor in, reduces in place
and copies the sum back. Calls are issued on one stream at a time in the same order on every rank
(the pipeline keeps every collective on one stream), so they never share the buffer at once. A
tensor it does not take (another dtype, larger than the buffer) goes to NCCL, and since that depends
only on shapes every rank decides alike. The reference it must equal is `dist.all_reduce`:
`benchmarks/allreduce_check.py` compares the two per message size (and times them), and
tests/gpu/test_tensor_parallel_gpu.py checks an engine's tokens with either, inside CUDA graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# What torch.ops.symm_mem.two_shot_all_reduce_ is built for (torch 2.11: no float16).
TWO_SHOT_DTYPES = (torch.bfloat16, torch.float32)


class SymmAllReduce:
    def __init__(self, max_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before rendezvous in older torch
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)

    def __call__(self, x: torch.Tensor) -> bool:
        """Sums x over the ranks in place; False (nothing done) if x is not one it takes."""
        n = x.numel()
        if x.dtype != self.buffer.dtype or n > self.buffer.numel() or not x.is_contiguous():
            return False
        buf = self.buffer[:n]
        buf.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        x.view(-1).copy_(buf)
        return True


def open_symm_all_reduce(max_numel: int, dtype: torch.dtype, device: torch.device,
                         agree: Callable[[int], int]) -> SymmAllReduce | None:
    """Every rank's communicator, or None on every rank if any rank failed to make one (then all use
    NCCL). agree(ok) -> the minimum of every rank's ok (ParallelState.min on the control group)."""
    comm, error = None, None
    try:
        if dtype not in TWO_SHOT_DTYPES:  # torch's kernel raises NotImplementedError on the first call
            raise TypeError(f"torch's two-shot all-reduce takes {TWO_SHOT_DTYPES}, not {dtype}")
        comm = SymmAllReduce(max_numel, dtype, device)
    except Exception as e:  # an old torch, no peer access: NCCL it is, on every rank
        error = e
    if not agree(int(comm is not None)):
        log.warning("--all-reduce symm-mem: not available on every rank (%s); using NCCL",
                    error or "failed on another rank")
        return None
    return comm
