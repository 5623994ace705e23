"""The engine's options as the user gives them, and their command-line flags (one definition for
`generate`, `serve`, `bench` and `tune`). Ground floor: imports neither torch nor transformers, so a parser
builds at once; `nanoflow.config.EngineConfig.from_args` resolves these into what the engine runs with.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineArgs:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 1024
    # None: 2048 on a GPU, 512 on the CPU.
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
    # True: plain PyTorch reference ops, no CUDA graphs (the bench's "sequential" baseline). False:
    # Triton kernels and CUDA graphs where a CUDA device is present; the CPU always runs eagerly.
    enforce_eager: bool = False
    # Largest iteration (in tokens) replayed from a CUDA graph; None: the token budget, so full
    # dense iterations are graphs too; 0: no graphs.
    cuda_graph_max_tokens: int | None = None
    # The iteration sizes (tokens) captured as CUDA graphs, as vLLM's --cuda-graph-sizes; each batch
    # replays the smallest that fits (and pads acceptably). None: powers of two and steps up to 512,
    # then every 1/16 of an octave (executor.cuda_graph.token_buckets). Sizes past cuda_graph_max_tokens are
    # dropped; that largest size is always captured.
    cuda_graph_sizes: tuple[int, ...] | None = None
    tensor_parallel_size: int = 1
    # Tensor parallel: the most CTAs each NCCL collective takes (NCCL_MAX_CTAS, set before the
    # communicator exists, on every rank), so an all-reduce overlapped with the other nano-batch's
    # GEMMs (a network-overlap pipeline) leaves them most of the SMs. None: NCCL's own choice.
    nccl_max_ctas: int | None = None
    # Tensor parallel on GPUs: "nccl" (NCCL's all-reduce) or "symm-mem" (torch's symmetric-memory
    # two-shot all-reduce: peer-to-peer loads over NVLink, no multicast), for a step's all-reduces
    # up to the token budget's size; larger ones stay on NCCL.
    all_reduce: str = "nccl"
    # Mixture of experts under tensor parallel (vLLM's --enable-expert-parallel): each rank holds
    # num_local_experts / tensor_parallel_size whole experts instead of a slice of every expert;
    # attention stays tensor-parallel. A no-op with one rank; an error for a model without experts.
    enable_expert_parallel: bool = False
    # "auto": the model dtype; "fp8" (alias "fp8_e4m3"): float8_e4m3fn, half the bytes of bf16, so
    # twice the tokens fit in the same memory and decode attention reads half the bytes.
    kv_cache_dtype: str = "auto"
    # NanoFlow's nano-batch pipeline: "auto" (the one `nanoflow tune` cached for this GPU, model,
    # dtype, TP size and token budget, else sequential), "off" (sequential) or a pipeline JSON path.
    pipeline: str = "auto"


# The options add_engine_args defines (the model is named per command).
_FLAG_FIELDS = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "admission_output_tokens", "num_kv_pages", "gpu_memory_utilization", "kv_cache_dtype",
                "cuda_graph_max_tokens", "cuda_graph_sizes", "tensor_parallel_size", "nccl_max_ctas", "all_reduce",
                "enable_expert_parallel", "seed", "tokenizer", "skip_tokenizer_init", "enforce_eager", "pipeline")


def add_engine_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, positional_model: bool = True) -> None:
    """The EngineArgs flags, shared by generate, serve, bench and tune (the last two name their model
    with --model / --dummy instead of the positional argument)."""
    if positional_model:
        p.add_argument("model", nargs="?", default=None,
                       help="Hugging Face model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | "
                   "float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="dense token budget per iteration (default 2048 on GPU, 512 on CPU)")
    p.add_argument("--admission-output-tokens", type=int, default=1024,
                   help="admission projects each request to prompt + min(max_tokens, this) tokens")
    p.add_argument("--num-kv-pages", type=int, default=None, help="KV pool size in 16-token pages")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="KV cache storage: auto (the model dtype) | fp8 (e4m3, scale 1: twice the tokens)")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=None,
                   help="largest iteration replayed from a CUDA graph (default: the token budget; 0: none)")
    p.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="iteration sizes (tokens) captured as CUDA graphs (default: 1-512 in small steps, then "
                   "every 1/16 of an octave (32 tokens to 1,024, 64 to 2,048, ...) up to --cuda-graph-max-tokens, "
                   "which is always captured)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over")
    p.add_argument("--nccl-max-ctas", type=int, default=None,
                   help="tensor parallel: the most CTAs each NCCL collective takes (NCCL_MAX_CTAS), leaving the "
                   "rest of the SMs to the GEMMs a network-overlap pipeline runs beside it")
    p.add_argument("--all-reduce", default="nccl", choices=("nccl", "symm-mem"),
                   help="tensor parallel on GPUs: nccl | symm-mem (torch symmetric memory, peer-to-peer over "
                   "NVLink, no multicast) for the all-reduces of a step")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="mixture-of-experts models under --tensor-parallel-size N: each rank holds 1/N of the "
                   "experts whole instead of 1/N of every expert (attention stays tensor-parallel)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (and, in bench, the prompts and weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: prompts are token ids and outputs carry token ids only")
    p.add_argument("--pipeline", default="auto",
                   help="nano-batch pipeline: auto (tuned by `nanoflow tune` for this GPU and model if cached, "
                   "else sequential) | off | PATH to a pipeline JSON")
    p.add_argument("--enforce-eager", action="store_true",
                   help="PyTorch reference ops and no CUDA graphs (the CPU always runs eagerly)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineArgs fields that add_engine_args defined, besides the model."""
    return {n: getattr(args, n) for n in _FLAG_FIELDS}


def engine_args_from_cli(args: argparse.Namespace, model: str) -> EngineArgs:
    return EngineArgs(model=model, **engine_kwargs(args))
