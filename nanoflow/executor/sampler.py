"""Batched sampling on the device: penalties, temperature, top-k/top-p/min-p, per-request seeds.

Sampling uses the exponential-race trick (argmax of p / q with q ~ Exp(1)), which draws exactly
from p and lets a seeded request draw its noise from its own generator: its tokens do not depend
on which other requests share the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nanoflow.sampling_params import MAX_LOGPROBS

# Logits a sampler pass holds at once (fp32): a batch of ~1,000 rows over a 128k vocabulary would
# otherwise make a dozen [rows, vocab] temporaries (sort values, int64 order, probabilities, noise:
# several GiB) outside what the KV pool's sizing counted. 2^25 is 128 MiB a temporary.
ROW_CHUNK_ELEMENTS = 1 << 25


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [S] fp32; 0 = greedy
    top_p: torch.Tensor  # [S] fp32
    top_k: torch.Tensor  # [S] int64; vocab size = off
    min_p: torch.Tensor  # [S] fp32
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_top_p_k_min_p: bool
    # Penalties (None when no row uses them): token counts of outputs, and a prompt+output mask.
    presence: torch.Tensor | None = None  # [S]
    frequency: torch.Tensor | None = None  # [S]
    repetition: torch.Tensor | None = None  # [S]
    output_counts: torch.Tensor | None = None  # [S, V]
    seen_mask: torch.Tensor | None = None  # [S, V] bool, prompt and output tokens
    # (row, token ids) that must not be sampled yet (min_tokens not reached).
    banned: list[tuple[int, list[int]]] | None = None
    max_num_logprobs: int = -1  # -1: none requested

    def rows(self, start: int, end: int) -> SamplingMetadata:
        """The metadata of rows [start, end) (the batch-wide flags stay: they only allow work)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:end]
        banned = [(r - start, ids) for r, ids in self.banned or () if start <= r < end]
        return dataclasses.replace(
            self, temperature=self.temperature[start:end], top_p=self.top_p[start:end], top_k=self.top_k[start:end],
            min_p=self.min_p[start:end], generators=self.generators[start:end], presence=cut(self.presence),
            frequency=cut(self.frequency), repetition=cut(self.repetition), output_counts=cut(self.output_counts),
            seen_mask=cut(self.seen_mask), banned=banned or None)

    @staticmethod
    def worst_case(num_rows: int, vocab_size: int, device: torch.device) -> SamplingMetadata:
        """Every row sampling with every filter, penalty and the most logprobs: what the memory
        profile runs, so the KV pool leaves room for the costliest batch a server can get."""
        full = lambda v, dtype=torch.float32: torch.full((num_rows,), v, dtype=dtype, device=device)  # noqa: E731
        return SamplingMetadata(
            temperature=full(0.7), top_p=full(0.9), top_k=full(50, torch.int64), min_p=full(0.05),
            generators=[None] * num_rows, all_greedy=False, any_top_p_k_min_p=True, presence=full(0.5),
            frequency=full(0.5), repetition=full(1.1),
            output_counts=torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device),
            seen_mask=torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device),
            max_num_logprobs=MAX_LOGPROBS)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (sampled token logprob, its rank, [(token, logprob)] top-k) or None.
    logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None


@dataclass
class SampledTensors:
    """The sampler's result still on the device, so the CPU need not wait for it."""

    tokens: torch.Tensor  # [S] int64
    # (chosen logprob [S], rank [S], top-k logprobs [S, k], top-k ids [S, k]) when requested
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    num_logprobs: int = 0

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, *(self.logprobs or ())]

    @staticmethod
    def cat(parts: list[SampledTensors]) -> SampledTensors:
        if len(parts) == 1:
            return parts[0]
        logprobs = None if parts[0].logprobs is None else tuple(
            torch.cat(ts) for ts in zip(*(p.logprobs for p in parts), strict=True))
        return SampledTensors(torch.cat([p.tokens for p in parts]), logprobs, parts[0].num_logprobs)

    @staticmethod
    def to_output(host: list[torch.Tensor], num_logprobs: int) -> SamplerOutput:
        """Host copies of tensors() -> Python lists."""
        tokens = host[0].tolist()
        if len(host) == 1:
            return SamplerOutput(tokens, None)
        chosen, ranks, vals, ids = (t.tolist() for t in host[1:])
        lps = [(c, r, list(zip(i[:num_logprobs], v[:num_logprobs], strict=True)))
               for c, r, i, v in zip(chosen, ranks, ids, vals, strict=True)]
        return SamplerOutput(tokens, lps)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SampledTensors:
        """Samples in passes of at most ROW_CHUNK_ELEMENTS logits; a seeded row draws from its own
        generator, so its token does not depend on the pass it falls in."""
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        n = logits.shape[0]
        if n <= step:
            return self._sample(logits, meta)
        return SampledTensors.cat([self._sample(logits[i:i + step], meta.rows(i, min(n, i + step)))
                                   for i in range(0, n, step)])

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> SampledTensors:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs >= 0 else None
        logits = apply_penalties(logits, meta)
        if meta.banned:
            for row, ids in meta.banned:
                logits[row, ids] = float("-inf")
        greedy_tokens = logits.argmax(dim=-1)
        if meta.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = torch.where(meta.temperature == 0, greedy_tokens, self._random(logits, meta))
        return SampledTensors(tokens, _gather_logprobs(raw_logprobs, tokens, meta.max_num_logprobs),
                              max(meta.max_num_logprobs, 0))

    def _random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        temp = torch.where(meta.temperature == 0, torch.ones_like(meta.temperature), meta.temperature)
        logits = logits / temp[:, None]
        if meta.any_top_p_k_min_p:
            logits = apply_top_k_top_p_min_p(logits, meta.top_k, meta.top_p, meta.min_p)
        probs = torch.softmax(logits, dim=-1)
        # One batched draw for the unseeded rows; seeded rows overwrite theirs from their own
        # generators. No host-side index tensors: those would make the CPU wait for the GPU.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(meta.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.output_counts is None:
        return logits
    rep = meta.repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)  # transformers' repetition penalty
    logits = torch.where(meta.seen_mask, penalized, logits)
    counts = meta.output_counts.to(logits.dtype)
    return logits - meta.frequency[:, None] * counts - meta.presence[:, None] * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k, nucleus top-p, and min-p sets."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _gather_logprobs(
    raw: torch.Tensor | None, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if raw is None:
        return None
    chosen = raw.gather(1, tokens[:, None])
    ranks = (raw > chosen).sum(dim=-1) + 1
    top_vals, top_ids = raw.topk(max(k, 1), dim=-1)
    return chosen[:, 0], ranks, top_vals, top_ids
