"""The model shape our code needs, read from a checkpoint's config.json through transformers and checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")


def load_hf_config(path: str) -> PretrainedConfig:
    if not os.path.isdir(path):
        raise ValueError(f"model folder {path!r} does not exist (nanoflow loads local Hugging Face folders; "
                         "nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} has no config.json; expected a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from e


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self) -> int:
        """Parameter count (embedding and LM head counted separately when untied)."""
        H, hd = self.hidden_size, self.head_dim
        attn = H * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * H
        ffn = 3 * H * self.intermediate_size * max(1, self.num_experts) + H * self.num_experts
        emb = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + ffn + 2 * H) + emb + H

    def active_parameters(self) -> int:
        """Parameters one token passes through (MoE: only its top-k experts)."""
        if not self.is_moe:
            return self.num_parameters()
        idle = self.num_experts - self.experts_per_token
        return self.num_parameters() - self.num_layers * idle * 3 * self.hidden_size * self.intermediate_size

    def padding_row_cost(self) -> float:
        """The GEMM work of a row that pads a batch up to a CUDA graph's size, as a fraction of a real
        token's: a MoE layer routes padding rows to no expert (fused_moe), so they cost only the dense
        projections (Mixtral-8x7B: 0.13); a dense model pays in full."""
        if not self.is_moe:
            return 1.0
        experts = self.num_layers * self.experts_per_token * 3 * self.hidden_size * self.intermediate_size
        return 1.0 - experts / self.active_parameters()

    @classmethod
    def from_hf(cls, cfg: PretrainedConfig) -> ModelArch:
        archs = list(getattr(cfg, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.model_type!r}; nanoflow supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {arch}; only 'silu' is implemented")
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        num_heads = cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv})")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        window = getattr(cfg, "sliding_window", None)
        if arch == "Qwen2ForCausalLM" and not getattr(cfg, "use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope=_rope_parameters(cfg),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False)),
            o_bias=arch == "LlamaForCausalLM" and bool(getattr(cfg, "attention_bias", False)),
            sliding_window=window,
            num_experts=int(getattr(cfg, "num_local_experts", 0) or 0) if arch == "MixtralForCausalLM" else 0,
            experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0),
        )


def _rope_parameters(cfg: PretrainedConfig) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta + rope_scaling."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope
