"""Dense-budget continuous batching (NanoFlow section 4).

Each iteration carries at most `max_num_batched_tokens` tokens: every running decode first, then
prefill chunks topping the batch up (a prompt may span several iterations). Waiting requests are
admitted first-come-first-served while the projected peak page use of everything running still fits
(`projected_peak_pages`: each sequence grows to its expected length and frees its pages when done).
When pages run out anyway, the newest running sequence is preempted: its pages are freed and it
is recomputed later from its prompt and the tokens it had produced, so its output is unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from nanoflow.config import PAGE_SIZE
from nanoflow.engine.page_pool import PagePool
from nanoflow.engine.request import SeqStatus, Sequence


def projected_peak_pages(tokens: np.ndarray, remaining: np.ndarray) -> int:
    """Peak page use over the coming steps if each sequence i, holding tokens[i] now, grows by one
    token per step for remaining[i] steps and then frees its pages.

    Summing every sequence's own peak instead would assume they all peak together: sequences that
    started together then also finish together, and the batch runs in waves of full decode steps
    followed by prefill-only steps. Use only rises between finishes, so the peak is at one of the
    times t = remaining[j]: with the sequences sorted by remaining, longest first, the ones alive at
    t are a prefix, and use(t) <= sum(tokens + t + PAGE_SIZE - 1) / PAGE_SIZE over that prefix.
    """
    if tokens.size == 0:
        return 0
    order = np.argsort(-remaining, kind="stable")
    t = remaining[order]
    alive_tokens = np.cumsum(tokens[order] + PAGE_SIZE - 1)
    alive = np.arange(1, t.size + 1)
    return int(((alive_tokens + alive * t) // PAGE_SIZE).max())


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so its next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    capped: list[Sequence] = field(default_factory=list)  # finished: the KV pool cannot hold them

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self, num_pages: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
        admission_output_tokens: int,
    ) -> None:
        self.page_pool = PagePool(num_pages)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.admission_output_tokens = admission_output_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    # --- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Releases a sequence that finished or was aborted, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.page_pool.free(seq)
        seq.status = SeqStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one iteration ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes before partial prefills, so a long prompt never starves running sequences.
        # A sequence whose in-flight token is its last (max_tokens or max_model_len) needs no more steps.
        decoding = [s for s in self.running if s.num_computed_tokens == s.num_tokens - 1 and not s.will_finish
                    and s.num_tokens < self.max_model_len]
        prefilling = [s for s in self.running if s.num_computed_tokens < s.num_tokens - 1]
        for group, dest in ((decoding, out.decodes), (prefilling, out.prefills)):
            for seq in group:
                if budget == 0:
                    break
                if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                    continue
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not self._reserve(seq, n, out):
                    continue
                dest.append(ScheduledSeq(seq, n))
                budget -= n
        if not out.preempted:
            budget = self._admit(budget, out)
        return out

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocates pages for n more tokens of seq, preempting newer sequences if needed."""
        while not self.page_pool.can_allocate(seq, seq.num_computed_tokens + n):
            if self.running == [seq] and seq.num_computed_tokens + n > self.page_pool.num_pages * PAGE_SIZE:
                # Alone and still too long for the whole pool: recomputing it would loop forever.
                seq.finish_reason = "length"
                self.finish(seq)
                out.capped.append(seq)
                return False
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.page_pool.allocate(seq, seq.num_computed_tokens + n)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.page_pool.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        for group in (out.decodes, out.prefills):
            group[:] = [s for s in group if s.seq is not seq]
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _projection(self, seq: Sequence) -> tuple[int, int]:
        """(tokens now, tokens still to come) as admission plans for them; outputs are capped at
        admission_output_tokens, a guess that preemption repairs when a sequence runs longer."""
        remaining = min(seq.max_tokens - len(seq.output_token_ids) - seq.num_inflight, self.admission_output_tokens,
                        self.max_model_len - seq.num_tokens)
        return seq.num_tokens, max(remaining, 0)

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        planned = [self._projection(s) for s in self.running]
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_inflight:  # preempted this step with a token still on the GPU: next time
                break
            n = min(seq.num_tokens, budget)
            tokens, remaining = np.array([*planned, self._projection(seq)]).T
            if self.running and projected_peak_pages(tokens, remaining) > self.page_pool.num_pages:
                break
            if not self.page_pool.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.page_pool.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            (out.decodes if n == 1 and seq.num_tokens == 1 else out.prefills).append(ScheduledSeq(seq, n))
            planned.append(self._projection(seq))
            budget -= n
        return budget

    def step_done(self, out: SchedulerOutput) -> None:
        """Marks the scheduled tokens as computed (their K/V are now in the cache)."""
        for s in out.seqs:
            s.seq.num_computed_tokens += s.num_new_tokens
