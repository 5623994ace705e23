"""The fused MoE path (align, grouped gate_up and down GEMMs) against the references, at small
shapes with uneven expert loads: experts with no tokens, and every token on one expert; and split
over expert-parallel ranks, one of them with no tokens at all. Also each projection with its own
tiles, and the tuned-config file in both its forms."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nanoflow.kernels import fused_moe as fm
from nanoflow.kernels import moe_configs as mc
from nanoflow.kernels.activation import silu_and_mul_ref

H, INTER, TOP_K = 64, 128, 2
# block_m 16 and two N blocks per projection: several row blocks per expert, masked tails
SMALL = fm.MoEConfig(block_m=16, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1)
# each projection its own tiles on one align: gate_up's K step (128) past K = 64 takes the masked-K
# path, down's N tile (32) splits H = 64 in two
SPLIT = mc.MoEConfigs(
    gate_up=mc.MoEConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=1),
    down=mc.MoEConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1),
)


def _with(cfg: fm.MoEConfig | mc.MoEConfigs, **fields: bool) -> fm.MoEConfig | mc.MoEConfigs:
    if isinstance(cfg, mc.MoEConfigs):
        return mc.MoEConfigs(*(dataclasses.replace(c, **fields) for c in (cfg.gate_up, cfg.down)))
    return dataclasses.replace(cfg, **fields)


# the weight tiles by TMA (gate_up's tiles read past the expert's rows and, K step 128 > K, past K,
# which the descriptor fills with zeros); the rows in slot order, by pointer loads and by TMA
TMA = [_with(c, **f) for c in (SMALL, SPLIT)
       for f in ({"tma_weights": True}, {"sorted_rows": True}, {"sorted_rows": True, "tma_weights": True})]


def _routing(kind: str, T: int, E: int, device: str) -> torch.Tensor:
    """[T, TOP_K] distinct experts per token."""
    if kind == "random":
        return torch.rand(T, E, device=device).argsort(dim=1)[:, :TOP_K]
    if kind == "one_expert":  # every token's first slot on expert 1, the second on expert 2
        return torch.tensor([[1, 2]], device=device).expand(T, TOP_K).contiguous()
    assert kind == "skewed"  # experts 0 and E-1 get nothing; expert 1 most of the pairs
    ids = torch.randint(2, E - 1, (T, TOP_K), device=device)
    ids[:, 0] = 1
    return ids


def _problem(T: int, E: int, kind: str, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(T, H, device=device, dtype=dtype)
    w13 = (torch.randn(E, 2 * INTER, H, device=device) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, device=device) * INTER**-0.5).to(dtype)
    ids = _routing(kind, T, E, device)
    w = torch.rand(T, TOP_K, device=device)
    return x, w13, w2, (w / w.sum(1, keepdim=True)).to(dtype), ids


@pytest.mark.parametrize("T", [0, 1, 5, 33])
@pytest.mark.parametrize("kind", ["random", "one_expert", "skewed"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align(T: int, kind: str, block_m: int, device: str) -> None:
    E = 8
    ids = _routing(kind, T, E, device) if T else torch.empty(0, TOP_K, dtype=torch.int64, device=device)
    al = fm.align(ids, E, block_m)
    n = T * TOP_K
    cap = fm.align_capacity(n, E, block_m)
    assert al.sorted_pairs.shape == (cap,) and al.block_expert.shape == (cap // block_m,) and al.num_pairs == n
    pairs, experts = al.sorted_pairs.cpu(), al.block_expert.cpu()
    live = int(al.num_padded)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E)
    assert live == int(((counts + block_m - 1) // block_m * block_m).sum()) and live % block_m == 0
    real = pairs[pairs < n]
    assert sorted(real.tolist()) == list(range(n)), "every (token, slot) pair exactly once"
    assert (pairs[live:] == n).all(), "beyond the live blocks: padding only"
    flat_ids = ids.reshape(-1).cpu()
    for b in range(cap // block_m):
        blk = pairs[b * block_m : (b + 1) * block_m]
        if b * block_m >= live:
            assert experts[b] == -1
            continue
        mine = blk[blk < n]
        assert len(mine) > 0, "no block is all padding"
        assert (flat_ids[mine.long()] == experts[b]).all(), "a block holds one expert's pairs"
        # padding only at the end of an expert's run
        assert (blk[: len(mine)] < n).all()
        assert mine.tolist() == sorted(mine.tolist()), "stable: pairs in order within an expert"


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("kind", ["random", "one_expert", "skewed"])
def test_gate_up_and_down(T: int, kind: str, device: str, dtype: torch.dtype, assert_rel: Callable) -> None:
    E = 4 if kind == "random" else 8
    x, w13, w2, w, ids = _problem(T, E, kind, device, dtype)
    al = fm.align(ids, E, SMALL.block_m)
    act = torch.full((T * TOP_K, INTER), float("nan"), device=device, dtype=dtype)
    fm.moe_gate_up(x, w13, al, TOP_K, act, SMALL)
    flat = ids.reshape(-1)
    tok = torch.arange(T * TOP_K, device=device) // TOP_K
    want_act = torch.stack([silu_and_mul_ref(x[t : t + 1] @ w13[e].T)[0]
                            for t, e in zip(tok.tolist(), flat.tolist(), strict=True)])
    assert_rel(act, want_act, dtype)

    down = torch.full((T * TOP_K, H), float("nan"), device=device, dtype=dtype)
    fm.moe_down(want_act, w2, al, w, down, SMALL)
    want_down = torch.stack([want_act[p] @ w2[e].T for p, e in enumerate(flat.tolist())]) * w.reshape(-1, 1)
    assert_rel(down, want_down, dtype)


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("kind", ["random", "one_expert", "skewed"])
@pytest.mark.parametrize("E", [4, 8])
def test_fused_moe(T: int, kind: str, E: int, device: str, dtype: torch.dtype, assert_rel: Callable) -> None:
    x, w13, w2, w, ids = _problem(T, E, kind, device, dtype)
    ref = fm.moe_experts_ref(x, w13, w2, w, ids, torch.empty_like(x))
    assert_rel(ref, fm.moe_per_token_ref(x, w13, w2, w, ids), dtype)
    # the default config (as the model runs it), a small one with several blocks per expert,
    # different tiles per projection, and both with TMA and sorted rows
    for cfg in (None, SMALL, SPLIT, *TMA):
        buf = torch.full((T + 3, H), float("nan"), device=device, dtype=dtype)
        out = buf[1 : T + 1]  # rows of a bigger buffer, as a nano-batch's
        assert fm.fused_moe(x, w13, w2, w, ids, out, cfg) is out
        assert buf[0].isnan().all() and buf[T + 1 :].isnan().all()
        assert_rel(out, ref, dtype)


def test_fused_moe_config_per_projection(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe hands each GEMM its own config (any tile gives the right answer, so the results
    alone would not show a swap), and a single MoEConfig serves both."""
    launched: list[tuple[bool, fm.MoEConfig]] = []
    real = fm._launch

    def spy(*args: object, **kwargs: object) -> None:
        launched.append((args[7], args[8]))  # gated, cfg
        real(*args, **kwargs)

    monkeypatch.setattr(fm, "_launch", spy)
    x, w13, w2, w, ids = _problem(5, 4, "random", device, torch.float32)
    fm.fused_moe(x, w13, w2, w, ids, torch.empty_like(x), SPLIT)
    fm.fused_moe(x, w13, w2, w, ids, torch.empty_like(x), SMALL)
    assert launched == [(True, SPLIT.gate_up), (False, SPLIT.down), (True, SMALL), (False, SMALL)]


