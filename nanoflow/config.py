"""Engine configuration: one typed dataclass, validated once where the user hands it in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAGE_SIZE = 16

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


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 1024
    max_num_batched_tokens: int | None = None
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    tokenizer: str | None = None
    # Benchmarks on random-weight models have no tokenizer: token ids in and out, text stays empty.
    skip_tokenizer_init: bool = False
    # "auto" reads safetensors; "dummy" builds random weights from config.json alone (benchmarks).
    load_format: str = "auto"
    # Admission projects each request to prompt + min(max_tokens, this) tokens (NanoFlow section 4);
    # a wrong guess is repaired by preemption, so this trades admission for preemptions.
    admission_output_tokens: int = 1024
    # True: plain PyTorch reference ops, no CUDA graphs (the "sequential" baseline of the bench).
    # False: Triton kernels and CUDA graphs where a CUDA device is present; the CPU is always eager.
    enforce_eager: bool = False
    # Largest iteration (in tokens) replayed from a CUDA graph on the fast path; None: the token
    # budget, so full dense iterations are graphs too; 0: no graphs.
    cuda_graph_max_tokens: int | None = None
    tensor_parallel_size: int = 1
    # "auto": the model dtype; "fp8" (alias "fp8_e4m3"): float8_e4m3fn, half the bytes of bf16, so
    # twice the tokens fit in the same memory and decode attention reads half the bytes.
    kv_cache_dtype: str = "auto"
    # Filled in by resolve(): the concrete torch objects the engine runs with.
    torch_dtype: torch.dtype = field(default=torch.float32, init=False)
    torch_kv_cache_dtype: torch.dtype = field(default=torch.float32, init=False)
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"), init=False)

    @property
    def use_fast_path(self) -> bool:
        return self.torch_device.type == "cuda" and not self.enforce_eager

    def resolve(self, checkpoint_dtype: torch.dtype | None) -> EngineConfig:
        """Validate the user's values and pick concrete dtype/device; raises ValueError naming the field."""
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError("device='cuda' was requested but no CUDA device is visible")
            self.torch_device = torch.device(self.device)
        on_gpu = self.torch_device.type == "cuda"
        if self.dtype == "auto":
            # fp32 on the CPU: bf16 matmuls there are slow and would break exactness tests.
            self.torch_dtype = (checkpoint_dtype or torch.bfloat16) if on_gpu else torch.float32
            if self.torch_dtype == torch.float32 and on_gpu:
                self.torch_dtype = torch.bfloat16
        elif self.dtype in DTYPES:
            self.torch_dtype = DTYPES[self.dtype]
        else:
            raise ValueError(f"dtype must be one of 'auto', {', '.join(sorted(set(DTYPES)))}; got {self.dtype!r}")
        self.torch_kv_cache_dtype = self._resolve_kv_cache_dtype()
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if on_gpu else 512
        if self.cuda_graph_max_tokens is None:
            self.cuda_graph_max_tokens = self.max_num_batched_tokens
        graph_tokens = self.cuda_graph_max_tokens
        if not isinstance(graph_tokens, int) or isinstance(graph_tokens, bool) or graph_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be a non-negative integer, got {graph_tokens!r}")
        self.cuda_graph_max_tokens = min(self.cuda_graph_max_tokens, self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("admission_output_tokens", self.admission_output_tokens)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_kv_pages is not None:
            _positive("num_kv_pages", self.num_kv_pages)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        return self

    def _resolve_kv_cache_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of 'auto', {', '.join(_KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.use_fast_path and torch.cuda.get_device_capability(self.torch_device) < (8, 9):
            # Triton converts float8e4nv with instructions of sm89 and later only.
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs a GPU of compute capability >= 8.9 "
                             "(Ada, Hopper) for the Triton kernels; use enforce_eager=True or kv_cache_dtype='auto'")
        return _KV_CACHE_DTYPES[self.kv_cache_dtype]


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
