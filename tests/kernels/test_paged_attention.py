from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nanoflow.kernels.paged_attention import (
    DecodeConfig,
    _decode_plan,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_block_q,
    prefill_tiles,
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


@pytest.mark.parametrize("cfg", [DecodeConfig(), SPLIT16], ids=["one", "split"])
def test_decode_num_seqs_on_device_leaves_other_rows(cfg: DecodeConfig, device: str, assert_rel) -> None:
    """A CUDA graph captured for 5 rows serving a batch of 3: rows 3 and 4 are not touched."""
    lens = [40, 1, 70, 17, 33]
    k_cache, v_cache, tables = _paged_cache(lens, 2, 64, torch.float32, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), 8, 64, device=device)
    out = torch.full_like(q, float("nan"))
    n = torch.tensor([3], device=device, dtype=torch.int32)
    paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, num_ctas=2, out=out, config=cfg, num_seqs=n)
    assert out[3:].isnan().all()
    assert_rel(out[:3], paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.125)[:3], torch.float32)


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
    "gqa3-d64-chunked": (6, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33], None, {"block_m": 32, "block_n": 16}),
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
    k_cache, v_cache, tables = _paged_cache(all_lens, Hkv, D, dtype, device)
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
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    ref = paged_prefill_attention_ref(q32[2:], k32, v32, tables[2:], qlens, lens, D**-0.5, window)
    assert_rel(out[2:], ref, dtype)


# --- fp8 (e4m3) KV cache: the kernels widen K/V to q's dtype on load. Triton's interpreter loads
# fp8 exactly (it only mis-rounds fp8 stores), so these run on the CPU too.

FP8 = torch.float8_e4m3fn


def _poison_unwritten(cache: torch.Tensor, tables: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """A copy of a cache with every slot no sequence wrote set to NaN (fp8: byte 0x7f), as leftover
    memory may be: no path may read it into a result."""
    written = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool, device=cache.device)
    for row, n in zip(tables.tolist(), lens, strict=True):
        for pos in range(n):
            written[row[pos // PAGE], pos % PAGE] = True
    out = cache.clone()
    if cache.dtype == FP8:
        out.view(torch.uint8).masked_fill_(~written[:, None, :, None], 0x7F)
    else:
        out.masked_fill_(~written[:, None, :, None], float("nan"))
    return out


def test_decode_ignores_unwritten_slots(device: str, dtype: torch.dtype, assert_rel) -> None:
    """Slots past seq_len and page 0 behind the table's padding are read by the reference's gather
    (and masked): NaN there must not reach the output, on either path."""
    lens = [1, 17, 40, 70]
    k_cache, v_cache, tables = _paged_cache(lens, 2, 64, dtype, device)
    kp, vp = _poison_unwritten(k_cache, tables, lens), _poison_unwritten(v_cache, tables, lens)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), 8, 64, device=device, dtype=dtype)
    q32, k32, v32 = _f32(q, k_cache, v_cache)
    ref = paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 0.125)
    assert torch.equal(paged_decode_attention_ref(q32, *_f32(kp, vp), tables, seq_lens, 0.125), ref)
    assert_rel(paged_decode_attention(q, kp, vp, tables, seq_lens, 0.125), ref, dtype)