def test_fused_moe_no_tokens(device: str) -> None:
    x, w13, w2, w, ids = _problem(0, 4, "random", device, torch.float32)
    out = torch.empty(0, H, device=device)
    assert fm.fused_moe(x, w13, w2, w, ids, out).shape == (0, H)


@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("kind", ["random", "skewed", "rank0_only"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_fused_moe_expert_parallel(T: int, kind: str, ranks: int, device: str, dtype: torch.dtype,
                                   assert_rel: Callable) -> None:
    """Expert parallel: each rank's fused_moe over its whole experts (global ids in the routing)
    against moe_experts_ref with the same shard; a pair of another rank's expert adds exactly zero
    (a rank with no pairs writes an all-zero out) and the ranks' partial outputs sum to the layer's.
    Uneven loads: skewed (the first and last experts get nothing); rank0_only (every pair on rank 0)."""
    E = 8
    x, w13, w2, w, ids = _problem(T, E, "skewed" if kind == "rank0_only" else kind, device, dtype)
    local = E // ranks
    if kind == "rank0_only":
        ids = torch.rand(T, local, device=device).argsort(dim=1)[:, :TOP_K]
    full = fm.moe_experts_ref(x, w13, w2, w, ids, torch.empty_like(x))
    total = torch.zeros_like(x, dtype=torch.float32)
    for r in range(ranks):
        first = r * local
        shard = fm.ExpertShard(first, E)
        mine = (ids >= first) & (ids < first + local)
        w13_r, w2_r = w13[first : first + local].contiguous(), w2[first : first + local].contiguous()
        ref = fm.moe_experts_ref(x, w13_r, w2_r, w, ids, torch.empty_like(x), shard)
        # the shard's sum is the full sum with the other ranks' pairs weighted 0
        masked = fm.moe_experts_ref(x, w13, w2, w * mine, ids, torch.empty_like(x))
        if not mine.any():  # a rank whose experts get no pair: nothing to compare relative to
            assert (ref == 0).all() and (masked == 0).all()
        else:
            assert_rel(ref, masked, dtype)
            assert_rel(fm.moe_per_token_ref(x, w13_r, w2_r, w, ids, shard), ref, dtype)
        for cfg in (None, SMALL, _with(SMALL, sorted_rows=True, tma_weights=True)):
            out = torch.full_like(x, float("nan"))
            fm.fused_moe(x, w13_r, w2_r, w, ids, out, cfg, shard=shard)
            assert (out[~mine.any(dim=1)] == 0).all(), "a token with no local expert gets exactly zero"
            if mine.any():
                assert_rel(out, ref, dtype)
        total += out.float()
    assert_rel(total, full, dtype)


def test_configs_agree_on_sorted_rows() -> None:
    with pytest.raises(ValueError, match="sorted_rows"):
        mc.MoEConfigs(SMALL, dataclasses.replace(SMALL, sorted_rows=True))


def test_default_config_block_m() -> None:
    assert mc.default_config(1, 2, 8).block_m == 16  # decode: little padding per expert
    assert mc.default_config(2048, 2, 8).block_m == 64
    # untuned (here: fp32 on the CPU): one config for both projections
    cfgs = mc.pick_config(2048, 2, torch.empty(8, 2 * INTER, H))
    assert cfgs.gate_up == cfgs.down and cfgs.block_m == 64


def _tile(block_m: int, block_n: int) -> dict[str, int]:
    return {"block_m": block_m, "block_n": block_n, "block_k": 64, "group_m": 1, "num_warps": 8, "num_stages": 3}


def test_config_file_both_forms(tmp_path: Path) -> None:
    """A token count maps to one config (both projections) or to one per projection; other GPUs
    and shapes are not read; the nearest tuned token count wins, the smaller on a tie."""
    key = mc.shape_key(8, 4096, 14336)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"GPU A": {key: {
        "256": _tile(64, 128),
        "1024": {"gate_up": _tile(128, 128), "down": _tile(128, 256)},
    }, "E=1,H=2,I=3": {"1": {"nonsense": 1}}}, "GPU B": {key: {"1": {"gate_up": _tile(16, 64)}}}}))
    tuned = mc.load_tuned(path, "GPU A", key)
    assert tuned == {256: mc.MoEConfigs.same(mc.MoEConfig(**_tile(64, 128))),
                     1024: mc.MoEConfigs(mc.MoEConfig(**_tile(128, 128)), mc.MoEConfig(**_tile(128, 256)))}
    assert mc.load_tuned(path, "GPU C", key) == {}
    assert mc.nearest(tuned, 100) is tuned[256] and mc.nearest(tuned, 640) is tuned[256]
    assert mc.nearest(tuned, 700).down.block_n == 256
    # what --write-config writes reads back the same
    assert mc.parse_entry(mc.to_entry(tuned[1024])) == tuned[1024]


