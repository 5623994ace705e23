"""A request, its sequences (n samples each), and what the engine hands back for it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from nanoflow.config import pages_for
from nanoflow.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class Sequence:
    """One generation stream: a request with n > 1 has n of them, each with its own pages."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    arrival: int  # FCFS order; preempted sequences keep theirs
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    # Tokens sampled on the GPU whose values the CPU has not read yet (asynchronous scheduling):
    # they count towards the sequence's length, and the next step feeds them from device memory.
    num_inflight: int = 0
    pages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Incremental detokenization state (output_processor.py).
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens known on the CPU (in-flight ones excluded)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int | None = None) -> list[int]:
        """all_token_ids[start:stop] without building the whole list (called per step per sequence)."""
        n_prompt = len(self.prompt_token_ids)
        stop = len(self.prompt_token_ids) + len(self.output_token_ids) if stop is None else stop
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : stop - n_prompt]
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n_prompt]

    @property
    def will_finish(self) -> bool:
        """True when the tokens already sampled reach max_tokens: no further step is needed."""
        return len(self.output_token_ids) + self.num_inflight >= self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def pages_needed(self, num_tokens: int) -> int:
        return pages_for(num_tokens) - len(self.pages)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
