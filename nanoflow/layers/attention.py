"""Paged attention as two ops of the layer: rope + KV-cache write, then attention over the pages."""

from __future__ import annotations

import torch
from torch import nn

from nanoflow.forward_batch import ForwardBatch
from nanoflow.kernels import paged_attention as pa
from nanoflow.kernels import rotary


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        use_triton: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.use_triton = use_triton

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        T = qkv.shape[0]
        return (q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                v.view(T, self.num_kv_heads, self.head_dim))

    def rope_kv_write(
        self, qkv: torch.Tensor, batch: ForwardBatch, cos_sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Rotates q and k, stores k and v in the cache; returns rotated q [T, Hq, D]."""
        q, k, v = self.split_qkv(qkv)
        fn = rotary.rope_kv_write if self.use_triton else rotary.rope_kv_write_ref
        return fn(q, k, v, batch.positions, cos_sin, kv_cache[0], kv_cache[1], batch.slot_mapping)

    def forward(
        self, q: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """q: [T, Hq, D] -> [T, Hq * D]; decode tokens and prefill chunks go to their own kernels."""
        k_cache, v_cache = kv_cache
        out = torch.empty_like(q)
        if self.use_triton:
            rows = batch.decode_rows
            if rows:
                pa.paged_decode_attention(q[:rows], k_cache, v_cache, batch.page_tables[:rows], batch.seq_lens[:rows],
                                          self.scale, self.sliding_window, out=out[:rows], num_seqs=batch.decode_count)
            if batch.prefill_tiles.shape[0]:
                pa.paged_prefill_attention(q, k_cache, v_cache, batch.page_tables, batch.query_start_loc,
                                           batch.seq_lens, self.scale, self.sliding_window, out=out,
                                           tiles=batch.prefill_tiles)
            return out.view(q.shape[0], -1)
        nd = batch.num_decodes
        if nd:
            out[:nd] = pa.paged_decode_attention_ref(q[:nd], k_cache, v_cache, batch.page_tables[:nd],
                                                     batch.seq_lens[:nd], self.scale, self.sliding_window)
        if batch.num_prefills:
            out[nd:] = pa.paged_prefill_attention_ref(
                q[nd:], k_cache, v_cache, batch.page_tables[nd:], batch.query_lens_cpu[nd:],
                batch.seq_lens_cpu[nd:], self.scale, self.sliding_window)
        return out.view(q.shape[0], -1)
