"""Decode attention: the Triton kernel against its PyTorch reference (nanoflow/kernels/decode_attention.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paged_cache import FP8, PAGE, f32, fp8_and_widened, out_rows, paged_cache, poison_unwritten, qkv_views

from nanoflow.kernels import decode_attention
from nanoflow.kernels.attention_common import i32_offsets
from nanoflow.kernels.decode_attention import (
    CAPPED,
    GATED_EVEN,
    DecodeConfig,
    gate_census,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from nanoflow.kernels.decode_common import FP8_MANY, decode_plan, default_config

CUDA = torch.cuda.is_available()

# The correctness cases run on each decode kernel: the default per-(seq, kv head) kernel and the
# all-heads kernel (DecodeConfig(all_heads=True)) with its batched 3-D dot and its 2-D dot.
KERNELS = {
    "per_head": {},
    "all_heads": {"all_heads": True},
    "all_heads_2d": {"all_heads": True, "batched_dot": False},
    # capped cases: work items from an atomic counter (on a GPU also the SM gate)
    "all_heads_gated": {"all_heads": True, "sm_gate": True},
    # the 2-D dot behind the gate, three programs an SM (its registers allow it: benchmarks/decode_sass.py)
    "all_heads_gated_2d": {"all_heads": True, "sm_gate": True, "batched_dot": False, "gate_ctas_per_sm": 3},
    # the engine's capped-grid kernel, as the pipeline launches it
    "capped": {k: v for k, v in dataclasses.asdict(CAPPED).items() if v != getattr(DecodeConfig(), k)},
}


@pytest.fixture(params=list(KERNELS))
def kernel(request: pytest.FixtureRequest) -> str:
    return request.param


def on(kernel: str, cfg: DecodeConfig | None = None) -> DecodeConfig:
    """cfg (default DecodeConfig()) for the named kernel."""
    return dataclasses.replace(cfg or DecodeConfig(), **KERNELS[kernel])


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
def test_decode(case: tuple, kernel: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, lens, window, cfg, num_ctas = case
    cfg = on(kernel, cfg)
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(
        q, k_cache, v_cache, tables, seq_lens, D**-0.5, window, num_ctas=num_ctas, out=out, config=cfg
    )
    assert res is out
    q32, k32, v32 = f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("cfg", [DecodeConfig(), SPLIT16], ids=["one", "split"])
def test_decode_empty_sequence_gives_zeros(cfg: DecodeConfig, kernel: str, device: str) -> None:
    lens = [0, 20]  # seq_len 0: a padded CUDA-graph slot
    cfg = on(kernel, cfg)
    k_cache, v_cache, tables = paged_cache(lens, 2, 32, torch.float32, device)
    q = torch.randn(2, 4, 32, device=device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.2, num_ctas=2, config=cfg)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.2)
    assert torch.allclose(out[1], ref[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [DecodeConfig(), SPLIT16], ids=["one", "split"])
def test_decode_num_seqs_on_device_leaves_other_rows(cfg: DecodeConfig, kernel: str, device: str, assert_rel) -> None:
    """A CUDA graph captured for 5 rows serving a batch of 3: rows 3 and 4 are not touched."""
    cfg = on(kernel, cfg)
    lens = [40, 1, 70, 17, 33]
    k_cache, v_cache, tables = paged_cache(lens, 2, 64, torch.float32, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), 8, 64, device=device)
    out = torch.full_like(q, float("nan"))
    n = torch.tensor([3], device=device, dtype=torch.int32)
    paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, num_ctas=2, out=out, config=cfg, num_seqs=n)
    assert out[3:].isnan().all()
    assert_rel(out[:3], paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.125)[:3], torch.float32)


def test_decode_plan_splits_long_contexts_only() -> None:
    cfg = DecodeConfig(block_n=64)
    part, parts = decode_plan(batch=2, num_kv_heads=8, max_context=32768, grid_cap=264, cfg=cfg)
    assert parts > 1 and part * parts >= 32768 and part % cfg.block_n == 0
    assert decode_plan(batch=256, num_kv_heads=8, max_context=1024, grid_cap=264, cfg=cfg)[1] == 1
    assert decode_plan(batch=4, num_kv_heads=8, max_context=16, grid_cap=264, cfg=cfg) == (64, 1)
    # a kernel with a work counter balances itself: 256 items for 132 programs need no split
    assert decode_plan(batch=256, num_kv_heads=1, max_context=1024, grid_cap=132, cfg=cfg)[1] == 2
    assert decode_plan(batch=256, num_kv_heads=1, max_context=1024, grid_cap=132, cfg=cfg, items_per_cta=1)[1] == 1


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_ctas", [None, 16, 32, 44, 66])
def test_decode_real_shapes(num_ctas: int | None, kernel: str, assert_rel) -> None:
    lens = [1, 15, 16, 17, 1000, 4097, 333, 2048]
    k_cache, v_cache, tables = paged_cache(lens, 8, 128, torch.bfloat16, "cuda")
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 128**-0.5, num_ctas=num_ctas, config=on(kernel))
    q32, k32, v32 = f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 128**-0.5), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", [CAPPED, GATED_EVEN], ids=["counter", "gated_even"])
def test_two_capped_decodes_at_once_both_do_their_work(cfg: DecodeConfig, assert_rel) -> None:
    """Ping-pong's two nano-batches launch their capped decode attention a few us apart on two
    streams, each on half the SMs. The gated kernel once left the second launch's work undone (every
    SM on its stride held by the first, all its programs left): both outputs must match the reference."""
    from nanoflow.kernels.attention_common import num_sms

    half = num_sms(0) // 2
    runs = []
    for n in (448, 192):
        lens = [1000 + 7 * i for i in range(n)]
        k_cache, v_cache, tables = paged_cache(lens, 8, 128, torch.bfloat16, "cuda")
        seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
        q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
        runs.append((q, k_cache, v_cache, tables, seq_lens, torch.full_like(q, float("nan"))))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(5):  # the race is timing-dependent: several tries, each output checked
        torch.cuda.synchronize()
        for (q, kc, vc, tables, seq_lens, out), stream in zip(runs, streams, strict=True):
            out.fill_(float("nan"))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                paged_decode_attention(q, kc, vc, tables, seq_lens, 128**-0.5, num_ctas=half, out=out, config=cfg)
        torch.cuda.synchronize()
        for q, kc, vc, tables, seq_lens, out in runs:
            q32, k32, v32 = f32(q, kc, vc)
            assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 128**-0.5), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_capture(kernel: str, assert_rel) -> None:
    lens = [5, 300, 64, 1]
    k_cache, v_cache, tables = paged_cache(lens, 2, 128, torch.bfloat16, "cuda")
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    cfg = on(kernel, DecodeConfig(partition_size=64))  # exercise the reduce kernel inside the graph too
    run = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1, num_ctas=16, config=cfg)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    q.copy_(torch.randn_like(q))
    seq_lens.copy_(torch.tensor([300, 5, 1, 64], device="cuda", dtype=torch.int32))
    graph.replay()
    q32, k32, v32 = f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 0.1), torch.bfloat16)


# --- fp8 (e4m3) KV cache: the kernels widen K/V to q's dtype on load. Triton's interpreter loads
# fp8 exactly (it only mis-rounds fp8 stores), so these run on the CPU too.


def test_decode_ignores_unwritten_slots(kernel: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    """Slots past seq_len and page 0 behind the table's padding are read by the reference's gather
    (and masked): NaN there must not reach the output, on either path."""
    lens = [1, 17, 40, 70]
    k_cache, v_cache, tables = paged_cache(lens, 2, 64, dtype, device)
    kp, vp = poison_unwritten(k_cache, tables, lens), poison_unwritten(v_cache, tables, lens)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), 8, 64, device=device, dtype=dtype)
    q32, k32, v32 = f32(q, k_cache, v_cache)
    ref = paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, 0.125)
    assert torch.equal(paged_decode_attention_ref(q32, *f32(kp, vp), tables, seq_lens, 0.125), ref)
    assert_rel(paged_decode_attention(q, kp, vp, tables, seq_lens, 0.125, config=on(kernel)), ref, dtype)


@pytest.mark.parametrize("name", ["gqa4-d128-split-capped", "mha-d64-window-capped"])
def test_decode_fp8_cache(name: str, kernel: str, device: str, dtype: torch.dtype, assert_rel) -> None:
    Hq, Hkv, D, lens, window, cfg, num_ctas = DECODE_CASES[name]
    cfg = on(kernel, cfg)
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    kp, vp = poison_unwritten(k8, tables, lens), poison_unwritten(v8, tables, lens)
    out = paged_decode_attention(q, kp, vp, tables, seq_lens, D**-0.5, window, num_ctas=num_ctas, config=cfg)
    assert out.dtype == dtype
    # the reference sees the same fp8-rounded K/V, widened: only the attention arithmetic differs
    q32, k32, v32 = f32(q, k8, v8)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_ref_fp8_cache_equals_widened_cache(qdtype: torch.dtype) -> None:
    """The eager path with an fp8 cache is attention over a q-dtype cache holding the same values
    (and ignores NaN bytes in slots not written yet)."""
    Hq, Hkv, D, qlens, lens = 8, 2, 64, [5, 20, 1, 33], [5, 40, 17, 33]
    k8, v8, kw, vw, tables = fp8_and_widened(lens, Hkv, D, qdtype)
    q = torch.randn(sum(qlens), Hq, D, dtype=qdtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for window in (None, 7):
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


def test_decode_config_defaults_follow_the_cache_dtype() -> None:
    """The measured best full-grid shapes (benchmarks/kernel_check.py on an H100) per cache dtype."""
    shape = lambda c: (c.block_n, c.num_warps, c.num_stages)  # noqa: E731
    assert shape(DecodeConfig().resolved(128, 2)) == (128, 4, 8)
    assert shape(DecodeConfig().resolved(128, 2, fp8_cache=True)) == (64, 4, 6)
    assert shape(DecodeConfig().resolved(128, 4)) == (64, 8, 4)  # fp32: the same 64 KiB per step
    assert shape(DecodeConfig(block_n=32, num_stages=8).resolved(128, 2, fp8_cache=True)) == (32, 4, 8)


# --- the all-heads kernel: its own head blocking and defaults


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "2d"])
@pytest.mark.parametrize(
    "Hq,Hkv,heads,window,cfg",
    [
        (6, 3, 2, None, DecodeConfig()),  # a ragged last head block: kv head 3 of 4 is padding
        (4, 4, 2, 7, SPLIT16),  # MHA (one query head per kv head), window, split
        (16, 4, 1, None, SPLIT32),  # one kv head per item: the per-head work split, all-heads code
    ],
    ids=["ragged", "mha-window-split", "one-head"],
)
def test_decode_all_heads_head_blocks(
    Hq: int, Hkv: int, heads: int, window: int | None, cfg: DecodeConfig, batched: bool,
    device: str, dtype: torch.dtype, assert_rel,
) -> None:  # fmt: skip
    lens, D = [1, 17, 40, 70], 32
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    cfg = dataclasses.replace(cfg, all_heads=True, kv_heads_per_item=heads, batched_dot=batched)
    paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, D**-0.5, window, num_ctas=3, out=out, config=cfg)
    q32, k32, v32 = f32(q, k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)


def test_decode_all_heads_config_defaults() -> None:
    """All-heads steps of 64 KiB of K + V (one page of Llama-3-8B's 8 kv heads in bf16, two in fp8)
    with 3 of them in flight; the per-head kernel stays the default."""
    assert not DecodeConfig().all_heads
    shape = lambda c: (c.block_n, c.kv_heads_per_item, c.num_warps, c.num_stages)  # noqa: E731
    ah = DecodeConfig(all_heads=True)
    assert shape(ah.resolved(128, 2, num_kv_heads=8)) == (16, 8, 8, 7)
    assert shape(ah.resolved(128, 2, fp8_cache=True, num_kv_heads=8)) == (32, 8, 8, 7)
    assert shape(ah.resolved(128, 2, num_kv_heads=32)) == (16, 8, 8, 7)  # MHA: 8 heads per item
    assert shape(ah.resolved(128, 2, num_kv_heads=2)) == (16, 2, 4, 9)  # 16 KiB steps: 4 in flight
    four = DecodeConfig(all_heads=True, kv_heads_per_item=4, num_stages=5)
    assert shape(four.resolved(128, 2, num_kv_heads=8)) == (16, 4, 4, 5)
    # the per-head defaults do not depend on the kv heads
    assert DecodeConfig().resolved(128, 2, num_kv_heads=8) == DecodeConfig().resolved(128, 2)


# --- the nano-batch layout: q read from a fused qkv buffer, out written into rows of a bigger buffer


@pytest.mark.parametrize("name", ["mha-d64", "gqa4-d64-window-split"])
def test_decode_q_from_qkv_buffer_out_into_rows(
    name: str, kernel: str, device: str, dtype: torch.dtype, assert_rel
) -> None:
    """q: the q part of a [B, (Hq + 2 * Hkv) * D] qkv buffer (row stride (Hq + 2 * Hkv) * D); out: rows
    2..2+B of a [B + 5, Hq * D] buffer. Both paths write exactly those rows (the split case through the
    reduce kernel's strides too)."""
    Hq, Hkv, D, lens, window, cfg, num_ctas = DECODE_CASES[name]
    cfg = on(kernel, cfg)
    B = len(lens)
    k_cache, v_cache, tables = paged_cache(lens, Hkv, D, dtype, device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    _, q, _, _ = qkv_views(B, Hq, Hkv, D, dtype, device)
    assert q.stride(0) == (Hq + 2 * Hkv) * D
    buf, out = out_rows(B, Hq, D, 2, 3, dtype, device)
    res = paged_decode_attention(
        q, k_cache, v_cache, tables, seq_lens, D**-0.5, window, num_ctas=num_ctas, out=out, config=cfg
    )
    assert res is out
    assert buf[:2].isnan().all() and buf[2 + B :].isnan().all()
    q32, k32, v32 = f32(q.contiguous(), k_cache, v_cache)
    assert_rel(out, paged_decode_attention_ref(q32, k32, v32, tables, seq_lens, D**-0.5, window), dtype)

    ref_buf, ref_out = out_rows(B, Hq, D, 2, 3, dtype, device)
    got = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, D**-0.5, window, out=ref_out)
    assert got is ref_out
    assert ref_buf[:2].isnan().all() and ref_buf[2 + B :].isnan().all()
    want = paged_decode_attention_ref(q.contiguous(), k_cache, v_cache, tables, seq_lens, D**-0.5, window)
    torch.testing.assert_close(ref_out, want)


def test_each_config_runs_its_own_kernel(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """A config that resolved to the wrong kernel would still pass every comparison above. Each
    config must launch the kernel it names."""
    import nanoflow.kernels.decode_attention as dk

    launched: list[str] = []
    for name in ("_decode_kernel", "decode_all_heads_kernel"):
        kernel = getattr(dk, name)
        monkeypatch.setattr(dk, name, _Recorder(kernel, name, launched))
    lens = [5, 40]
    k_cache, v_cache, tables = paged_cache(lens, 2, 64, torch.float32, device)
    q = torch.randn(len(lens), 8, 64, device=device)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    for kernel, name in (("per_head", "_decode_kernel"), ("all_heads", "decode_all_heads_kernel")):
        launched.clear()
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1, config=on(kernel))
        assert launched == [name]


class _Recorder:
    """kernel[grid](...) that records the kernel's name, then launches it."""

    def __init__(self, kernel, name: str, launched: list[str]) -> None:
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_i32_offsets_only_below_2_to_the_31() -> None:
    small = torch.empty(64, 8, PAGE, 128, device="meta")
    big = torch.empty(131073, 8, PAGE, 128, device="meta")  # 2**31 + 2**14 elements
    assert i32_offsets(small, small) and not i32_offsets(small, big)
    assert i32_offsets(big[:-1])  # a view of 2**31 elements: its last offset, 2**31 - 1, still fits


@pytest.mark.parametrize("case", ["gqa4-d128-split-capped", "mha-d64-window-capped"])
def test_decode_64_bit_offsets(case: str, kernel: str, device: str, dtype: torch.dtype, assert_rel,
                               monkeypatch) -> None:
    """The int64 address path (a layer's cache of 2**31 elements or more) computes what the int32 one does."""
    monkeypatch.setattr(decode_attention, "i32_offsets", lambda *caches: False)
    test_decode(DECODE_CASES[case], kernel, device, dtype, assert_rel)


def test_gate_census_reads_the_counts_the_gate_leaves() -> None:
    # 4 SMs: SMs 0 and 2 in the share (state 1), 3 programs reached SM 0 (2 ran), 1 reached SM 2
    counts = torch.tensor([99, 2, 1, 2, 1, 2, 3, 5, 1, 4], dtype=torch.int32)
    assert gate_census(counts, num_sms=4, ctas_per_sm=2) == {
        "share_sms": 2, "programs_on_share": 3, "share_sms_by_programs": {1: 1, 2: 1}, "share_smids": [0, 2]}


def test_fp8_decodes_on_all_sms_take_the_all_heads_kernel_when_many() -> None:
    """The measured switch (decode_common.default_config): many fp8 decodes run the all-heads kernel."""
    assert default_config(512, 8, fp8_cache=True) == FP8_MANY
    assert default_config(256, 8, fp8_cache=True) == DecodeConfig()
    assert default_config(4096, 8, fp8_cache=False) == DecodeConfig()


@pytest.mark.parametrize("case", ["gqa4-d128-split-capped", "mha-d64-window-capped"])
def test_decode_dynamic_without_gate(case: str, device: str, dtype: torch.dtype, assert_rel,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-heads kernel on a capped grid taking work items from the counter without the SM gate."""
    monkeypatch.setitem(KERNELS, "all_heads_dynamic", {"all_heads": True, "dynamic": True})
    test_decode(DECODE_CASES[case], "all_heads_dynamic", device, dtype, assert_rel)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_ctas", [16, 44, 66])
@pytest.mark.parametrize("extra", [{"dynamic": True}, {"sm_gate": True, "gate_smid_stride": 2}],
                         ids=["dynamic", "gate_even_smids"])
def test_decode_real_shapes_capped_variants(num_ctas: int, extra: dict, assert_rel,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KERNELS, "variant", {"all_heads": True, "kv_heads_per_item": 4, **extra})
    test_decode_real_shapes(num_ctas, "variant", assert_rel)
