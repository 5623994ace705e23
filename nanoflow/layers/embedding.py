"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoflow.layers.linear import CheckpointTensor, _copy
from nanoflow.layers.parallel import ParallelState


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, par: ParallelState) -> None:
        super().__init__()
        self.vocab_size, self.par = vocab_size, par
        self.shard = -(-vocab_size // par.size)  # ceil: the last rank's tail rows are padding
        self.start = par.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * inside[:, None].to(self.weight.dtype)
        return self.par.all_reduce(out)

    def load(self, name: str, tensor: CheckpointTensor, shard: str | int | None = None) -> None:
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"shape mismatch for {name}: checkpoint vocabulary {tensor.shape[0]} vs config "
                             f"vocab_size {self.vocab_size}")
        n = max(0, min(self.shard, self.vocab_size - self.start))  # the last rank's tail is padding
        _copy(self.weight.data[:n], tensor.narrow(0, self.start, n), name)
        self.weight.data[n:].zero_()


class LMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return self.par.all_gather_last_dim(logits)[:, : self.vocab_size]
