"""A layer's ops as data: what a model publishes and what an executor (sequential or pipelined) walks.

Every op reads and writes rows of the iteration's activation buffers (a dict of [T, width] tensors
that the model allocates), so an op can run on any nano-batch: it is handed the nano-batch and the
buffers' rows of that nano-batch (views, nothing copied). An op that writes a buffer writes its
whole row range; attention ops write only their own rows (decode or prefill) of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from nanoflow.forward_batch import ForwardBatch

Buffers = dict[str, torch.Tensor]
# Not a buffer: the layer's KV cache, named in reads/writes so that an executor can order ops on it.
# An op that writes it writes its own tokens' K/V; an op that reads it reads the K/V of its
# sequences' earlier tokens, which this nano-batch or an earlier one (in token order) wrote.
KV = "kv"
# A name "buffer@decode" or "buffer@prefill" declares only the decode rows (the first ones) or the
# prefill rows of the nano-batch: decode and prefill attention write disjoint rows of `attn`.
# What bounds an op's speed: the pipeline overlaps ops of different resources.
Resource = Literal["compute", "memory", "network"]


@dataclass(frozen=True)
class Op:
    name: str  # e.g. "qkv", "decode_attention"; unique within a layer
    resource: Resource
    # run(batch, buffers, num_ctas): num_ctas caps the kernel's grid (SMs left to a concurrent op);
    # None: the whole GPU. Ops whose kernels take no cap ignore it.
    run: Callable[[ForwardBatch, Buffers, int | None], None]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


def rows(buffers: Buffers, batch: ForwardBatch) -> Buffers:
    """The rows of every buffer that belong to `batch` (a nano-batch of the iteration)."""
    a, b = batch.token_offset, batch.token_offset + batch.num_tokens
    return {name: t[a:b] for name, t in buffers.items()}


def run_sequential(layers: Sequence[Sequence[Op]], buffers: Buffers, parts: Sequence[ForwardBatch]) -> None:
    """Every layer's ops in order, each over the nano-batches in order, on the current stream."""
    views = [rows(buffers, p) for p in parts]
    for ops in layers:
        for op in ops:
            for part, bufs in zip(parts, views, strict=True):
                op.run(part, bufs, None)


# How a forward runs the layers' ops over the activation buffers: run_sequential over the whole
# batch, or a pipeline over nano-batches (nanoflow.pipeline).
Walk = Callable[[Sequence[Sequence[Op]], Buffers], None]
