"""CUDA graphs of the whole model forward for decode-only iterations, one per batch-size bucket.

A decode iteration launches ~15 kernels per layer for one token per sequence: at small and medium
batch the GPU would wait on Python launching them. Each bucket's graph reads static input and
metadata buffers; a batch is copied into them (padding rows write nowhere: slot -1) and replayed.
Mixed iterations (decodes + prefill chunks) run eagerly: at the full token budget their kernels are
long enough to hide the launches.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nanoflow.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[KVCache], max_batch: int, max_pages: int,
                 device: torch.device) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.max_batch, self.max_pages = max_batch, max_pages
        self.buckets = graph_buckets(max_batch)
        z = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids = z(max_batch)
        self.positions = z(max_batch)
        self.slot_mapping = z(max_batch)
        self.seq_lens = z(max_batch, dtype=torch.int32)
        self.block_tables = z(max_batch, max_pages, dtype=torch.int32)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], logits_indices=self.positions[:0], num_decodes=bs,
            seq_lens_cpu=[1] * bs, query_lens_cpu=[1] * bs)

    @torch.inference_mode()
    def capture(self) -> None:
        self.slot_mapping.fill_(-1)  # capture runs must not write into live pages
        self.seq_lens.fill_(1)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool memory
            batch = self._static_batch(bs)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self.model(batch, self.kv_caches)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(batch, self.kv_caches)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.graphs), self.buckets)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.num_prefills == 0 and batch.num_decodes <= self.max_batch
                and batch.block_tables.shape[1] <= self.max_pages and bool(self.graphs))

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.num_decodes
        bucket = next(b for b in self.buckets if b >= bs)
        width = batch.block_tables.shape[1]
        self.input_ids[:bs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:bs].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:bs].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:bs, :width].copy_(batch.block_tables, non_blocking=True)
        if bucket > bs:  # padding rows: write nothing, attend to one (harmless) position
            self.slot_mapping[bs:bucket].fill_(-1)
            self.seq_lens[bs:bucket].fill_(1)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:bs]
