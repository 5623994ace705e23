"""The Triton align (one launch) against align_ref (torch ops): the same three tensors, bit for bit,
over many seeded random routings and the edge cases: no pairs, experts with no pairs, every pair
on one expert, more pairs than one chunk, expert counts that are not powers of two, and expert
parallel ranks (a range of the experts; the other ranks' pairs left out)."""

from __future__ import annotations

import pytest
import torch

from nanoflow.kernels import fused_moe as fm
from nanoflow.kernels.moe_align import _TILE, moe_align


def _run(ids: torch.Tensor, E: int, block_m: int, chunk: int | None, expert_offset: int = 0) -> fm.Aligned:
    """fm.align with a chosen chunk; outputs start poisoned so an unwritten entry shows."""
    n = ids.numel()
    cap = fm.align_capacity(n, E, block_m)
    sorted_pairs = torch.full((cap,), -7, dtype=torch.int32, device=ids.device)
    block_expert = torch.full((cap // block_m,), -7, dtype=torch.int32, device=ids.device)
    num_padded = torch.full((1,), -7, dtype=torch.int32, device=ids.device)
    moe_align(ids, E, block_m, sorted_pairs, block_expert, num_padded, chunk=chunk, expert_offset=expert_offset)
    return fm.Aligned(sorted_pairs, block_expert, num_padded, n, block_m)


def _check(ids: torch.Tensor, E: int, block_m: int, chunk: int | None = None, expert_offset: int = 0) -> None:
    want = fm.align_ref(ids, E, block_m, expert_offset)
    got = _run(ids, E, block_m, chunk, expert_offset)
    assert got.num_pairs == want.num_pairs
    for name in ("sorted_pairs", "block_expert", "num_padded"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs (E={E}, block_m={block_m}, n={ids.numel()}, chunk={chunk})"


def _random_ids(gen: torch.Generator, T: int, top_k: int, E: int, skew: float, device: str) -> torch.Tensor:
    """[T, top_k] distinct experts per token; skew > 0 favours the low experts (some get nothing)."""
    scores = torch.rand(T, E, generator=gen) - skew * torch.arange(E) / E
    return scores.argsort(dim=1, descending=True)[:, :top_k].to(device)


def test_random_routings(device: str) -> None:
    """Seeded loop: sizes around the chunk edges, several block sizes and expert counts."""
    gen = torch.Generator().manual_seed(1234)
    for i in range(60):
        E = [4, 6, 8, 13, 16, 60, 64][i % 7]
        top_k = 1 + i % min(3, E)
        block_m = [16, 32, 64][i % 3]
        T = int(torch.randint(0, 70, (1,), generator=gen))
        skew = [0.0, 0.5, 2.0][i % 3]
        ids = _random_ids(gen, T, top_k, E, skew, device)
        if i % 2:
            ids = ids.to(torch.int32)
        # a small chunk puts several chunks in every loop; None is the launcher's default
        _check(ids, E, block_m, chunk=[16, 32, None][i % 3])


@pytest.mark.parametrize("E", [6, 8, 60])
@pytest.mark.parametrize("block_m", [16, 64])
def test_no_pairs(E: int, block_m: int, device: str) -> None:
    _check(torch.empty(0, 2, dtype=torch.int64, device=device), E, block_m)


@pytest.mark.parametrize("E", [6, 8, 60])
@pytest.mark.parametrize("chunk", [16, None])
def test_one_expert(E: int, chunk: int | None, device: str) -> None:
    """Every pair on the last expert: one long run, every other expert empty."""
    _check(torch.full((37, 2), E - 1, dtype=torch.int64, device=device), E, 16, chunk)


def test_single_pair(device: str) -> None:
    _check(torch.tensor([[3]], device=device), 8, 16)


@pytest.mark.parametrize("T", [15, 16, 17, 48])
def test_chunk_edges(T: int, device: str) -> None:
    """2T pairs just under, at and over whole chunks of 16, and exactly block-aligned runs."""
    ids = (torch.arange(2 * T, device=device) % 2).reshape(T, 2)  # expert 0 then 1, T pairs each
    _check(ids, 4, 16, chunk=16)
    gen = torch.Generator().manual_seed(T)
    _check(_random_ids(gen, T, 2, 6, 1.0, device), 6, 16, chunk=16)


def test_many_pairs_default_chunk(device: str) -> None:
    """Several default chunks (_TILE // 8 pairs each), skewed onto a few experts."""
    assert 700 * 2 > 2 * (_TILE // 8), "three chunks or more"
    gen = torch.Generator().manual_seed(7)
    _check(_random_ids(gen, 700, 2, 8, 2.0, device), 8, 64)


def test_align_matches_ref(device: str) -> None:
    """fm.align itself (the path fused_moe takes) on a routing with an empty expert."""
    ids = torch.tensor([[0, 2], [2, 0], [5, 2], [0, 5]], device=device)
    got, want = fm.align(ids, 6, 16), fm.align_ref(ids, 6, 16)
    assert got.num_pairs == want.num_pairs == 8 and got.block_m == 16
    assert torch.equal(got.sorted_pairs, want.sorted_pairs) and torch.equal(got.block_expert, want.block_expert)
    assert torch.equal(got.num_padded, want.num_padded)


@pytest.mark.parametrize("E,ranks", [(4, 2), (8, 2), (8, 4), (12, 3), (60, 4)])
def test_expert_parallel(E: int, ranks: int, device: str) -> None:
    """Each rank's align (its experts [offset, offset + E / ranks), other ids absent) against
    align_ref, bit for bit; exactly the rank's pairs are placed, so the others cost no GEMM block.
    Uneven loads, a rank whose experts get no pair at all, and one rank with every pair."""
    gen = torch.Generator().manual_seed(E * ranks)
    local = E // ranks
    routings = [_random_ids(gen, 37, 2, E, skew, device) for skew in (0.0, 2.0)]
    routings.append(_random_ids(gen, 29, 2, local, 0.0, device))  # every pair on rank 0's experts
    routings.append(torch.empty(0, 2, dtype=torch.int64, device=device))
    for i, ids in enumerate(routings):
        flat = ids.reshape(-1).cpu()
        for r in range(ranks):
            offset = r * local
            _check(ids, local, 16, chunk=[16, None][i % 2], expert_offset=offset)
            al = fm.align(ids, local, 16, offset)
            mine = ((flat >= offset) & (flat < offset + local)).nonzero()[:, 0]
            placed = al.sorted_pairs.cpu()
            assert sorted(placed[placed < flat.numel()].tolist()) == mine.tolist()
            counts = torch.bincount(flat[mine] - offset, minlength=local)
            assert int(al.num_padded) == int(((counts + 15) // 16 * 16).sum())
            if mine.numel() == 0:  # a rank with no pairs: no live block at all
                assert int(al.num_padded) == 0 and (al.block_expert == -1).all()
