"""GPU only: kv_cache_dtype="fp8" on the fast path. Triton's interpreter loads fp8 exactly but
mis-rounds fp8 stores, so the CPU tests check rope_kv_write's fp8 store only where no rounding
happens; its rounding against the reference, the compiled kernels at real shapes, CUDA graphs and
the KV pool's size are checked here."""

import gc
import random

import pytest
import torch
from helpers import teacher_forced_agreement

from nanoflow import LLM, SamplingParams
from nanoflow.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from nanoflow.kernels.kv_cache import rope_kv_write, rope_kv_write_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FP8 = torch.float8_e4m3fn


def _cos_sin(max_pos: int, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    angles = torch.arange(max_pos, device="cuda").float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_rope_kv_write_fp8_rounding_matches_ref(dtype):
    """Both round the fp32 rotation once to fp8; only FMA contraction in the kernel can move a value
    across a rounding boundary, so a few elements may differ by one fp8 step."""
    T, Hq, Hkv, D, page, num_pages = 300, 32, 8, 128, 16, 32
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device="cuda", dtype=dtype) * 4
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    v[0, 0, :2] = torch.tensor([1000.0, -1000.0])
    positions = torch.randint(0, 4096, (T,), device="cuda")
    slots = torch.randperm(num_pages * page, device="cuda")[:T]
    cos_sin = _cos_sin(4096, D)
    k8 = torch.zeros(num_pages, Hkv, page, D, device="cuda", dtype=FP8)
    v8 = torch.zeros_like(k8)
    k_ref, v_ref = k8.clone(), v8.clone()
    q_ref = rope_kv_write_ref(q, k, v, positions, cos_sin, k_ref, v_ref, slots)
    q_out = rope_kv_write(q, k, v, positions, cos_sin, k8, v8, slots)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((q_out.float() - q_ref.float()).norm() / q_ref.float().norm()).item() < tol
    assert torch.equal(v8.float(), v_ref.float())  # v is only cast: the same single rounding
    assert v8.float().abs().max().item() == 448.0  # saturated, not NaN
    a, b = k8.float(), k_ref.float()
    diff = a != b
    assert diff.float().mean().item() < 1e-3, f"{int(diff.sum())} of {diff.numel()} fp8 keys differ"
    assert ((a - b).abs() <= torch.maximum(b.abs() / 8, torch.full_like(b, 2.0**-9)))[diff].all()


def test_decode_fp8_cache_real_shapes():
    lens = [1, 15, 16, 17, 1000, 4097, 333, 2048]
    max_pages = max(-(-n // 16) for n in lens)
    num_pages = len(lens) * max_pages
    k8 = torch.randn(num_pages, 8, 16, 128, device="cuda").to(FP8)
    v8 = torch.randn_like(k8, dtype=torch.float32).to(FP8)
    tables = torch.randperm(num_pages, device="cuda").view(len(lens), max_pages).to(torch.int32)
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, k8, v8, tables, seq_lens, 128**-0.5)
    ref = paged_decode_attention_ref(q.float(), k8.float(), v8.float(), tables, seq_lens, 128**-0.5)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 300))] for _ in range(n)]


def test_fp8_fast_path_matches_eager(tiny_model):
    """fp32 model, fp8 cache: greedy tokens of the fast path (Triton kernels, decode CUDA graphs) are
    the eager reference's top-1 when it is fed them. Both store the same fp8 values (up to rare FMA
    boundary flips) and attend with IEEE fp32 dots."""
    path = tiny_model("llama")
    prompts = _prompts(16, 380)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=256, num_kv_pages=2048,
              kv_cache_dtype="fp8")
    fast = LLM(path, **kw)
    runner = fast.engine.runner
    assert runner.kv_cache.dtype == FP8 and runner.graphs is not None and runner.graphs.graphs
    outs = fast.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert fast.engine.num_free_pages == fast.engine.num_pages
    del fast, runner
    eager = LLM(path, enforce_eager=True, **kw)
    got = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == 24 for t in got)
    assert teacher_forced_agreement(eager, prompts, got) >= 0.95


def test_fp8_pool_doubles_under_gpu_memory_utilization(tiny_model):
    path = tiny_model("llama")
    pages = {}
    # what earlier tests left in the caching allocator would shrink the first engine's budget only
    gc.collect()
    torch.cuda.empty_cache()
    for kv in ("auto", "fp8"):
        # eager: no CUDA-graph pool that could outlive the first engine and shrink the second's budget
        llm = LLM(path, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5, kv_cache_dtype=kv,
                  enforce_eager=True)
        runner = llm.engine.runner
        pages[kv] = (runner.num_pages, runner.page_bytes, runner.kv_cache.dtype)
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    assert pages["auto"][2] == torch.bfloat16 and pages["fp8"][2] == FP8
    assert pages["auto"][1] == 2 * pages["fp8"][1]
    ratio = pages["fp8"][0] / pages["auto"][0]
    assert 1.9 <= ratio <= 2.1, f"fp8 pool has {ratio:.3f}x the pages of the bf16 one"
