"""kv_cache_dtype="fp8": K and V stored as float8_e4m3fn (scale 1) on the CPU's eager path; the
model and its activations keep their dtype."""

import random

import pytest
import torch
from helpers import VOCAB_SIZE, teacher_forced_agreement

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor import model_runner
from nanoflow.kernels import kv_cache

FP8 = torch.float8_e4m3fn
MAX_TOKENS = 24
# as in test_equivalence: chunked prefill, and a pool small enough to force preemption
ENGINE_SETTINGS = {
    "plain": dict(max_num_batched_tokens=512),
    "chunked": dict(max_num_batched_tokens=16),
    "preempt": dict(max_num_batched_tokens=64, num_kv_pages=5, admission_output_tokens=1),
}


def _prompts(seed: int, n: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(3, 41))] for _ in range(n)]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


def test_fp8_engine_equals_fp32_cache_of_fp8_rounded_values(tiny_model, monkeypatch):
    """Chunked prefill and preemption (recompute re-stores K/V) give the same tokens as one plain run,
    and those equal an fp32-cache engine whose stores round through fp8: the fp8 cache changes the
    stored values and nothing else."""
    path, prompts = tiny_model("llama"), _prompts(0)
    runs = {}
    for name, settings in ENGINE_SETTINGS.items():
        llm = LLM(path, max_model_len=256, kv_cache_dtype="fp8", **settings)
        assert llm.engine.runner.kv_cache.dtype == FP8
        runs[name] = _greedy(llm, prompts)
        assert all(len(t) == MAX_TOKENS for t in runs[name])
        assert llm.engine.num_free_pages == llm.engine.num_pages, "pages leaked"
        if name == "chunked":
            assert max(len(p) for p in prompts) > 16
        if name == "preempt":
            assert llm.engine.scheduler.num_preemptions > 0, "the small pool should force preemption"
    assert runs["chunked"] == runs["plain"] and runs["preempt"] == runs["plain"]

    def round_through_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.clamp(-kv_cache.FP8_E4M3_MAX, kv_cache.FP8_E4M3_MAX).to(FP8).to(dtype)

    monkeypatch.setattr(kv_cache, "to_cache_dtype", round_through_fp8)
    llm = LLM(path, max_model_len=256)
    assert llm.engine.runner.kv_cache.dtype == torch.float32
    assert _greedy(llm, prompts) == runs["plain"]


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"), ("llama", "bfloat16")])
def test_fp8_engine_agrees_with_full_precision_cache(tiny_model, arch, dtype):
    """Teacher-forced next tokens of the fp8-cache engine vs the model-dtype-cache engine's greedy
    outputs. Measured on the random tiny dense models over several prompt sets: 91-98% (mixtral,
    whose expert routing flips amplify the noise, 85-93%, so it is left out). Free-running outputs
    agree on only 27-81% of positions, as one flipped token changes all later ones, and the first
    token differs for 0-2 of 8 prompts: too fragile to assert."""
    path, prompts = tiny_model(arch), _prompts(1)
    expected = _greedy(LLM(path, dtype=dtype, max_model_len=256), prompts)
    llm = LLM(path, dtype=dtype, max_model_len=256, kv_cache_dtype="fp8")
    assert teacher_forced_agreement(llm, prompts, expected) >= 0.8
    assert llm.engine.num_free_pages == llm.engine.num_pages


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 2), ("float32", 4)])
def test_fp8_pool_holds_more_pages_in_the_same_bytes(tiny_model, monkeypatch, dtype, ratio):
    monkeypatch.setattr(model_runner, "_CPU_KV_BYTES", 1 << 20)  # the CPU's default pool, made small
    path = tiny_model("llama")
    auto = LLM(path, dtype=dtype, max_model_len=256).engine.runner
    fp8 = LLM(path, dtype=dtype, max_model_len=256, kv_cache_dtype="fp8").engine.runner
    assert fp8.kv_cache.dtype == FP8 and auto.kv_cache.dtype == getattr(torch, dtype)
    assert fp8.page_bytes * ratio == auto.page_bytes
    assert fp8.num_pages == ratio * auto.num_pages
    assert fp8.kv_cache.nbytes == auto.kv_cache.nbytes == 1 << 20


def test_kv_cache_dtype_validation(tiny_model):
    def config(**kw) -> EngineConfig:
        return EngineConfig.from_args(EngineArgs(tiny_model("llama"), **kw))

    assert config(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == FP8
    assert config(dtype="bf16").kv_cache_dtype == torch.bfloat16
    for bad in ("int8", "fp8_e5m2", "bfloat16", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', fp8"):
            config(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny_model("llama"), kv_cache_dtype="fp16")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_kv_pool_fill(device, dtype):
    """The pool's unwritten slots: zeros on the CPU; on a GPU seeded normal values (as served K/V
    are, for the power they cost), alike for one seed, finite in fp8 too, every chunk filled."""
    def filled(seed: int) -> torch.Tensor:
        pool = torch.full((2, 2, 4100, 2, 16, 8), float("nan"), device=device).to(dtype)
        model_runner.fill_kv_pool(pool, seed)
        return pool.float()

    a, b = filled(0), filled(0)
    assert torch.isfinite(a).all()
    if device == "cpu":
        assert not a.any()
        return
    assert torch.equal(a, b) and not torch.equal(a, filled(1))
    assert 0.9 < a.std().item() < 1.1
    assert (a.flatten(0, 2) != 0).any(dim=(1, 2, 3)).all()  # no page left as it was
