"""Kernel tests run the Triton kernels on the GPU when there is one, else in Triton's interpreter
on the CPU (tiny shapes, fp32: the interpreter's fp32->bf16 cast truncates instead of rounding)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch

# Triton picks compiled vs interpreted when each @triton.jit runs, its own library's included, so
# this must happen before triton is first imported.
_LATE_IMPORT = ""
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules:
        import triton.language as tl

        if type(tl.cdiv).__name__ == "JITFunction":
            _LATE_IMPORT = (
                "triton was imported before TRITON_INTERPRET=1 was set (another test folder imported "
                "nanoflow first): set it in tests/conftest.py, or run tests/kernels on its own"
            )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    if _LATE_IMPORT:
        pytest.fail(_LATE_IMPORT)
    torch.manual_seed(0)


@pytest.fixture
def assert_rel() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    """Every element written (finite) and ||out - ref|| / ||ref|| under the dtype's tolerance."""

    def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
        assert out.shape == ref.shape
        assert torch.isfinite(out).all(), "some outputs were not written (NaN poison left)"
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < REL_TOL[dtype], f"relative error {err:.3g} >= {REL_TOL[dtype]}"

    return check
