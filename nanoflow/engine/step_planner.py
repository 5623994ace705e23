"""Scheduler output -> StepPlan: the scheduled tokens and the sampling rows as plain host lists,
the model runner's one input (its counterpart in vLLM is the SchedulerOutput the worker receives)."""

from __future__ import annotations

from nanoflow.engine.request import Sequence
from nanoflow.engine.scheduler import SchedulerOutput
from nanoflow.executor.step_plan import SamplingRows, StepPlan


def plan_step(sched: SchedulerOutput, sampled: list[Sequence], prev_sampled: list[Sequence],
              eos_token_ids: set[int]) -> StepPlan:
    """sampled: sampled_seqs(sched). A token still in flight from the step before (sampled by the
    GPU, not yet read back by the CPU) is a placeholder, filled on the device from that step's row
    in `prev_sampled`, that step's sampled sequences."""
    token_ids, starts, lens, tables, sample_at = [], [], [], [], []
    fill_at, fill_from = [], []
    prev_rows = {seq.seq_id: row for row, seq in enumerate(prev_sampled)}
    offset = 0
    for s in sched.seqs:
        seq = s.seq
        start = seq.num_computed_tokens
        ids = seq.token_slice(start, min(start + s.num_new_tokens, seq.num_tokens - seq.num_inflight))
        if len(ids) < s.num_new_tokens:  # the last token is the one sampled by the step before
            fill_at.append(offset + len(ids))
            fill_from.append(prev_rows[seq.seq_id])
            ids = ids + [0]
        token_ids.append(ids)
        starts.append(start)
        lens.append(start + s.num_new_tokens)
        tables.append(seq.pages)
        offset += s.num_new_tokens
        if s.samples:
            sample_at.append(offset - 1)
    sampling = sampling_rows(sampled, eos_token_ids)
    return StepPlan(token_ids, starts, lens, tables, sample_at, len(sched.decodes), fill_at, fill_from, sampling)


def sampled_seqs(sched: SchedulerOutput) -> list[Sequence]:
    """The sequences whose next token the step samples, in sampling-row order."""
    return [s.seq for s in sched.seqs if s.samples]


def sampling_rows(seqs: list[Sequence], eos_token_ids: set[int]) -> SamplingRows | None:
    if not seqs:
        return None
    params = [s.params for s in seqs]
    banned = []
    for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
        if len(seq.output_token_ids) + seq.num_inflight < p.min_tokens:
            stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if stop_ids:
                banned.append((row, stop_ids))
    penalties = any(p.has_penalties for p in params)
    return SamplingRows(params, [s.generator for s in seqs], banned,
                        [list(s.output_token_ids) for s in seqs] if penalties else None,
                        [s.all_token_ids for s in seqs] if penalties else None)
