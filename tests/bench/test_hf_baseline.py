from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.bench.hf_baseline import (
    estimate_batch,
    generate_batch,
    left_pad,
    mean_requests,
    next_batch,
    run_hf_baseline,
)
from nanoflow.bench.workloads import Workload, build_workload
from nanoflow.model_arch import ModelArch, load_hf_config

CPU = torch.device("cpu")


def _batches(lens: list[tuple[int, int]], fits, max_batch: int) -> list[tuple[int, int]]:
    out, start = [], 0
    while start < len(lens):
        end = next_batch(lens, start, fits, max_batch)
        out.append((start, end))
        start = end
    return out


def _trace(trace_csv: Path):
    """The four requests of the fixture that fit: (40, 8), (12, 30), (100, 100), (7, 1)."""
    return build_workload(f"trace:{trace_csv}", None, vocab_size=512, max_model_len=256)


def test_batch_estimate_for_llama3_8b_on_an_h100() -> None:
    """~63 GiB free after the 16 GB of weights: gpu-facts.md ran batch 384 at 512/512 (48 GiB above
    the weights, the KV cache of the last step), so the estimate must allow at least that while the
    last step's KV cache still fits."""
    arch = ModelArch.from_hf(load_hf_config(dummy_model_dir("llama3-8b")))
    b = estimate_batch(arch, 63 * 2**30, 512, 512, 2)
    assert 384 <= b and b * 1024 * 128 * 2**10 <= 60 * 2**30
    assert estimate_batch(arch, 63 * 2**30, 1155, 211, 2) < b
    assert estimate_batch(arch, 1 << 20, 512, 512, 2) == 1


def test_batches_grow_while_the_padded_batch_fits() -> None:
    lens = [(10, 5), (20, 5), (5, 40), (10, 10), (60, 30), (1, 1)]
    budget = lambda bs, max_in, max_out: bs * (max_in + max_out) <= 100  # padded tokens of the batch
    assert _batches(lens, budget, 8) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert _batches(lens, lambda *_: True, 4) == [(0, 4), (4, 6)]
    assert _batches(lens, lambda *_: True, 1) == [(i, i + 1) for i in range(6)]
    assert _batches([(500, 500)], budget, 8) == [(0, 1)]  # a request too large alone still runs


def test_mean_shape() -> None:
    mixed = [([1, 2, 3, 4], 4), ([5, 6], 7)]
    assert mean_requests(mixed) == [([1, 2, 3], 6), ([5, 6, 5], 6)]  # round(5.5) == 6, round(3) == 3
    fixed = [([1, 2, 3], 5), ([4, 5, 6], 5)]
    assert mean_requests(fixed) == fixed


