"""The flat per-iteration batch and its attention metadata.

Written once per iteration by the model runner, read by every layer (and later by the pipeline).
Token order is fixed: all decode tokens first (one per sequence), then the prefill chunks, each
sequence's chunk contiguous. Imports nothing of ours, so any layer may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, page * page_size + offset where each token's K/V goes
    query_start_loc: torch.Tensor  # [B + 1] int32, start of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32, context length of each sequence after this step
    page_tables: torch.Tensor  # [B, max_pages] int32, page ids (padding entries are 0)
    logits_indices: torch.Tensor  # [S] int64, tokens whose next-token logits are sampled
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    # Host copies for code that must not synchronise with the device to learn shapes.
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    # What the Triton attention kernels read instead of host counts, so that one CUDA graph serves
    # every batch of its size bucket: the decode count on the device, the rows the decode kernel
    # may cover (>= num_decodes: a graph's capacity), and the prefill kernel's work list
    # (kernels.paged_attention.prefill_tiles; rows of -1 are idle).
    decode_count: torch.Tensor  # [1] int32
    decode_rows: int
    prefill_tiles: torch.Tensor  # [N, 2] int32

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
