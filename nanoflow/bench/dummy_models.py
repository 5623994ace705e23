"""Published model shapes for benchmarks with random weights.

Each entry is the model's config.json as published on the Hugging Face Hub (typed in, nothing is
downloaded). The bench writes it to a folder and runs the engine with load_format="dummy": the
arithmetic (and so the throughput) is the real model's, only the weight values are random.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_cache": True,
}

DUMMY_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": {
        **_LLAMA_COMMON,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": {
        **_LLAMA_COMMON,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
        "vocab_size": 32000,
    },
    # Qwen/Qwen2-7B-Instruct
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    },
    # meta-llama/Llama-2-70b-hf
    "llama2-70b": {
        **_LLAMA_COMMON,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "max_position_embeddings": 4096,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
        "vocab_size": 32000,
    },
}


def dummy_model_dir(name: str, root: str | None = None) -> str:
    """Writes the named config.json into `root/<name>` (default: a folder under the system temp dir)
    and returns that folder, ready for LLM(model=..., load_format="dummy")."""
    if name not in DUMMY_CONFIGS:
        raise ValueError(f"unknown dummy model {name!r}; choose one of {', '.join(DUMMY_CONFIGS)}")
    folder = os.path.join(root or os.path.join(tempfile.gettempdir(), "nanoflow-dummy-models"), name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    # Write-then-rename: two benches starting together never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(DUMMY_CONFIGS[name], f, indent=2)
    os.replace(tmp, path)
    return folder
