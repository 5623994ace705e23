"""The flat per-iteration batch, and its nano-batches.

Written once per iteration by the model runner, read by every op of every layer. Token order is
fixed: all decode tokens first (one per sequence), then the prefill chunks, each sequence's chunk
contiguous. `split` cuts the batch into nano-batches over token ranges, which the layer ops run one
after another (or, in a pipeline, side by side). Imports nothing of ours, so any layer may depend on it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, page * page_size + offset where each token's K/V goes; -1: none
    query_start_loc: torch.Tensor  # [B + 1] int32, start of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32, context length of each sequence after this step
    page_tables: torch.Tensor  # [B, max_pages] int32, page ids (padding entries are 0)
    logits_indices: torch.Tensor  # [S] int64, tokens whose next-token logits are sampled
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    # Host copies for code that must not synchronise with the device to learn shapes.
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    # Rows the decode kernel may cover: num_decodes, or more in a CUDA graph's static batch (its
    # capacity), where the kernel reads the live count from decode_count.
    decode_rows: int
    # The attention ops' own metadata, built from this batch by layers.attention (DecodeAttention /
    # PrefillAttention.metadata) before the forward, so that one CUDA graph serves every batch of its
    # bucket: the decode count on the device ([1] int32) and the prefill kernel's work list ([N, 2]
    # int32; rows of -1 are idle). None until built.
    decode_count: torch.Tensor | None = None
    prefill_tiles: torch.Tensor | None = None
    # Where this batch's tokens start in the batch it was split from (0 for a whole batch): the
    # rows of the iteration's activation buffers that its ops read and write.
    token_offset: int = 0

    # Fields that a CUDA graph's static batch pads beyond the live rows, and the value that makes a
    # padding row do nothing (no K/V write, an idle tile).
    PAD_VALUES = {"slot_mapping": -1, "prefill_tiles": -1}

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """Every device tensor of the batch, by field name (what a CUDA graph keeps static copies of)."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def replace(self, **changes) -> ForwardBatch:
        return dataclasses.replace(self, **changes)

    @classmethod
    def capacity(cls, num_tokens: int, num_seqs: int, max_pages: int, num_tiles: int,
                 device: torch.device) -> ForwardBatch:
        """Room for any batch of up to num_tokens tokens and num_seqs sequences: what a CUDA graph
        captures, and what each batch it replays is copied into (`copy_into`). As captured it
        computes nothing that lands anywhere: no K/V writes, no decodes on the device, idle tiles."""
        def ints(*shape: int, dtype: torch.dtype = torch.int32, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        return cls(
            input_ids=ints(num_tokens, dtype=torch.int64), positions=ints(num_tokens, dtype=torch.int64),
            slot_mapping=ints(num_tokens, dtype=torch.int64, fill=-1), query_start_loc=ints(num_seqs + 1),
            seq_lens=ints(num_seqs), page_tables=ints(num_seqs, max_pages), logits_indices=ints(0, dtype=torch.int64),
            num_decodes=num_seqs, seq_lens_cpu=[1] * num_seqs, query_lens_cpu=[1] * num_seqs, decode_rows=num_seqs,
            decode_count=ints(1), prefill_tiles=ints(num_tiles, 2, fill=-1))

    def shapes(self) -> dict[str, torch.Size]:
        return {name: t.shape for name, t in self.tensor_fields().items()}

    def copy_into(self, static: ForwardBatch) -> None:
        """Copies this batch into the leading rows of a capacity batch's tensors (asynchronously) and
        pads the rest where padding rows would otherwise act (PAD_VALUES). Tensors the capacity batch
        leaves empty (the logits rows, taken outside the graph) are not its inputs."""
        mine = self.tensor_fields()
        for name, dst in static.tensor_fields().items():
            if not dst.numel():
                continue
            src = mine[name]
            dst[tuple(slice(0, n) for n in src.shape)].copy_(src, non_blocking=True)
            if name in self.PAD_VALUES and src.shape[0] < dst.shape[0]:
                dst[src.shape[0]:].fill_(self.PAD_VALUES[name])

    def split(self, bounds: Sequence[int]) -> list[ForwardBatch]:
        """Nano-batches over the token ranges [bounds[i], bounds[i + 1]) (bounds start at 0 and end at
        num_tokens). Token tensors and page tables are views; the per-sequence tensors of a part are
        computed on the device, with no host synchronisation. A boundary may fall inside the decode
        rows or inside a prefill chunk: a chunk's first part ends its context where the part ends
        (the second part attends to the K/V the first one wrote). The parts carry no logits rows
        (the logits are taken from the whole batch's hidden states) and no attention metadata yet."""
        if bounds[0] != 0 or bounds[-1] != self.num_tokens or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"nano-batch bounds must rise strictly from 0 to {self.num_tokens}, got {list(bounds)}")
        qstart = list(itertools.accumulate(self.query_lens_cpu, initial=0))
        return [self._part(a, b, qstart) for a, b in itertools.pairwise(bounds)]

    def _part(self, a: int, b: int, qstart: list[int]) -> ForwardBatch:
        first = bisect.bisect_right(qstart, a) - 1  # the sequence holding token a
        last = bisect.bisect_left(qstart, b) - 1  # the sequence holding token b - 1
        seqs = range(first, last + 1)
        qlens = [min(b, qstart[i + 1]) - max(a, qstart[i]) for i in seqs]
        cut = [max(0, qstart[i + 1] - b) for i in seqs]  # tokens of the sequence after this part
        ends = self.query_start_loc[first + 1 : last + 2]
        num_decodes = max(0, min(self.num_decodes, b) - a)
        return ForwardBatch(
            input_ids=self.input_ids[a:b],
            positions=self.positions[a:b],
            slot_mapping=self.slot_mapping[a:b],
            query_start_loc=(self.query_start_loc[first : last + 2] - a).clamp_(0, b - a),
            seq_lens=self.seq_lens[first : last + 1] - (ends - b).clamp_(min=0),
            page_tables=self.page_tables[first : last + 1],
            logits_indices=self.logits_indices[:0],
            num_decodes=num_decodes,
            seq_lens_cpu=[self.seq_lens_cpu[i] - c for i, c in zip(seqs, cut, strict=True)],
            query_lens_cpu=qlens,
            decode_rows=max(0, min(self.decode_rows, b) - a),
            token_offset=self.token_offset + a,
        )
