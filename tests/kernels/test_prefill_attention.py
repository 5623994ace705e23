"""Prefill attention and its tile planner: the Triton kernel against its PyTorch reference
(nanoflow/kernels/prefill_attention.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from paged_cache import FP8, PAGE, f32, fp8_and_widened, out_rows, paged_cache, poison_unwritten, qkv_views

from nanoflow.kernels.prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_block_q,
    prefill_tiles,
)

PREFILL_CASES = {
    # name: (Hq, Hkv, D, query lengths, context lengths, sliding window, kernel block sizes)
    "mha-d64-full": (4, 4, 64, [17, 40], [17, 40], None, {}),
    "gqa4-d128-chunked": (8, 2, 128, [5, 20, 1, 33], [5, 40, 17, 33], None, {"block_m": 16, "block_n": 16}),
    "gqa4-d64-chunked-window": (8, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33], 7, {"block_m": 16, "block_n": 32}),
    "gqa3-d64-chunked": (6, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33], None, {"block_m": 32, "block_n": 16}),
    # a window wide enough for key tiles that every query sees whole (run unmasked) between the
    # window's start and the causal edge, both masked
    "gqa4-d64-long-window": (8, 2, 64, [20, 3], [100, 70], 40, {"block_m": 16, "block_n": 16}),
}


@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
@pytest.mark.parametrize("pass_max_len", [True, False], ids=["max_len", "no_max_len"])
def test_prefill(case: tuple, pass_max_len: bool, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, qlens, lens, window, blocks = case
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    q = torch.randn(sum(qlens), Hq, D, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(qlens)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, k_cache, v_cache, tables, starts, seq_lens, D**-0.5, window,
        max_query_len=max(qlens) if pass_max_len else None, out=out, **blocks,
    )  # fmt: skip
    q32, k32, v32 = f32(q, k_cache, v_cache)
    ref = paged_prefill_attention_ref(q32, k32, v32, tables, qlens, lens, D**-0.5, window)
    assert_rel(out, ref, dtype)


def test_prefill_tiles_cover_every_block_once_longest_first() -> None:
    qlens, lens = np.array([1, 130, 64, 5]), np.array([10, 200, 64, 5])
    tiles = prefill_tiles(qlens, lens, first_seq=3, block_q=64)
    assert tiles.dtype == np.int32 and tiles.shape == (1 + 3 + 1 + 1, 2)
    assert sorted(map(tuple, tiles.tolist())) == [(3, 0), (4, 0), (4, 1), (4, 2), (5, 0), (6, 0)]
    keys = [lens[b - 3] - qlens[b - 3] + min((m + 1) * 64, qlens[b - 3]) for b, m in tiles.tolist()]
    assert keys == sorted(keys, reverse=True) and tuple(tiles[0]) == (4, 2)
    assert prefill_tiles(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 0, 16).shape == (0, 2)
    assert [prefill_block_q(g) for g in (1, 4, 7, 8)] == [64, 16, 8, 8]


@pytest.mark.parametrize("name", ["gqa4-d128-chunked", "gqa4-d64-chunked-window", "gqa3-d64-chunked"])
def test_prefill_mixed_batch_with_tiles(name: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    """The engine's layout: decode rows first, then the prefill chunks, one q for all; the prefill
    kernel runs the host-built tiles (plus idle ones, a graph's spare capacity) and writes only the
    prefill rows."""
    Hq, Hkv, D, qlens, lens, window, blocks = PREFILL_CASES[name]
    dec_lens = [9, 33]
    all_q, all_lens = [1, 1, *qlens], [*dec_lens, *lens]
    k_cache, v_cache, tables = paged_cache(all_lens, Hkv, D, dtype, device)
    q = torch.randn(sum(all_q), Hq, D, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(all_q)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(all_lens, device=device, dtype=torch.int32)
    bq = prefill_block_q(Hq // Hkv, blocks.get("block_m", 64))
    tiles = np.concatenate([prefill_tiles(np.array(qlens), np.array(lens), first_seq=2, block_q=bq),
                            np.full((3, 2), -1, dtype=np.int32)])
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, tables, starts, seq_lens, D**-0.5, window, out=out,
                            tiles=torch.from_numpy(tiles).to(device), **blocks)
    assert out[:2].isnan().all()
    q32, k32, v32 = f32(q, k_cache, v_cache)
    ref = paged_prefill_attention_ref(q32[2:], k32, v32, tables[2:], qlens, lens, D**-0.5, window)
    assert_rel(out[2:], ref, dtype)


# --- fp8 (e4m3) KV cache: the kernel widens K/V to q's dtype on load. Triton's interpreter loads
# fp8 exactly (it only mis-rounds fp8 stores), so these run on the CPU too.


@pytest.mark.parametrize("name", ["gqa4-d128-chunked", "gqa4-d64-chunked-window"])
def test_prefill_fp8_cache(name: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, qlens, lens, window, blocks = PREFILL_CASES[name]
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    q = torch.randn(sum(qlens), Hq, D, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(qlens)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    kp, vp = poison_unwritten(k8, tables, lens), poison_unwritten(v8, tables, lens)
    out = paged_prefill_attention(q, kp, vp, tables, starts, seq_lens, D**-0.5, window, max_query_len=max(qlens),
                                  **blocks)
    q32, k32, v32 = f32(q, k8, v8)
    assert_rel(out, paged_prefill_attention_ref(q32, k32, v32, tables, qlens, lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_ref_fp8_cache_equals_widened_cache(qdtype: torch.dtype) -> None:
    """The eager path with an fp8 cache is attention over a q-dtype cache holding the same values
    (and ignores NaN bytes in slots not written yet)."""
    Hq, Hkv, D, qlens, lens = 8, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33]
    k8, v8, kw, vw, tables = fp8_and_widened(lens, Hkv, D, qdtype)
    q = torch.randn(sum(qlens), Hq, D, dtype=qdtype)
    for window in (None, 7):
        got = paged_prefill_attention_ref(q, k8, v8, tables, qlens, lens, D**-0.5, window)
        assert got.dtype == qdtype
        assert torch.equal(got, paged_prefill_attention_ref(q, kw, vw, tables, qlens, lens, D**-0.5, window))


def test_fp8_cache_rejected_for_other_dtypes(device: str) -> None:
    k8 = torch.zeros(2, 2, PAGE, 32, device=device, dtype=FP8)
    q = torch.zeros(1, 2, 32, device=device).to(FP8)
    with pytest.raises(AssertionError, match="or float8_e4m3fn"):
        paged_prefill_attention(q.float(), k8.half(), k8.half(), torch.zeros(1, 2, device=device, dtype=torch.int32),
                                torch.tensor([0, 1], device=device, dtype=torch.int32),
                                torch.ones(1, device=device, dtype=torch.int32), 0.1)


# --- the nano-batch layout: q read from a fused qkv buffer, out written into rows of a bigger buffer


@pytest.mark.parametrize("name", ["mha-d64-full", "gqa4-d64-chunked-window"])
def test_prefill_q_from_qkv_buffer_out_into_rows(name: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    """q: the q part of a [T, (Hq + 2 * Hkv) * D] qkv buffer (row stride (Hq + 2 * Hkv) * D); out: rows
    3..3+T of a [T + 5, Hq * D] buffer. Both paths write exactly those rows."""
    Hq, Hkv, D, qlens, lens, window, blocks = PREFILL_CASES[name]
    T = sum(qlens)
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    _, q, _, _ = qkv_views(T, Hq, Hkv, D, dtype, device)
    assert q.stride(0) == (Hq + 2 * Hkv) * D
    starts = torch.tensor([0, *itertools.accumulate(qlens)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    buf, out = out_rows(T, Hq, D, 3, 2, dtype, device)
    res = paged_prefill_attention(
        q, k_cache, v_cache, tables, starts, seq_lens, D**-0.5, window, max_query_len=max(qlens), out=out, **blocks
    )
    assert res is out
    assert buf[:3].isnan().all() and buf[3 + T :].isnan().all()
    q32, k32, v32 = f32(q.contiguous(), k_cache, v_cache)
    assert_rel(out, paged_prefill_attention_ref(q32, k32, v32, tables, qlens, lens, D**-0.5, window), dtype)

    ref_buf, ref_out = out_rows(T, Hq, D, 3, 2, dtype, device)
    got = paged_prefill_attention_ref(q, k_cache, v_cache, tables, qlens, lens, D**-0.5, window, out=ref_out)
    assert got is ref_out
    assert ref_buf[:3].isnan().all() and ref_buf[3 + T :].isnan().all()
    want = paged_prefill_attention_ref(q.contiguous(), k_cache, v_cache, tables, qlens, lens, D**-0.5, window)
    torch.testing.assert_close(ref_out, want)
