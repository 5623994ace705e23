from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.kv_cache import rope_kv_write, rope_kv_write_ref


def _cos_sin(max_pos: int, dim: int, device: str) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device).float() / dim)
    angles = torch.arange(max_pos, device=device).float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _split_qkv(qkv: torch.Tensor, Hq: int, Hkv: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views into one fused qkv GEMM output [T, (Hq + 2 Hkv) D], as the model has them."""
    T = qkv.shape[0]
    return (qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D),
            qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D))


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 32), (8, 2, 64)])
def test_rope_kv_write_fused_qkv_views(
    num_q_heads: int, num_kv_heads: int, head_dim: int, device: str, dtype: torch.dtype, assert_rel
) -> None:
    T, D, page_size, num_pages = 11, head_dim, 16, 4
    qkv = torch.randn(T, (num_q_heads + 2 * num_kv_heads) * D, device=device, dtype=dtype)
    q, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads, D)
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


# --- fp8 (e4m3) cache: K/V are rounded once, on store, saturating at +-448.

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_kv_write_ref_fp8_rounds_once_and_saturates(act_dtype: torch.dtype) -> None:
    T, Hq, Hkv, D, page_size, num_pages = 11, 4, 2, 32, 16, 2
    q = torch.randn(T, Hq, D, dtype=act_dtype)
    k = torch.randn(T, Hkv, D, dtype=act_dtype)
    v = torch.randn(T, Hkv, D, dtype=act_dtype)
    v[0, 0, :4] = torch.tensor([1000.0, -1000.0, 449.0, 300.0])  # beyond e4m3's 448: saturate, not NaN
    positions = torch.randint(0, 200, (T,))
    slots = torch.randperm(num_pages * page_size)[:T]
    # cos/sin already on the activation grid, so the fp32 reference below rotates with the same values
    cos_sin = _cos_sin(256, D, "cpu").to(act_dtype).float()
    k8 = torch.zeros(num_pages, Hkv, page_size, D, dtype=FP8)
    v8 = torch.zeros_like(k8)
    q_out = rope_kv_write_ref(q, k, v, positions, cos_sin, k8, v8, slots)
    k32, v32 = torch.zeros_like(k8, dtype=torch.float32), torch.zeros_like(k8, dtype=torch.float32)
    q_ref = rope_kv_write_ref(q.float(), k.float(), v.float(), positions, cos_sin, k32, v32, slots)
    assert q_out.dtype == act_dtype and torch.equal(q_out, rope_kv_write_ref(q, k, v, positions, cos_sin,
                                                                                k32.clone(), v32.clone(), slots))
    assert torch.allclose(q_out.float(), q_ref, rtol=1e-2, atol=1e-2)
    # one rounding: fp32 rotation straight to fp8 (bf16 first would differ in a few elements)
    assert torch.equal(k8.float(), k32.clamp(-448, 448).to(FP8).float())
    assert torch.equal(v8.float(), v32.clamp(-448, 448).to(FP8).float())
    assert v8.float()[slots[0] // page_size, 0, slots[0] % page_size, :4].tolist() == [448.0, -448.0, 448.0, 288.0]


def test_rope_kv_write_fp8_cache_matches_ref(device: str, dtype: torch.dtype) -> None:
    """Triton kernel vs reference with an fp8 cache. The identity rotation (cos 1, sin 0) and inputs on
    the fp8 grid make the stores exact: Triton's interpreter mis-rounds fp8 stores (a mantissa
    carry into the exponent is lost), so its rounding is checked on the GPU only (tests/gpu)."""
    T, Hq, Hkv, D, page_size, num_pages = 11, 8, 2, 64, 16, 4
    q = torch.randn(T, Hq, D, device=device, dtype=dtype)
    k = torch.randn(T, Hkv, D, device=device).to(FP8).to(dtype)
    v = torch.randn(T, Hkv, D, device=device).to(FP8).to(dtype)
    v[0, 0, 0], k[1, 1, 1] = 1000.0, -1000.0  # saturated in both paths
    positions = torch.randint(0, 8, (T,), device=device)
    cos_sin = torch.cat([torch.ones(8, D // 2), torch.zeros(8, D // 2)], dim=-1).to(device)
    slots = torch.randperm(num_pages * page_size, device=device)[:T]
    slots[3] = -1  # a padding token writes nothing
    k8 = torch.randn(num_pages, Hkv, page_size, D, device=device).to(FP8)
    v8 = torch.randn_like(k8, dtype=torch.float32).to(FP8)
    k_ref, v_ref = k8.clone(), v8.clone()
    keep = slots >= 0
    rope_kv_write_ref(q[keep], k[keep], v[keep], positions[keep], cos_sin, k_ref, v_ref, slots[keep])
    q_out = rope_kv_write(q, k, v, positions, cos_sin, k8, v8, slots)
    assert torch.equal(q_out, q)
    assert torch.equal(k8.float(), k_ref.float()) and torch.equal(v8.float(), v_ref.float())
    assert k8.float().abs().max() == 448.0 and v8.float().abs().max() == 448.0


# --- q_out: the rotated q written in place (into the fused qkv buffer) or into rows of a bigger buffer


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 32), (8, 2, 64)])
def test_rope_kv_write_rotates_q_in_place_in_qkv_buffer(
    num_q_heads: int, num_kv_heads: int, head_dim: int, device: str, dtype: torch.dtype, assert_rel
) -> None:
    """q_out=q: q's part of the qkv buffer is rotated in place; its k and v parts are left as they were."""
    T, Hq, Hkv, D, page_size, num_pages = 11, num_q_heads, num_kv_heads, head_dim, 16, 4
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=device, dtype=dtype)
    positions = torch.randint(0, 200, (T,), device=device)
    slots = torch.randperm(num_pages * page_size, device=device)[:T]
    slots[4] = -1  # a padding token: q is still rotated, nothing is cached
    cos_sin = _cos_sin(256, D, device)
    k_cache = torch.randn(num_pages, Hkv, page_size, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    q0, k0, v0 = _split_qkv(qkv.clone(), Hq, Hkv, D)
    q_ref = rope_kv_write_ref(q0, k0, v0, positions, cos_sin, k_ref.clone(), v_ref.clone(), slots.clamp(min=0))
    rope_kv_write_ref(q0[keep], k0[keep], v0[keep], positions[keep], cos_sin, k_ref, v_ref, slots[keep])

    kv_before = qkv[:, Hq * D :].clone()
    q, k, v = _split_qkv(qkv, Hq, Hkv, D)
    assert rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots, q_out=q) is q
    assert_rel(q, q_ref, dtype)
    assert torch.equal(qkv[:, Hq * D :], kv_before)
    assert_rel(k_cache, k_ref, dtype)
    assert torch.equal(v_cache, v_ref)

    # the reference in place gives what it returns out of place
    qkv2 = torch.cat([q0.reshape(T, -1), kv_before], dim=1)
    q2, k2, v2 = _split_qkv(qkv2, Hq, Hkv, D)
    k_scr, v_scr = k_ref.clone(), v_ref.clone()
    assert rope_kv_write_ref(q2, k2, v2, positions, cos_sin, k_scr, v_scr, slots.clamp(min=0), q_out=q2) is q2
    assert torch.equal(q2, q_ref) and torch.equal(qkv2[:, Hq * D :], kv_before)


