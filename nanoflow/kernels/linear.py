"""x @ weight.T (+ bias) on a capped, persistent grid: a GEMM confined to a share of the SMs.

cuBLAS sizes its grid for the whole GPU. Beside a memory-bound kernel capped at a third of the SMs
(decode attention in a nano-batch pipeline, issue 12), a cuBLAS GEMM runs its tiles on the
remaining two thirds in waves sized for all of them, and the last wave leaves SMs idle: on an H200
the GEMMs beside capped decode attention lost more than the overlap gained
(docs/pipeline_history.md). This kernel takes the grid size from its caller (num_ctas, one CTA per SM
when the tiles fill shared memory) and walks the output tiles persistently, GROUP_M row blocks at
a time so a weight tile is reused from L2 by the CTAs that load it together.

`cublas_sms` is the other way to confine a GEMM: cuBLAS itself, told how many SMs to size its grid
for (torch's SM carveout: cuBLASLt's SM-count target), so that beside a kernel holding the other SMs
its tiles run in one wave instead of the two a grid sized for all SMs falls into (pytorch#143988:
GEMMs beside NCCL kernels took up to twice as long).

`linear_ref` is the PyTorch reference (the engine's sequential path).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanoflow.kernels.attention_common import dot_precision, num_sms


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]), into out ([M, N], any row stride) when given."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.matmul(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def carveout_available() -> bool:
    return hasattr(torch._C, "_set_sm_carveout_experimental")


@contextlib.contextmanager
def cublas_sms(num_ctas: int | None, device: torch.device, library: str = "cublaslt") -> Iterator[None]:
    """cuBLAS GEMMs issued inside size their grids for num_ctas SMs (the rest carved out), with
    `library` the preferred BLAS library (torch 2.11 carves out cuBLASLt's GEMMs only; on Hopper the
    target shapes the grid, elsewhere it may only steer the heuristics). Both settings are restored
    after. A CUDA graph captured inside keeps the grids. No cap, no GPU, or a torch without the
    carveout: nothing changes (the GEMM takes the whole GPU)."""
    if num_ctas is None or device.type != "cuda" or not carveout_available():
        yield
        return
    prev_library, prev = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library(library)
    torch._C._set_sm_carveout_experimental(max(0, num_sms(device.index or 0) - num_ctas))
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev)
        torch.backends.cuda.preferred_blas_library(prev_library)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape of the persistent GEMM. None: chosen for the dtype (resolved): 128 x 128 x 64
    tiles, 8 warps, 4 stages for 16-bit inputs (Hopper's wgmma wants 64-row multiples and a deep
    pipeline); half the K step for fp32, whose tiles are twice the bytes."""

    block_m: int = 128
    block_n: int = 128
    block_k: int | None = None
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4

    def resolved(self, elem_size: int) -> GemmConfig:
        return dataclasses.replace(self, block_k=self.block_k or (64 if elem_size <= 2 else 32))


@triton.jit
def _persistent_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(pid, num_m * num_n, nprog):
        # grouped order: GROUP_M row blocks walk the column blocks together (weight tiles from L2)
        first_m = (tile // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_size
        pid_n = (tile % per_group) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows and columns past the edge wrap onto real ones (never stored): no load masks on them
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # [K, N] view of weight [N, K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def persistent_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, num_ctas: int = 1,
                      config: GemmConfig | None = None) -> torch.Tensor:
    """Triton version of linear_ref on a persistent grid of at most num_ctas CTAs. x: [M, K] with a
    contiguous last dim; weight: [N, K] contiguous; out: None or [M, N] with a contiguous last dim
    (e.g. rows of an activation buffer). No host sync: CUDA-graph capturable."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and weight.is_contiguous() and x.stride(-1) == 1
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    assert out.shape == (M, N) and out.stride(-1) == 1
    if M == 0:
        return out
    cfg = (config or GemmConfig()).resolved(x.element_size())
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    _persistent_linear_kernel[(max(1, min(tiles, num_ctas)),)](
        x, weight, bias if bias is not None else out, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % cfg.block_k == 0, PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
