from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.rotary import rope_kv_write, rope_kv_write_ref


def _cos_sin(max_pos: int, dim: int, device: str) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device).float() / dim)
    angles = torch.arange(max_pos, device=device).float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 32), (8, 2, 64)])
def test_rope_kv_write_fused_qkv_views(
    num_q_heads: int, num_kv_heads: int, head_dim: int, device: str, dtype: torch.dtype, assert_rel
) -> None:
    T, D, page_size, num_pages = 11, head_dim, 16, 4
    # q, k, v are strided views into one fused qkv GEMM output, as the model produces them
    qkv = torch.randn(T, (num_q_heads + 2 * num_kv_heads) * D, device=device, dtype=dtype)
    q = qkv[:, : num_q_heads * D].view(T, num_q_heads, D)
    k = qkv[:, num_q_heads * D : (num_q_heads + num_kv_heads) * D].view(T, num_kv_heads, D)
    v = qkv[:, (num_q_heads + num_kv_heads) * D :].view(T, num_kv_heads, D)
    positions = torch.randint(0, 200, (T,), device=device)
    slots = torch.randperm(num_pages * page_size, device=device)[:T]
    cos_sin = _cos_sin(256, D, device)
    k_cache = torch.randn(num_pages, num_kv_heads, page_size, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    q_ref = rope_kv_write_ref(q, k, v, positions, cos_sin, k_ref, v_ref, slots)
    q_out = rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    assert_rel(q_out, q_ref, dtype)
    written = torch.zeros(num_pages * page_size, dtype=torch.bool, device=device)
    written[slots] = True
    untouched = ~written.view(num_pages, 1, page_size, 1).expand_as(k_cache)
    assert torch.equal(k_cache[untouched], k_ref[untouched])  # nothing outside slot_mapping moved
    assert_rel(k_cache, k_ref, dtype)
    assert torch.equal(v_cache, v_ref)  # v is copied, not computed


def test_rope_kv_write_skips_negative_slots(device: str, dtype: torch.dtype, assert_rel) -> None:
    T, H, D = 4, 2, 32
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(3))
    positions = torch.arange(T, device=device)
    slots = torch.tensor([3, -1, 17, -1], device=device)
    k_cache = torch.randn(2, H, 16, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cos_sin, keep = _cos_sin(8, D, device), slots >= 0
    scratch = (k_cache.clone(), v_cache.clone())
    q_ref = rope_kv_write_ref(q, k, v, positions, cos_sin, *scratch, slots.clamp(min=0))
    rope_kv_write_ref(q[keep], k[keep], v[keep], positions[keep], cos_sin, k_ref, v_ref, slots[keep])
    q_out = rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    assert_rel(q_out, q_ref, dtype)
    assert_rel(k_cache, k_ref, dtype)
    assert torch.equal(v_cache, v_ref)
