"""The engine's configuration, resolved once at the edge into one frozen object.

`EngineConfig.from_args` takes the user's `EngineArgs`, reads the checkpoint's config.json, checks
every value (a ValueError names the field) and fixes what "auto" and None mean on this machine.
Everything below the entrypoints reads this object; nothing changes it afterwards (a tensor-parallel
rank gets its own copy through `for_device`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.engine_args import EngineArgs
from nanoflow.model_arch import ModelArch, load_hf_config

PAGE_SIZE = 16


def pages_for(num_tokens: int) -> int:
    """KV pages that hold num_tokens tokens."""
    return -(-num_tokens // PAGE_SIZE)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# The KV cache's storage types besides "auto" (the model dtype). K and V are cast on store and read
# back in the model dtype, so the model and its activations never see fp8.
# The per-tensor KV scale is 1.0 (K and V are stored as they are, no multiply), which is vLLM's
# default when a checkpoint ships no KV scales: e4m3 rounds with the same relative error (<= 1/16,
# 3 mantissa bits) over its whole normal range (2^-6 .. 448), and post-RoPE K and V of common
# models typically sit inside it, so a scale would only matter at the edges; values beyond +-448
# saturate, as in vLLM. A calibrated scale would need calibration data the engine does not have.
_KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class EngineConfig:
    args: EngineArgs  # as the user gave them
    hf_config: Any  # transformers' PretrainedConfig of the checkpoint
    arch: ModelArch
    max_model_len: int
    device: torch.device
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype  # the model dtype, or fp8 (kernels widen on load)
    # Plain PyTorch reference ops and no CUDA graphs: asked for, or no GPU to run the kernels on.
    enforce_eager: bool
    max_num_batched_tokens: int
    cuda_graph_max_tokens: int  # 0: no graphs
    # the graph sizes asked for, within (0, cuda_graph_max_tokens] and with it; None: the defaults
    cuda_graph_sizes: tuple[int, ...] | None
    # Whole experts per rank (asked for, with more than one rank: on one rank it would change nothing)
    expert_parallel: bool

    @property
    def model(self) -> str:
        return self.args.model

    @property
    def max_num_seqs(self) -> int:
        return self.args.max_num_seqs

    @property
    def tensor_parallel_size(self) -> int:
        return self.args.tensor_parallel_size

    @property
    def seed(self) -> int:
        return self.args.seed

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineConfig:
        """Validates the user's values and picks concrete dtype/device/sizes; raises ValueError naming the field."""
        _check_args(args)
        hf_config = load_hf_config(args.model)
        arch = ModelArch.from_hf(hf_config)
        max_model_len = args.max_model_len or arch.max_position_embeddings
        if max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings "
                             f"({arch.max_position_embeddings})")
        device = resolve_device(args.device)
        on_gpu = device.type == "cuda"
        dtype = resolve_dtype(args.dtype, _checkpoint_dtype(hf_config), device)
        enforce_eager = args.enforce_eager or not on_gpu
        if args.all_reduce == "symm-mem" and not on_gpu:
            raise ValueError("all_reduce='symm-mem' needs CUDA GPUs (symmetric memory over NVLink); use 'nccl'")
        budget = args.max_num_batched_tokens or (2048 if on_gpu else 512)
        graph_tokens = budget if args.cuda_graph_max_tokens is None else min(args.cuda_graph_max_tokens, budget)
        if args.enable_expert_parallel and not arch.is_moe:
            raise ValueError(f"enable_expert_parallel needs a mixture-of-experts model; {arch.architecture} at "
                             f"{args.model!r} has no experts")
        graph_tokens = 0 if enforce_eager else graph_tokens
        return cls(args, hf_config, arch, max_model_len, device, dtype,
                   _resolve_kv_cache_dtype(args.kv_cache_dtype, dtype, device, enforce_eager),
                   enforce_eager, budget, graph_tokens, graph_sizes(args.cuda_graph_sizes, graph_tokens),
                   args.enable_expert_parallel and args.tensor_parallel_size > 1)

    def for_device(self, device: torch.device) -> EngineConfig:
        """This configuration on another device (a tensor-parallel rank's own GPU)."""
        return dataclasses.replace(self, device=device)


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's 16-bit dtype (bf16 when it has none) on a GPU, fp32 on the CPU, where
    bf16 matmuls are slow and would break the exactness tests."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of 'auto', {', '.join(sorted(set(DTYPES)))}; got {name!r}")
    return DTYPES[name]


def _resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device, enforce_eager: bool) -> torch.dtype:
    if name == "auto":
        return dtype
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of 'auto', {', '.join(_KV_CACHE_DTYPES)}; got {name!r}")
    if not enforce_eager and torch.cuda.get_device_capability(device) < (8, 9):
        # Triton converts float8e4nv with instructions of sm89 and later only.
        raise ValueError(f"kv_cache_dtype={name!r} needs a GPU of compute capability >= 8.9 "
                         "(Ada, Hopper) for the Triton kernels; use enforce_eager=True or kv_cache_dtype='auto'")
    return _KV_CACHE_DTYPES[name]


def graph_sizes(asked: Sequence[int] | None, graph_tokens: int) -> tuple[int, ...] | None:
    """The CUDA graph sizes to capture: those asked for up to the largest graph, and it; None for
    the defaults, or when there are no graphs."""
    if asked is None or not graph_tokens:
        return None
    return tuple(sorted({n for n in asked if n < graph_tokens} | {graph_tokens}))


def _check_args(args: EngineArgs) -> None:
    for name in ("max_num_seqs", "admission_output_tokens", "tensor_parallel_size"):
        _positive(name, getattr(args, name))
    for name in ("max_num_batched_tokens", "max_model_len", "num_kv_pages"):
        if getattr(args, name) is not None:
            _positive(name, getattr(args, name))
    graph_tokens = args.cuda_graph_max_tokens
    if graph_tokens is not None and (not isinstance(graph_tokens, int) or isinstance(graph_tokens, bool)
                                     or graph_tokens < 0):
        raise ValueError(f"cuda_graph_max_tokens must be a non-negative integer, got {graph_tokens!r}")
    sizes = args.cuda_graph_sizes
    if sizes is not None and (not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0
                                               for n in sizes)):
        raise ValueError(f"cuda_graph_sizes must be positive integers (tokens), got {sizes!r}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {args.load_format!r}")
    if args.all_reduce not in ("nccl", "symm-mem"):
        raise ValueError(f"all_reduce must be 'nccl' or 'symm-mem', got {args.all_reduce!r}")


def _checkpoint_dtype(hf_config) -> torch.dtype | None:
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