@pytest.mark.parametrize("name", ["gqa4-d128-split-capped", "mha-d64-window-capped"])
def test_decode_fp8_cache(name: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, lens, window, cfg, num_ctas = DECODE_CASES[name]
    k_cache, v_cache, tables = _paged_cache(lens, Hkv, D, dtype, device)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    kp, vp = _poison_unwritten(k8, tables, lens), _poison_unwritten(v8, tables, lens)
    out = paged_decode_attention(q, kp, vp, tables, seq_lens, D**-0.5, window, num_ctas=num_ctas, config=cfg)
    assert out.dtype == dtype
    # the reference sees the same fp8-rounded K/V, widened: only the attention arithmetic differs
    q32, k32, v32 = _f32(q, k8, v8)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("name", ["gqa4-d128-chunked", "gqa4-d64-chunked-window"])
def test_prefill_fp8_cache(name: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, qlens, lens, window, blocks = PREFILL_CASES[name]
    k_cache, v_cache, tables = _paged_cache(lens, Hkv, D, dtype, device)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    q = torch.randn(sum(qlens), Hq, D, device=device, dtype=dtype)
    starts = torch.tensor([0, *itertools.accumulate(qlens)], device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    kp, vp = _poison_unwritten(k8, tables, lens), _poison_unwritten(v8, tables, lens)
    out = paged_prefill_attention(q, kp, vp, tables, starts, seq_lens, D**-0.5, window, max_query_len=max(qlens),
                                  **blocks)
    q32, k32, v32 = _f32(q, k8, v8)
    assert_rel(out, paged_prefill_attention_ref(q32, k32, v32, tables, qlens, lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_refs_fp8_cache_equal_widened_cache(qdtype: torch.dtype) -> None:
    """The eager path with an fp8 cache is attention over a q-dtype cache holding the same values
    (and ignores NaN bytes in slots not written yet)."""
    Hq, Hkv, D, qlens, lens = 8, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33]
    k_cache, v_cache, tables = _paged_cache(lens, Hkv, D, torch.float32, "cpu")
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    kw, vw = k8.to(qdtype), v8.to(qdtype)
    k8, v8 = _poison_unwritten(k8, tables, lens), _poison_unwritten(v8, tables, lens)
    q = torch.randn(sum(qlens), Hq, D, dtype=qdtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for window in (None, 7):
        got = paged_prefill_attention_ref(q, k8, v8, tables, qlens, lens, D**-0.5, window)
        assert got.dtype == qdtype
        assert torch.equal(got, paged_prefill_attention_ref(q, kw, vw, tables, qlens, lens, D**-0.5, window))
        qd = q[: len(lens)]
        got = paged_decode_attention_ref(qd, k8, v8, tables, seq_lens, D**-0.5, window)
        assert torch.equal(got, paged_decode_attention_ref(qd, kw, vw, tables, seq_lens, D**-0.5, window))


def test_fp8_cache_rejected_for_other_dtypes(device: str) -> None:
    k8 = torch.zeros(2, 2, PAGE, 32, device=device, dtype=FP8)
    q = torch.zeros(1, 2, 32, device=device).to(FP8)
    with pytest.raises(AssertionError, match="q must be"):
        paged_decode_attention(q, k8, k8, torch.zeros(1, 2, device=device, dtype=torch.int32),
                               torch.ones(1, device=device, dtype=torch.int32), 0.1)
    with pytest.raises(AssertionError, match="share a dtype"):
        paged_decode_attention(q.float(), k8, k8.float(), torch.zeros(1, 2, device=device, dtype=torch.int32),
                               torch.ones(1, device=device, dtype=torch.int32), 0.1)
    with pytest.raises(AssertionError, match="or float8_e4m3fn"):
        paged_prefill_attention(q.float(), k8.half(), k8.half(), torch.zeros(1, 2, device=device, dtype=torch.int32),
                                torch.tensor([0, 1], device=device, dtype=torch.int32),
                                torch.ones(1, device=device, dtype=torch.int32), 0.1)


def test_decode_config_defaults_follow_the_cache_dtype() -> None:
    """The measured best full-grid shapes (benchmarks/kernel_check.py on an H100) per cache dtype."""
    shape = lambda c: (c.block_n, c.num_warps, c.num_stages)  # noqa: E731
    assert shape(DecodeConfig().resolved(128, 2)) == (128, 4, 8)
    assert shape(DecodeConfig().resolved(128, 2, fp8_cache=True)) == (64, 4, 6)
    assert shape(DecodeConfig().resolved(128, 4)) == (64, 8, 4)  # fp32: the same 64 KiB per step
    assert shape(DecodeConfig(block_n=32, num_stages=8).resolved(128, 2, fp8_cache=True)) == (32, 4, 8)
