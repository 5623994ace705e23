"""Tile configs of the fused MoE's grouped GEMMs (fused_moe.py): defaults, and tuned ones per GPU.

The two projections run one kernel at different shapes (Mixtral-8x7B: gate_up K = 4096, N = 2 * 14336;
down K = 14336, N = 4096) and prefer different tiles, so each has its own (`MoEConfigs`). They must
agree on block_m: the align groups the pairs into blocks of block_m rows once per layer, and both
GEMMs walk those same blocks.

Tuned file (`fused_moe_configs.json`, written by `benchmarks/moe_check.py --sweep --write-config`):

    {GPU name: {shape_key(E, H, I): {token count: entry}}}

where an entry is either one config, used for both projections (the first format, still read):

    {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 16, "num_warps": 8, "num_stages": 3}

or one config per projection, with the same block_m (what --write-config writes):

    {"gate_up": {"block_m": 128, "block_n": 128, ...}, "down": {"block_m": 128, "block_n": 256, ...}}

A step takes the entry of the nearest tuned token count (a tie: the smaller); an untuned GPU or shape
runs default_config for both projections.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of one grouped GEMM."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8  # row blocks that walk the N blocks together, so their weight tiles stay in L2
    num_warps: int = 4
    num_stages: int = 3
    # weight tiles by TMA (a tensor descriptor) instead of pointer loads: Hopper and later, and rows
    # of a multiple of 16 bytes
    tma_weights: bool = False
    # the rows gathered into the align's slot order before gate_up (one gather of x) and kept so for
    # down, so both GEMMs read contiguous A tiles (by TMA too, with tma_weights); both projections
    # must agree, as on block_m
    sorted_rows: bool = False


@dataclass(frozen=True)
class MoEConfigs:
    """The tiles of each projection; one align serves both, hence one block_m."""

    gate_up: MoEConfig
    down: MoEConfig

    def __post_init__(self) -> None:
        if self.gate_up.block_m != self.down.block_m:
            raise ValueError(
                f"gate_up block_m {self.gate_up.block_m} != down block_m {self.down.block_m}: both "
                "projections walk the blocks of one align, so they must share block_m"
            )
        if self.gate_up.sorted_rows != self.down.sorted_rows:
            raise ValueError("gate_up and down must agree on sorted_rows: down reads the rows gate_up writes")

    @classmethod
    def same(cls, cfg: MoEConfig) -> MoEConfigs:
        return cls(cfg, cfg)

    @property
    def block_m(self) -> int:
        return self.gate_up.block_m


def default_config(num_tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """Untuned shapes: small batches (decode) give each expert a few rows, where a tall block would
    be mostly padding; large ones take the big tiles that keep Hopper's tensor cores busy."""
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_stages=4)
    if per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=128, group_m=8, num_stages=4)
    return MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4)


CONFIG_FILE = Path(__file__).with_name("fused_moe_configs.json")


def shape_key(num_experts: int, hidden: int, intermediate: int) -> str:
    return f"E={num_experts},H={hidden},I={intermediate}"


def parse_entry(entry: dict[str, Any]) -> MoEConfigs:
    """One token count's entry, in either form (module docstring)."""
    if "gate_up" in entry or "down" in entry:
        if set(entry) != {"gate_up", "down"}:
            raise ValueError(f"a per-projection entry has exactly the keys 'gate_up' and 'down', not {sorted(entry)}")
        return MoEConfigs(MoEConfig(**entry["gate_up"]), MoEConfig(**entry["down"]))
    return MoEConfigs.same(MoEConfig(**entry))


def to_entry(cfgs: MoEConfigs) -> dict[str, dict[str, int]]:
    """The per-projection form of cfgs, as the file stores it."""
    return {"gate_up": dataclasses.asdict(cfgs.gate_up), "down": dataclasses.asdict(cfgs.down)}


@functools.cache
def load_tuned(path: Path, device_name: str, key: str) -> dict[int, MoEConfigs]:
    """Token count -> configs tuned on this GPU for this shape; empty if never tuned here. A bad
    entry fails here, naming itself, rather than as a shape error inside a kernel launch."""
    table = json.loads(path.read_text()) if path.exists() else {}
    tuned = {}
    for tokens, entry in table.get(device_name, {}).get(key, {}).items():
        try:
            tuned[int(tokens)] = parse_entry(entry)
        except (TypeError, ValueError) as exc:  # TypeError: an unknown or missing tile field
            raise ValueError(f"{path}: {device_name!r} {key} {tokens} tokens: {exc}") from exc
    return tuned


def nearest(tuned: dict[int, MoEConfigs], num_tokens: int) -> MoEConfigs:
    return tuned[min(tuned, key=lambda t: (abs(t - num_tokens), t))]


def pick_config(num_tokens: int, top_k: int, w13: torch.Tensor, num_experts: int | None = None) -> MoEConfigs:
    """The tuned configs of the nearest tuned token count on this GPU, else default_config for both.
    num_experts: the model's (expert parallel: w13 holds a share of them). Each expert's GEMMs are
    then the one-GPU model's (same rows per expert, whole intermediate size), so its tiles apply."""
    _, two_i, H = w13.shape
    E = num_experts or w13.shape[0]
    if w13.element_size() > 2:  # fp32 (the tests): half the K step keeps 4-byte tiles in shared memory
        cfg = default_config(num_tokens, top_k, E)
        return MoEConfigs.same(dataclasses.replace(cfg, block_k=max(16, cfg.block_k // 2)))
    if w13.is_cuda:
        tuned = load_tuned(CONFIG_FILE, torch.cuda.get_device_name(w13.device), shape_key(E, H, two_i // 2))
        if tuned:
            return nearest(tuned, num_tokens)
    return MoEConfigs.same(default_config(num_tokens, top_k, E))
