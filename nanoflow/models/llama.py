"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, and Mixtral with its MoE FFN).

A layer is a flat sequence of named ops: attn_norm, qkv, rope_kv_write, attention, o, (all-reduce),
ffn_norm, ffn (gate_up -> act -> down, or route -> experts), (all-reduce). The sequential runner
calls `forward`; a scheduler that splits the batch can call the same ops on each part.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.attention import PagedAttention
from nanoflow.layers.embedding import LMHead, VocabParallelEmbedding
from nanoflow.layers.linear import CheckpointTensor, ColumnParallelLinear, RowParallelLinear
from nanoflow.layers.mlp import GatedMLP, MixtureOfExperts
from nanoflow.layers.norm import RMSNorm
from nanoflow.layers.parallel import ParallelState
from nanoflow.layers.rotary import cos_sin_table
from nanoflow.models.arch import ModelArch

KVCache = tuple[torch.Tensor, torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, par: ParallelState, use_triton: bool) -> None:
        super().__init__()
        H, hd = arch.hidden_size, arch.head_dim
        self.par = par
        self.input_layernorm = RMSNorm(H, arch.rms_norm_eps, dtype, use_triton)
        self.qkv_proj = ColumnParallelLinear(
            H, {"q": arch.num_heads * hd, "k": arch.num_kv_heads * hd, "v": arch.num_kv_heads * hd},
            arch.qkv_bias, dtype, par)
        self.attn = PagedAttention(par.split(arch.num_heads, "num_attention_heads"),
                                   par.split(arch.num_kv_heads, "num_key_value_heads"), hd, arch.sliding_window,
                                   use_triton)
        self.o_proj = RowParallelLinear(arch.num_heads * hd, H, arch.o_bias, dtype, par)
        self.post_attention_layernorm = RMSNorm(H, arch.rms_norm_eps, dtype, use_triton)
        if arch.is_moe:
            self.mlp: nn.Module = MixtureOfExperts(H, arch.intermediate_size, arch.num_experts,
                                                   arch.experts_per_token, dtype, par, use_triton)
        else:
            self.mlp = GatedMLP(H, arch.intermediate_size, dtype, par, use_triton)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, cos_sin: torch.Tensor,
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(h, residual)
        q = self.attn.rope_kv_write(self.qkv_proj(x), batch, cos_sin, kv)
        h = self.par.all_reduce(self.o_proj(self.attn(q, batch, kv)))
        x, residual = self.post_attention_layernorm(h, residual)
        h = self.par.all_reduce(self.mlp(x))
        return h, residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, arch: ModelArch, dtype: torch.dtype, max_positions: int, par: ParallelState | None = None,
        use_triton: bool = False,
    ) -> None:
        super().__init__()
        par = par or ParallelState()
        self.arch = arch
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype, par)
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, par, use_triton) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, use_triton)
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype, par)
        self.register_buffer("cos_sin", cos_sin_table(arch.head_dim, arch.rope, max_positions,
                                                      self.embed_tokens.weight.device), persistent=False)

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        """Returns the final hidden states [T, H] of every token in the flat batch."""
        h, residual = self.embed_tokens(batch.input_ids), None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, batch, self.cos_sin, kv)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # --- checkpoint loading -------------------------------------------------------------------
    _LAYER_MAP = {
        "self_attn.q_proj": ("qkv_proj", "q"),
        "self_attn.k_proj": ("qkv_proj", "k"),
        "self_attn.v_proj": ("qkv_proj", "v"),
        "self_attn.o_proj": ("o_proj", None),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
        "mlp.down_proj": ("mlp.down_proj", None),
        "input_layernorm": ("input_layernorm", None),
        "post_attention_layernorm": ("post_attention_layernorm", None),
        "block_sparse_moe.gate": ("mlp.router", None),
        "mlp.gate": ("mlp.router", None),
    }
    _EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
    _FUSED_EXPERTS = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)")

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> None:
        """Loads checkpoint tensors by their transformers names; raises on unknown or missing ones.
        Each layer copies only this rank's part of a tensor (a LazyTensor reads only that part)."""
        for p in self.parameters():
            p.data.fill_(float("nan"))  # anything still NaN afterwards was missing from the checkpoint
        for name, tensor in weights:
            self._load_one(name, tensor)
        for pname, p in self.named_parameters():
            if torch.isnan(p).any():
                raise ValueError(f"checkpoint is missing weights for parameter {pname!r}")

    def _load_one(self, name: str, tensor: CheckpointTensor) -> None:
        if name.endswith("rotary_emb.inv_freq"):
            return
        if name == "model.embed_tokens.weight":
            self.embed_tokens.load(name, tensor)
            if self.arch.tie_word_embeddings:
                self.lm_head.load(name, tensor)
            return
        if name == "lm_head.weight":
            if not self.arch.tie_word_embeddings:
                self.lm_head.load(name, tensor)
            return
        if name == "model.norm.weight":
            self.norm.load(name, tensor)
            return
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None or int(m.group(1)) >= len(self.layers):
            raise ValueError(f"unexpected tensor {name!r} in checkpoint for {self.arch.architecture}")
        layer, rest = self.layers[int(m.group(1))], m.group(2)
        if self.arch.is_moe and (e := self._EXPERT.fullmatch(rest)):
            layer.mlp.load_expert(int(e.group(1)), e.group(2), tensor)
            return
        if self.arch.is_moe and (f := self._FUSED_EXPERTS.fullmatch(rest)):
            # transformers >= 5 in-memory layout: gate_up [E, 2I, H] (gate first), down [E, H, I]
            for e in range(tensor.shape[0]):
                if f.group(1) == "down_proj":
                    layer.mlp.load_expert(e, "w2", tensor[e])
                else:
                    half = tensor.shape[1] // 2
                    layer.mlp.load_expert(e, "w1", tensor[e].narrow(0, 0, half))
                    layer.mlp.load_expert(e, "w3", tensor[e].narrow(0, half, half))
            return
        module_name, _, param = rest.rpartition(".")
        if module_name not in self._LAYER_MAP or param not in ("weight", "bias"):
            raise ValueError(f"unexpected tensor {name!r} in checkpoint for {self.arch.architecture}")
        target, shard = self._LAYER_MAP[module_name]
        layer.get_submodule(target).load(param, tensor, shard)
