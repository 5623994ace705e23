"""Rotary embedding tables, including Llama 3's frequency rescaling."""

from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """rope: {'rope_type', 'rope_theta', ...} in transformers' `rope_parameters` form."""
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope["factor"])
    if kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def cos_sin_table(head_dim: int, rope: dict, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos(pos * f) in the first half, sin in the second."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(head_dim, rope)[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
