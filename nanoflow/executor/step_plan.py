"""What the engine hands the model runner for one iteration: plain host lists, no engine objects.

Rank 0 builds it (nanoflow.engine.step_planner) and broadcasts it, without the sampling rows, to the
other tensor-parallel ranks, which run the same forward from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nanoflow.config import pages_for
from nanoflow.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRows:
    """Per sampling row (the sequences whose next token this step samples), what the sampler needs."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # a seeded request's own generator
    banned: list[tuple[int, list[int]]]  # (row, token ids) not to sample yet: min_tokens not reached
    # Only when a row uses penalties: its output token ids and all its (prompt + output) token ids.
    output_token_ids: list[list[int]] | None = None
    all_token_ids: list[list[int]] | None = None


@dataclass(frozen=True)
class StepPlan:
    token_ids: list[list[int]]  # per sequence; a token still in flight from the step before is 0 here
    starts: list[int]  # tokens of each sequence already in the KV cache
    seq_lens: list[int]
    tables: list[list[int]]  # each sequence's page ids
    sample_at: list[int]  # flat positions whose next-token logits are sampled
    num_decodes: int
    fill_at: list[int]  # flat positions of the in-flight tokens
    fill_from: list[int]  # their rows in the previous step's sampled tokens
    sampling: SamplingRows | None = None  # rank 0 only
    # run without CUDA graphs, by the pipeline's schedule for the step's size (pipeline.timeline:
    # rank 0 times an eager forward's ops, and every rank must issue the same collectives, of the
    # same sizes, which a worker's graph replay, padded to its bucket, would not)
    eager: bool = False
    # the sequential schedule even where the pipeline covers the step (nanoflow tune -tp's output
    # check: the same step through both, every rank alike)
    sequential: bool = False

    def for_workers(self) -> StepPlan:
        """What the other ranks need: the forward's inputs, not the sampling (generators stay here)."""
        return dataclasses.replace(self, sampling=None)

    @classmethod
    def synthetic(cls, decodes: list[int], prefills: list[tuple[int, int]], vocab_size: int = 300,
                  first_page: int = 0) -> StepPlan:
        """A plan for profiling and tests: decodes are context lengths (one new token each),
        prefills (tokens already cached, chunk length); pages are numbered consecutively from
        first_page; every sequence samples its last token."""
        token_ids, starts, lens, tables, sample_at = [], [], [], [], []
        page = first_page
        for done, new in [(n - 1, 1) for n in decodes] + list(prefills):
            token_ids.append([(7 * (done + i)) % (vocab_size - 3) + 3 for i in range(new)])
            starts.append(done)
            lens.append(done + new)
            pages = pages_for(done + new)
            tables.append(list(range(page, page + pages)))
            page += pages
            sample_at.append(sum(map(len, token_ids)) - 1)
        return cls(token_ids, starts, lens, tables, sample_at, len(decodes), [], [])
