"""Paged attention as three ops of the layer: RoPE + KV-cache write, decode attention (one query per
sequence, memory-bound), prefill attention (query chunks, compute-bound).

The decode and prefill ops are separate so that a pipeline can run one nano-batch's decode attention
beside another's GEMMs; each builds its own kernel metadata from the batch it is handed (`metadata`)
and takes an SM cap from its caller. All of them read q from the fused qkv buffer in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.kernels import decode_attention as dk
from nanoflow.kernels import kv_cache as kvk
from nanoflow.kernels import prefill_attention as pk

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionShape:
    """This rank's heads (after the tensor-parallel split)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (Hq + 2 Hkv) * D] -> views q [T, Hq, D], k and v [T, Hkv, D] (strided, nothing copied)."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        T = qkv.shape[0]
        return (q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                v.view(T, self.num_kv_heads, self.head_dim))

    def q_and_out(self, qkv: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention ops' views: q [T, Hq, D] inside the qkv buffer, and the output rows
        [T, Hq * D] as [T, Hq, D]."""
        return self.split_qkv(qkv)[0], attn_out.view(attn_out.shape[0], self.num_heads, self.head_dim)


class RopeKVWrite:
    """Rotates q in place inside the qkv buffer and stores the rotated k and v in the cache pages."""

    def __init__(self, shape: AttentionShape, enforce_eager: bool) -> None:
        self.shape, self.enforce_eager = shape, enforce_eager

    def __call__(self, qkv: torch.Tensor, batch: ForwardBatch, cos_sin: torch.Tensor, kv: KVCache) -> None:
        q, k, v = self.shape.split_qkv(qkv)
        fn = kvk.rope_kv_write_ref if self.enforce_eager else kvk.rope_kv_write
        fn(q, k, v, batch.positions, cos_sin, kv[0], kv[1], batch.slot_mapping, q_out=q)


class DecodeAttention:
    """The batch's first num_decodes rows: one query each, over its sequence's pages."""

    def __init__(self, shape: AttentionShape, enforce_eager: bool,
                 capped_config: dk.DecodeConfig = dk.CAPPED) -> None:
        self.shape, self.enforce_eager = shape, enforce_eager
        # the kernel config on a capped grid (beside a GEMM in a pipeline), where the work each CTA
        # keeps in flight decides the rate; on all SMs the default config
        self.capped_config = capped_config

    def metadata(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with its decode count on the device (the Triton kernel reads it there, so a
        CUDA graph serves any count up to its capacity). A fill kernel: no host synchronisation."""
        if self.enforce_eager:
            return batch
        count = torch.full((1,), batch.num_decodes, dtype=torch.int32, device=batch.input_ids.device)
        return batch.replace(decode_count=count)

    def __call__(self, qkv: torch.Tensor, batch: ForwardBatch, kv: KVCache, out: torch.Tensor,
                 num_ctas: int | None = None) -> None:
        s = self.shape
        q, out = s.q_and_out(qkv, out)
        if self.enforce_eager:
            nd = batch.num_decodes
            if nd:
                dk.paged_decode_attention_ref(q[:nd], kv[0], kv[1], batch.page_tables[:nd], batch.seq_lens[:nd],
                                              s.scale, s.sliding_window, out=out[:nd])
            return
        rows = batch.decode_rows
        if rows:
            dk.paged_decode_attention(q[:rows], kv[0], kv[1], batch.page_tables[:rows], batch.seq_lens[:rows],
                                      s.scale, s.sliding_window, num_ctas=num_ctas, out=out[:rows],
                                      num_seqs=batch.decode_count,
                                      config=self.capped_config if num_ctas is not None else None)


class PrefillAttention:
    """The rows after the decodes: each prefill chunk attends causally to its sequence's pages."""

    def __init__(self, shape: AttentionShape, enforce_eager: bool) -> None:
        self.shape, self.enforce_eager = shape, enforce_eager
        # queries per program (all query heads of a kv head share its rows)
        self.block_q = pk.prefill_block_q(shape.num_heads // shape.num_kv_heads)

    def tile_capacity(self, num_tokens: int, spare: int) -> int:
        """Tiles that any batch of num_tokens tokens with at most `spare` prefill chunks needs."""
        return -(-num_tokens // self.block_q) + spare

    def metadata(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with the prefill kernel's work list (longest blocks first), uploaded from pinned
        memory without waiting for the device."""
        if self.enforce_eager:
            return batch
        nd = batch.num_decodes
        tiles = pk.prefill_tiles(np.asarray(batch.query_lens_cpu[nd:]), np.asarray(batch.seq_lens_cpu[nd:]), nd,
                                 self.block_q)
        host = torch.from_numpy(tiles)
        device = batch.input_ids.device
        if device.type == "cuda":
            host = host.pin_memory()
        return batch.replace(prefill_tiles=host.to(device, non_blocking=True))

    def __call__(self, qkv: torch.Tensor, batch: ForwardBatch, kv: KVCache, out: torch.Tensor,
                 num_ctas: int | None = None) -> None:
        # num_ctas: the tile list is the grid; a cap would need a persistent prefill kernel.
        s = self.shape
        q, out = s.q_and_out(qkv, out)
        if self.enforce_eager:
            nd = batch.num_decodes
            if batch.num_prefills:
                pk.paged_prefill_attention_ref(q[nd:], kv[0], kv[1], batch.page_tables[nd:],
                                               batch.query_lens_cpu[nd:], batch.seq_lens_cpu[nd:], s.scale,
                                               s.sliding_window, out=out[nd:])
            return
        if batch.prefill_tiles.shape[0]:
            pk.paged_prefill_attention(q, kv[0], kv[1], batch.page_tables, batch.query_start_loc, batch.seq_lens,
                                       s.scale, s.sliding_window, out=out, tiles=batch.prefill_tiles)
