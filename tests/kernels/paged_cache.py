"""Paged caches for the attention kernel tests: random pages behind shuffled page tables."""

from __future__ import annotations

import torch

PAGE = 16
FP8 = torch.float8_e4m3fn


def paged_cache(
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


def f32(*ts: torch.Tensor) -> list[torch.Tensor]:
    # references for bf16 run in fp32: compare against the exact answer, not a rounded one
    return [t.float() for t in ts]


def poison_unwritten(cache: torch.Tensor, tables: torch.Tensor, lens: list[int]) -> torch.Tensor:
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


def qkv_views(
    T: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv, q, k, v): one fused qkv GEMM output [T, (Hq + 2 * Hkv) * D] and its [T, H, D] views."""
    Hq, Hkv, D = num_q_heads, num_kv_heads, head_dim
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=device, dtype=dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    return qkv, q, k, v


def out_rows(
    T: int, num_q_heads: int, head_dim: int, first: int, spare: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): a NaN [first + T + spare, Hq * D] buffer and its rows first..first+T as [T, Hq, D],
    the way a nano-batch writes its slice of the whole batch's attention output."""
    buf = torch.full((first + T + spare, num_q_heads * head_dim), float("nan"), device=device, dtype=dtype)
    return buf, buf[first : first + T].view(T, num_q_heads, head_dim)


def fp8_and_widened(lens: list[int], num_kv_heads: int, head_dim: int, qdtype: torch.dtype):
    """An fp8 cache (unwritten slots poisoned with NaN bytes), the same values widened to qdtype
    (unwritten slots clean), and the page tables: the two caches the eager paths must agree on."""
    k_cache, v_cache, tables = paged_cache(lens, num_kv_heads, head_dim, torch.float32, "cpu")
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    kw, vw = k8.to(qdtype), v8.to(qdtype)
    return poison_unwritten(k8, tables, lens), poison_unwritten(v8, tables, lens), kw, vw, tables
