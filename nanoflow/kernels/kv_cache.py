"""The paged KV cache: its layout, and the op that writes it (rotary position embedding of q and k
fused with storing k and v).

Cache layout (all kernels): [num_pages, num_kv_heads, page_size, head_dim], so one (page, head)
is a contiguous page_size x head_dim tile. A token's slot is page * page_size + offset.
The cache may be float8_e4m3fn while q/k/v are 16/32-bit (EngineConfig.kv_cache_dtype): K and V
are rounded to it once, on store, saturating at +-448 (scale 1.0, see nanoflow/config.py).

cos_sin: [max_positions, head_dim] with cos in the first half and sin in the second (rotate-half
convention of Llama/Mistral/Qwen2 checkpoints).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D/2]."""
    half = x.shape[-1] // 2
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded for a cache of `dtype`. fp8 saturates like the GPU's cvt.satfinite: torch versions
    differ on whether an out-of-range cast gives NaN or +-448, and one NaN key poisons every query."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(dtype)


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    page_size = k_cache.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_cache[pages, :, offsets] = to_cache_dtype(k, k_cache.dtype)
    v_cache[pages, :, offsets] = to_cache_dtype(v, v_cache.dtype)


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates q (returned) and k, then stores k and v at slot_mapping. q: [T, Hq, D], k/v: [T, Hkv, D],
    any strides. The rotated q is a new tensor, or q_out (q's shape and dtype; q itself rotates in place)."""
    cs = cos_sin[positions]
    cos, sin = cs.chunk(2, dim=-1)
    if q_out is not None:
        assert q_out.shape == q.shape and q_out.dtype == q.dtype
    q_rot = apply_rope_ref(q, cos, sin)
    if k_cache.dtype == k.dtype:
        k = apply_rope_ref(k, cos, sin)
    else:
        # a narrower cache (fp8): rotate in fp32 from the same rounded cos/sin as the Triton kernel,
        # so K is rounded once, on store, not first to the activation dtype and then again
        k = apply_rope_ref(k.float(), cos.to(k.dtype), sin.to(k.dtype))
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q_rot if q_out is None else q_out.copy_(q_rot)


@triton.jit
def _rotate_heads(src_ptr, stride_h, heads, cos, sin, offs, mask, HALF: tl.constexpr):
    """Rotate-half of [heads, D] read at src_ptr: returns the two halves, fp32."""
    ptrs = src_ptr + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ot, stride_oh,
    stride_cp, stride_ch, stride_ct,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SATURATE: tl.constexpr,
):  # fmt: skip
    """One token per program: all its q heads, k heads and v heads, so cos/sin load once."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    pos = tl.load(positions_ptr + t)
    # the reference casts cos/sin to the activation dtype first
    act_dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=d_mask, other=0.0).to(act_dtype)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0).to(act_dtype)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    mask = (hq < NUM_Q_HEADS)[:, None] & d_mask[None, :]
    # both halves of every head are loaded before the stores that depend on them: q_out may be q
    o1, o2 = _rotate_heads(q_ptr + t * stride_qt, stride_qh, hq, cos, sin, offs, mask, HALF)
    out = q_out_ptr + t * stride_ot + hq[:, None] * stride_oh + offs[None, :]
    tl.store(out, o1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, o2.to(q_out_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_mapping_ptr + t)
    if slot >= 0:  # negative slot: a padding token, nothing to cache
        hk = tl.arange(0, BLOCK_HKV)
        kv_mask = (hk < NUM_KV_HEADS)[:, None] & d_mask[None, :]
        k1, k2 = _rotate_heads(k_ptr + t * stride_kt, stride_kh, hk, cos, sin, offs, kv_mask, HALF)
        base = (slot // PAGE_SIZE) * stride_cp + (slot % PAGE_SIZE) * stride_ct
        dst = base + hk[:, None] * stride_ch + offs[None, :]
        src = v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs[None, :]
        v1 = tl.load(src, mask=kv_mask, other=0.0)
        v2 = tl.load(src + HALF, mask=kv_mask, other=0.0)
        if SATURATE > 0:  # fp8 cache: clamp explicitly rather than rely on the backend's conversion
            k1 = tl.minimum(tl.maximum(k1, -SATURATE), SATURATE)
            k2 = tl.minimum(tl.maximum(k2, -SATURATE), SATURATE)
            v1 = tl.minimum(tl.maximum(v1.to(tl.float32), -SATURATE), SATURATE)
            v2 = tl.minimum(tl.maximum(v2.to(tl.float32), -SATURATE), SATURATE)
        # one rounding, fp32 (k) or the activation dtype (v) straight to the cache dtype
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, k1.to(cache_dtype), mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, k2.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + dst, v1.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(cache_dtype), mask=kv_mask)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of rope_kv_write_ref: returns rotated q and writes rotated k and v into the
    caches at slot_mapping (slots < 0 are skipped). The caches are in q's dtype or float8_e4m3fn.

    q/k/v may be strided views, e.g. slices of a fused qkv output [T, (Hq + 2 * Hkv) * D] viewed as
    [T, H, D]; a last dim that is not contiguous costs a copy. head_dim must be even. The rotated q
    goes to q_out when given (q's shape and dtype, any strides with a contiguous last dim: q itself
    rotates q in place, as each program reads its token's heads before it writes them), else to a
    new contiguous [T, Hq, D] tensor.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == v.shape == (T, Hkv, D) and D % 2 == 0
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (q.dtype, torch.float8_e4m3fn)
    assert k_cache.shape[1] == Hkv and k_cache.shape[3] == D and k_cache.stride(3) == 1
    assert cos_sin.shape[-1] == D and cos_sin.stride(-1) == 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if q_out is None:
        out = torch.empty(T, Hq, D, device=q.device, dtype=q.dtype)
    else:
        assert q_out.shape == q.shape and q_out.dtype == q.dtype and q_out.stride(-1) == 1
        out = q_out
    if T == 0:
        return out
    half = D // 2
    _rope_kv_write_kernel[(T,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=Hq, NUM_KV_HEADS=Hkv, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(half), PAGE_SIZE=k_cache.shape[2],
        SATURATE=FP8_E4M3_MAX if k_cache.dtype == torch.float8_e4m3fn else 0.0, num_warps=4,
    )  # fmt: skip
    return out
