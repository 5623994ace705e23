from __future__ import annotations

import pytest
import torch

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.bench.hf_baseline import estimate_batch, hf_shape, run_hf_baseline
from nanoflow.bench.workloads import Workload, build_workload
from nanoflow.models.arch import ModelArch
from nanoflow.models.loader import load_hf_config


def test_batch_estimate_for_llama3_8b_on_an_h100() -> None:
    """~63 GB free after the 16 GB of weights: gpu-facts.md ran batch 384 at 512/512 (64 GiB peak),
    so the estimate must land in the low hundreds and stay below that."""
    arch = ModelArch.from_hf(load_hf_config(dummy_model_dir("llama3-8b")))
    b = estimate_batch(arch, 63 * 2**30, 512, 512, 2)
    assert 200 <= b <= 384
    assert estimate_batch(arch, 63 * 2**30, 1155, 211, 2) < b
    assert estimate_batch(arch, 1 << 20, 512, 512, 2) == 1


def test_trace_shape_is_the_mean() -> None:
    wl = Workload("trace-x", "trace", "x.csv", [([1] * 10, 4), ([1] * 21, 7)], num_rows=2)
    assert hf_shape(wl) == (16, 6)


def test_shrinks_the_batch_on_out_of_memory(bench_tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.generation.utils import GenerationMixin

    real = GenerationMixin.generate
    batches = []

    def generate(self, input_ids=None, **kwargs):
        batches.append(input_ids.shape[0])
        if input_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated")
        return real(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    wl = build_workload("12x5", 8, vocab_size=512, max_model_len=256)
    res = run_hf_baseline(bench_tiny_llama, wl, torch.float32, torch.device("cpu"), max_batch=8,
                          num_requests=None, seed=0, use_tqdm=False)
    assert batches == [2, 8, 6, 4]  # warm-up, then 8 -> 6 -> 4
    assert (res["batch_size"], res["num_batches"], res["oom_retries"]) == (4, 1, 2)
    assert (res["input_tokens"], res["output_tokens"], res["output_len_mismatches"]) == (4 * 12, 4 * 5, 0)
