from __future__ import annotations

import itertools

import pytest
import torch

from nanoflow.kernels.paged_attention import (
    DecodeConfig,
    _decode_plan,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

PAGE = 16
CUDA = torch.cuda.is_available()


def _paged_cache(
    lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches and shuffled page tables; table entries past a sequence's pages are 0."""
    max_pages = max(-(-n // PAGE) for n in lens) + 1  # one spare column, like a real max_pages
    num_pages = len(lens) * max_pages + 1
    shape = (num_pages, num_kv_heads, PAGE, head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    tables = torch.randperm(num_pages, device=device)[: len(lens) * max_pages].view(len(lens), max_pages)
    used = torch.arange(max_pages, device=device)[None, :] < torch.tensor(lens, device=device)[:, None].add(
        PAGE - 1
    ).div(PAGE, rounding_mode="floor")
    return k_cache, v_cache, torch.where(used, tables, 0).to(torch.int32)


def _f32(*ts: torch.Tensor) -> list[torch.Tensor]:
    # references for bf16 run in fp32: compare against the exact answer, not a rounded one
    return [t.float() for t in ts]


SPLIT16 = DecodeConfig(block_n=16, partition_size=32)  # 3 partitions of 2 steps for 70 tokens
SPLIT32 = DecodeConfig(block_n=32, partition_size=32)
DECODE_CASES = {
    # name: (Hq, Hkv, D, context lengths, sliding window, config, num_ctas < work items)
    "mha-d64": (4, 4, 64, [1, 17, 40, 70], None, DecodeConfig(), None),
    "gqa4-d128-split-capped": (8, 2, 128, [1, 17, 40, 70], None, SPLIT16, 3),
    "gqa4-d64-window-split": (8, 2, 64, [1, 17, 40, 70], 20, SPLIT32, 5),
    "mha-d64-window-capped": (4, 4, 64, [1, 33, 9, 70], 7, DecodeConfig(block_n=32), 2),
}


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode(case: tuple, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, lens, window, cfg, num_ctas = case
    k_cache, v_cache, tables = _paged_cache(lens, Hkv, D, dtype, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(
        q, k_cache, v_cache, tables, seq_lens, D**-0.5, window, num_ctas=num_ctas, out=out, config=cfg
    )
    assert res is out
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("cfg", [DecodeConfig(), SPLIT16], ids=["one", "split"])
def test_decode_empty_sequence_gives_zeros(cfg: DecodeConfig, device: str) -> None:
    lens = [0, 20]  # seq_len 0: a padded CUDA-graph slot
    k_cache, v_cache, tables = _paged_cache(lens, 2, 32, torch.float32, device)
    q = torch.randn(2, 4, 32, device=device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.2, num_ctas=2, config=cfg)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.2)
    assert torch.allclose(out[1], ref[1], rtol=1e-4, atol=1e-5)


def test_decode_plan_splits_long_contexts_only() -> None:
    cfg = DecodeConfig(block_n=64)
    part, parts = _decode_plan(batch=2, num_kv_heads=8, max_context=32768, grid_cap=264, cfg=cfg)
    assert parts > 1 and part * parts >= 32768 and part % cfg.block_n == 0
    assert _decode_plan(batch=256, num_kv_heads=8, max_context=1024, grid_cap=264, cfg=cfg)[1] == 1
    assert _decode_plan(batch=4, num_kv_heads=8, max_context=16, grid_cap=264, cfg=cfg) == (64, 1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_ctas", [None, 16, 32, 66])
def test_decode_real_shapes(num_ctas: int | None, assert_rel) -> None:
    lens = [1, 15, 16, 17, 1000, 4097, 333, 2048]
    k_cache, v_cache, tables = _paged_cache(lens, 8, 128, torch.bfloat16, "cuda")
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 128**-0.5, num_ctas=num_ctas)
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 128**-0.5), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_capture(assert_rel) -> None:
    lens = [5, 300, 64, 1]
    k_cache, v_cache, tables = _paged_cache(lens, 2, 128, torch.bfloat16, "cuda")
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    cfg = DecodeConfig(partition_size=64)  # exercise the reduce kernel inside the graph too
    run = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1, num_ctas=16, config=cfg)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    q.copy_(torch.randn_like(q))
    seq_lens.copy_(torch.tensor([300, 5, 1, 64], device="cuda", dtype=torch.int32))
    graph.replay()
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 0.1), torch.bfloat16)


PREFILL_CASES = {
    # name: (Hq, Hkv, D, query lengths, context lengths, sliding window, kernel block sizes)
    "mha-d64-full": (4, 4, 64, [17, 40], [17, 40], None, {}),
    "gqa4-d128-chunked": (8, 2, 128, [5, 20, 1, 33], [5, 40, 17, 33], None, {"block_m": 16, "block_n": 16}),
    "gqa4-d64-chunked-window": (8, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33], 7, {"block_m": 16, "block_n": 32}),
}


@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
@pytest.mark.parametrize("pass_max_len", [True, False], ids=["max_len", "no_max_len"])
def test_prefill(case: tuple, pass_max_len: bool, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, qlens, lens, window, blocks = case
    k_cache, v_cache, tables = _paged_cache(lens, Hkv, D, dtype, device)
    q = torch.randn(sum(qlens), Hq, D, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(qlens)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, k_cache, v_cache, tables, starts, seq_lens, D**-0.5, window,
        max_query_len=max(qlens) if pass_max_len else None, out=out, **blocks,
    )  # fmt: skip
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    ref = paged_prefill_attention_ref(q32, k32, v32, tables, qlens, lens, D**-0.5, window)
    assert_rel(out, ref, dtype)
