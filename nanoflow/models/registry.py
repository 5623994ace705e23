"""Architecture name -> model class. Llama, Mistral and Qwen2 differ only in config details
(biases, sliding window), which ModelArch captures; Mixtral swaps the FFN for its MoE."""

from __future__ import annotations

from torch import nn

from nanoflow.model_arch import SUPPORTED_ARCHITECTURES, ModelArch
from nanoflow.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def model_class(arch: ModelArch) -> type[nn.Module]:
    return MODELS[arch.architecture]