def test_rope_kv_write_q_out_rows_of_bigger_buffer(device: str, dtype: torch.dtype, assert_rel) -> None:
    """q_out: rows 2..2+T of a [T + 5, Hq * D] buffer viewed as [T, Hq, D]; no other row is written."""
    T, Hq, Hkv, D, page_size, num_pages = 7, 8, 2, 32, 16, 2
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=device, dtype=dtype)
    q, k, v = _split_qkv(qkv, Hq, Hkv, D)
    positions = torch.randint(0, 200, (T,), device=device)
    slots = torch.randperm(num_pages * page_size, device=device)[:T]
    cos_sin = _cos_sin(256, D, device)
    k_cache = torch.zeros(num_pages, Hkv, page_size, D, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q_ref = rope_kv_write_ref(q, k, v, positions, cos_sin, k_cache.clone(), v_cache.clone(), slots)
    for fn in (rope_kv_write, rope_kv_write_ref):
        buf = torch.full((T + 5, Hq * D), float("nan"), device=device, dtype=dtype)
        q_out = buf[2 : 2 + T].view(T, Hq, D)
        assert fn(q, k, v, positions, cos_sin, k_cache, v_cache, slots, q_out=q_out) is q_out
        assert buf[:2].isnan().all() and buf[2 + T :].isnan().all()
        assert_rel(q_out, q_ref, dtype)