def test_left_pad() -> None:
    ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_padding_keeps_the_greedy_tokens(bench_tiny_llama: str) -> None:
    """A short prompt padded into a batch with a long one generates what it generates alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bench_tiny_llama, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(3)
    short, long = (torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 37))
    _, alone = generate_batch(model, [short], 12, 0, CPU)
    _, together = generate_batch(model, [long, short], 12, 0, CPU)
    _, long_alone = generate_batch(model, [long], 12, 0, CPU)
    assert together.shape == (2, 12)
    assert together[1].tolist() == alone[0].tolist() and together[0].tolist() == long_alone[0].tolist()


def test_runs_the_traces_own_requests(bench_tiny_llama: str, trace_csv: Path) -> None:
    res = run_hf_baseline(bench_tiny_llama, _trace(trace_csv), torch.float32, CPU, max_batch=2,
                          num_requests=None, seed=0, use_tqdm=False)
    assert res["status"] == "ok" and res["shape"] == "requests"
    assert (res["batch_sizes"], res["num_requests"], res["output_len_mismatches"]) == ([2, 2], 4, 0)
    # Only real tokens: each request's own prompt and output, not the padding or the surplus steps.
    assert (res["input_tokens"], res["output_tokens"]) == (40 + 12 + 100 + 7, 8 + 30 + 100 + 1)
    assert res["padded_tokens"] == 2 * (40 + 30) + 2 * (100 + 100)
    assert res["padding_efficiency"] == pytest.approx(298 / 540)
    assert res["total_tokens_per_s"] == pytest.approx(298 / res["elapsed_s"])


def test_time_cap_and_request_limit(bench_tiny_llama: str, trace_csv: Path) -> None:
    res = run_hf_baseline(bench_tiny_llama, _trace(trace_csv), torch.float32, CPU, max_batch=2,
                          num_requests=None, seed=0, use_tqdm=False, max_seconds=1e-9)
    assert (res["batch_sizes"], res["input_tokens"], res["output_tokens"]) == ([2], 52, 38)  # one whole batch
    res = run_hf_baseline(bench_tiny_llama, _trace(trace_csv), torch.float32, CPU, max_batch=8,
                          num_requests=3, seed=0, use_tqdm=False, max_seconds=0)
    assert (res["batch_sizes"], res["input_tokens"], res["output_tokens"]) == ([3], 152, 138)


def test_mean_shape_run(bench_tiny_llama: str, trace_csv: Path) -> None:
    res = run_hf_baseline(bench_tiny_llama, _trace(trace_csv), torch.float32, CPU, max_batch=4,
                          num_requests=None, seed=0, use_tqdm=False, shape="mean")
    assert res["shape"] == "mean" and res["batch_sizes"] == [4]
    assert (res["input_tokens"], res["output_tokens"]) == (4 * 40, 4 * 35)  # means 39.75 and 34.75
    assert res["padding_efficiency"] == 1 and res["output_len_mismatches"] == 0


def _oom_when(monkeypatch: pytest.MonkeyPatch, too_big) -> list[tuple[int, int]]:
    """Makes generate raise out-of-memory on the inputs too_big(input_ids) picks; returns the shapes."""
    from transformers.generation.utils import GenerationMixin

    real = GenerationMixin.generate
    shapes = []

    def generate(self, input_ids=None, **kwargs):
        shapes.append(tuple(input_ids.shape))
        if too_big(input_ids):
            raise torch.OutOfMemoryError("simulated")
        return real(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    return shapes


def test_splits_a_batch_on_out_of_memory(bench_tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = _oom_when(monkeypatch, lambda ids: ids.shape[0] > 4)
    wl = build_workload("12x5", 8, vocab_size=512, max_model_len=256)
    res = run_hf_baseline(bench_tiny_llama, wl, torch.float32, CPU, max_batch=8,
                          num_requests=None, seed=0, use_tqdm=False)
    assert [b for b, _ in shapes] == [2, 8, 4, 4]  # warm-up, then 8 -> two halves
    assert (res["batch_sizes"], res["batch_size"], res["oom_retries"], res["num_failed"]) == ([4, 4], 4, 1, 0)
    assert (res["input_tokens"], res["output_tokens"], res["output_len_mismatches"]) == (8 * 12, 8 * 5, 0)
    assert res["padding_efficiency"] == 1  # a fixed workload pads nothing


def test_a_request_too_large_alone_is_skipped(bench_tiny_llama: str, trace_csv: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _oom_when(monkeypatch, lambda ids: ids.shape[1] >= 100)  # the 100-token prompt never fits
    res = run_hf_baseline(bench_tiny_llama, _trace(trace_csv), torch.float32, CPU, max_batch=2,
                          num_requests=None, seed=0, use_tqdm=False)
    assert res["status"] == "ok"
    assert (res["batch_sizes"], res["num_failed"], res["oom_retries"]) == ([2, 1], 1, 2)
    assert (res["input_tokens"], res["output_tokens"]) == (40 + 12 + 7, 8 + 30 + 1)


def test_nothing_fits(bench_tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _oom_when(monkeypatch, lambda ids: True)
    wl = Workload("2x1", "fixed", None, [([1, 2], 1)] * 2, num_rows=2)
    res = run_hf_baseline(bench_tiny_llama, wl, torch.float32, CPU, max_batch=2, num_requests=None, seed=0,
                          use_tqdm=False)
    assert res["status"] == "error" and res["num_failed"] == 2 and "out of memory" in res["error"]