@pytest.mark.parametrize("entry, match", [
    ({"gate_up": _tile(64, 128), "down": _tile(128, 128)}, "must share block_m"),
    ({"gate_up": _tile(64, 128)}, "exactly the keys"),
    ({"gate_up": _tile(64, 128), "down": {**_tile(64, 128), "block_q": 1}}, "block_q"),
])
def test_config_file_bad_entry(tmp_path: Path, entry: dict, match: str) -> None:
    """A bad entry is rejected on loading, naming the file, the GPU, the shape and the token count."""
    key = mc.shape_key(8, 4096, 14336)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"GPU A": {key: {"512": entry}}}))
    with pytest.raises(ValueError, match=match) as exc:
        mc.load_tuned(path, "GPU A", key)
    assert str(path) in str(exc.value) and "'GPU A' E=8,H=4096,I=14336 512 tokens" in str(exc.value)
    with pytest.raises(ValueError, match="must share block_m"):
        mc.MoEConfigs(mc.MoEConfig(block_m=16), mc.MoEConfig(block_m=32))


def test_repository_config_file_parses() -> None:
    table = json.loads(mc.CONFIG_FILE.read_text())
    for gpu, shapes in table.items():
        for key, entries in shapes.items():
            assert len(mc.load_tuned(mc.CONFIG_FILE, gpu, key)) == len(entries)


def test_token_counts_not_specialised() -> None:
    """Eager MoE steps come in every size above the graphs' buckets; a kernel that specialised a
    token count (==1, %16) would compile a new variant for each, inside a timed run (1.3-5 s of a
    55 s Mixtral bench on an H200). Compiled kernels only: the interpreter keeps no such list."""
    code = (
        "from nanoflow.kernels import fused_moe, moe_align\n"
        "for k, names in ((moe_align._count_kernel, {'num_pairs'}),\n"
        "                 (moe_align._place_kernel, {'num_pairs', 'num_chunks', 'capacity', 'num_blocks'}),\n"
        "                 (fused_moe._moe_gemm_kernel, {'num_pairs', 'num_blocks_m'})):\n"
        "    assert names <= {p.name for p in k.params if p.do_not_specialize}, k\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
