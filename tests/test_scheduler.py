"""Scheduler invariants on random workloads: budget, page accounting, preemption, rejection."""

import random

import pytest

from nanoflow.config import PAGE_SIZE
from nanoflow.engine.request import SeqStatus, Sequence
from nanoflow.engine.scheduler import Scheduler
from nanoflow.sampling_params import SamplingParams


def _seq(i: int, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(i, str(i), 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens, i)


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    """Simulate the engine: every step stays within budget and seq limits, pages are never double
    booked, every sequence completes, and all pages are free at the end."""
    rng = random.Random(seed)
    budget, pages = rng.choice([8, 32, 100]), rng.choice([6, 20, 64])
    sched = Scheduler(pages, max_num_seqs=rng.choice([2, 8]), max_num_batched_tokens=budget, max_model_len=512,
                      admission_output_tokens=rng.choice([1, 64]))
    seqs = [_seq(i, rng.randrange(1, 60), rng.randrange(1, 30)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len(sched.running) <= sched.max_num_seqs
        owned = [p for s in sched.running for p in s.pages]
        assert len(owned) == len(set(owned)) and len(owned) + sched.page_pool.num_free == pages
        for s in out.seqs:  # each scheduled token has a page
            assert len(s.seq.pages) * PAGE_SIZE >= s.seq.num_computed_tokens + s.num_new_tokens
        assert [s for s in out.seqs if s.seq.status is not SeqStatus.RUNNING] == []
        sampled = [s.seq for s in out.seqs if s.samples]
        sched.step_done(out)
        for seq in sampled:
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) >= seq.max_tokens:
                sched.finish(seq)
    assert not sched.has_unfinished()
    assert all(len(s.output_token_ids) == s.max_tokens for s in seqs)
    assert sched.page_pool.num_free == pages


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = Scheduler(100, max_num_seqs=8, max_num_batched_tokens=8, max_model_len=512, admission_output_tokens=8)
    a, b = _seq(0, 4, 10), _seq(1, 40, 10)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a's whole prompt, then 4 tokens of b's
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.prefills] == [(0, 4), (1, 4)]
    sched.step_done(out)
    a.output_token_ids.append(1)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.decodes] == [(0, 1)]
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.prefills] == [(1, 7)]


def test_preempts_newest_and_recomputes():
    sched = Scheduler(3, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, admission_output_tokens=1)
    old, new = _seq(0, 15, 40), _seq(1, 15, 40)
    sched.add(old)
    sched.add(new)
    for _ in range(3):  # tokens 16 and 17: the second page is needed by both, one is left
        out = sched.schedule()
        if out.preempted:
            break
        sched.step_done(out)
        for s in out.seqs:
            s.seq.output_token_ids.append(1)
    assert out.preempted == [new]
    assert [s.seq for s in out.seqs] == [old]
    assert new.status is SeqStatus.WAITING and new.pages == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new


def test_projected_peak_pages_bounds_the_true_peak() -> None:
    """The peak of the use curve (each sequence growing a token per step, freed when done): never
    below the true page peak, at most one page per sequence above it, never above the sum of peaks."""
    import numpy as np

    from nanoflow.engine.scheduler import projected_peak_pages

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 12)
        tokens = np.array([rng.randrange(1, 300) for _ in range(n)])
        remaining = np.array([rng.randrange(0, 300) for _ in range(n)])
        true = max(sum(-(-(c + t) // PAGE_SIZE) for c, r in zip(tokens, remaining, strict=True) if r >= t)
                   for t in range(int(remaining.max()) + 1))
        got = projected_peak_pages(tokens, remaining)
        assert true <= got <= true + n
        assert got <= sum(-(-(c + r) // PAGE_SIZE) + 1 for c, r in zip(tokens, remaining, strict=True))
    assert projected_peak_pages(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0


def test_admission_counts_on_staggered_finishes() -> None:
    """A sequence close to its end frees its pages before a newcomer peaks: the newcomer is admitted
    although their two peaks together (9 + 5 pages) exceed the 12-page pool."""
    sched = Scheduler(12, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512, admission_output_tokens=512)
    old, new = _seq(0, 128, 8), _seq(1, 16, 64)  # peaks: 136 tokens (9 pages) in 8 steps; 80 (5) in 64
    sched.add(old)
    out = sched.schedule()
    sched.step_done(out)
    old.output_token_ids.append(1)
    sched.add(new)
    out = sched.schedule()  # at most 129 + 7 = 136 and 16 + 7 = 23 tokens together: 11 pages
    assert [s.seq for s in out.decodes] == [old] and [s.seq for s in out.prefills] == [new]
