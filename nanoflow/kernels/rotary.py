"""Rotary position embedding applied to q and k, fused with writing k and v into the paged cache.

Cache layout (all kernels): [num_pages, num_kv_heads, page_size, head_dim], so one (page, head)
is a contiguous page_size x head_dim tile. A token's slot is page * page_size + offset.
cos_sin: [max_positions, head_dim] with cos in the first half and sin in the second (rotate-half
convention of Llama/Mistral/Qwen2 checkpoints).
"""

from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D/2]."""
    half = x.shape[-1] // 2
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    page_size = k_cache.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_cache[pages, :, offsets] = k.to(k_cache.dtype)
    v_cache[pages, :, offsets] = v.to(v_cache.dtype)


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotates q (returned) and k, then stores k and v at slot_mapping. q: [T, Hq, D], k/v: [T, Hkv, D]."""
    cs = cos_sin[positions]
    cos, sin = cs.chunk(2, dim=-1)
    q = apply_rope_ref(q, cos, sin)
    write_kv_ref(apply_rope_ref(k, cos, sin), v, k_cache, v_cache, slot_mapping)
    return q
