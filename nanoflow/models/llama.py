"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, and Mixtral with its MoE FFN).

Each decoder layer publishes its ops as data (`DecoderLayer.make_ops`): input_norm, qkv,
rope_kv_write, decode_attention, prefill_attention, o, [attn_all_reduce], post_attention_norm,
gate_up, act, down (MoE: route, experts), [ffn_all_reduce]. The ops read and write rows of the
iteration's activation buffers (`LlamaForCausalLM.buffers`), so the same ops run over the whole
batch or over nano-batches; `forward` walks them in order, or as a pipeline schedules them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import nn

from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.attention import (
    AttentionShape,
    DecodeAttention,
    KVCache,
    PrefillAttention,
    RopeKVWrite,
)
from nanoflow.layers.embedding import LMHead, VocabParallelEmbedding
from nanoflow.layers.linear import CheckpointTensor, ColumnParallelLinear, RowParallelLinear
from nanoflow.layers.mlp import GatedMLP, MixtureOfExperts
from nanoflow.layers.norm import RMSNorm
from nanoflow.layers.op import KV, Buffers, Op, Walk, run_sequential
from nanoflow.layers.parallel import ParallelState
from nanoflow.layers.rotary import cos_sin_table
from nanoflow.model_arch import ModelArch


def layer_op_names(moe: bool, tensor_parallel: bool) -> list[str]:
    """The names DecoderLayer.make_ops publishes, in its order, without building a layer: for
    pipelines made by hand (benchmarks/make_pipeline.py) and for tests (a test holds the two equal)."""
    ffn = ["route", "experts"] if moe else ["gate_up", "act", "down"]
    reduce = (["attn_all_reduce"], ["ffn_all_reduce"]) if tensor_parallel else ([], [])
    return ["input_norm", "qkv", "rope_kv_write", "decode_attention", "prefill_attention", "o", *reduce[0],
            "post_attention_norm", *ffn, *reduce[1]]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, par: ParallelState, enforce_eager: bool) -> None:
        super().__init__()
        H, hd = arch.hidden_size, arch.head_dim
        self.par, self.enforce_eager = par, enforce_eager
        self.input_layernorm = RMSNorm(H, arch.rms_norm_eps, dtype, enforce_eager)
        self.qkv_proj = ColumnParallelLinear(
            H, {"q": arch.num_heads * hd, "k": arch.num_kv_heads * hd, "v": arch.num_kv_heads * hd},
            arch.qkv_bias, dtype, par)
        shape = AttentionShape(par.split(arch.num_heads, "num_attention_heads"),
                               par.split(arch.num_kv_heads, "num_key_value_heads"), hd, arch.sliding_window)
        self.rope_kv_write = RopeKVWrite(shape, enforce_eager)
        self.decode_attention = DecodeAttention(shape, enforce_eager)
        self.prefill_attention = PrefillAttention(shape, enforce_eager)
        self.o_proj = RowParallelLinear(arch.num_heads * hd, H, arch.o_bias, dtype, par)
        self.post_attention_layernorm = RMSNorm(H, arch.rms_norm_eps, dtype, enforce_eager)
        if arch.is_moe:
            self.mlp: nn.Module = MixtureOfExperts(H, arch.intermediate_size, arch.num_experts,
                                                   arch.experts_per_token, dtype, par, enforce_eager)
        else:
            self.mlp = GatedMLP(H, arch.intermediate_size, dtype, par, enforce_eager)

    def make_ops(self, kv: KVCache, cos_sin: torch.Tensor, first: bool) -> tuple[Op, ...]:
        """This layer's ops in order, bound to its KV cache. The residual stream enters in `residual`
        (the first layer's: the embeddings) plus `hidden` (the previous layer's output) and leaves the same way."""
        ops = [
            Op("input_norm", "memory", partial(self._input_norm, first=first), ("hidden", "residual"),
               ("x", "residual")),
            Op("qkv", "compute", lambda b, t, n: self.qkv_proj(t["x"], t["qkv"], self._gemm_cap(n)), ("x",), ("qkv",)),
            Op("rope_kv_write", "memory", lambda b, t, n: self.rope_kv_write(t["qkv"], b, cos_sin, kv), ("qkv",),
               ("qkv", KV)),
            Op("decode_attention", "memory", lambda b, t, n: self.decode_attention(t["qkv"], b, kv, t["attn"], n),
               ("qkv", KV), ("attn@decode",)),
            Op("prefill_attention", "compute",
               lambda b, t, n: self.prefill_attention(t["qkv"], b, kv, t["attn"], n), ("qkv", KV),
               ("attn@prefill",)),
            Op("o", "compute", lambda b, t, n: self.o_proj(t["attn"], t["hidden"], self._gemm_cap(n)), ("attn",),
               ("hidden",)),
            *self._all_reduce("attn_all_reduce"),
            Op("post_attention_norm", "memory",
               lambda b, t, n: self.post_attention_layernorm.add_norm(t["hidden"], t["residual"], t["x"]),
               ("hidden", "residual"), ("x", "residual")),
        ]
        if isinstance(self.mlp, MixtureOfExperts):
            moe = self.mlp
            ops += [
                # padding rows of a graph's bucket (slot -1) are routed to no expert
                Op("route", "compute",
                   lambda b, t, n: moe.route(t["x"], t["topk_weights"], t["topk_ids"], b.slot_mapping),
                   ("x",), ("topk_weights", "topk_ids")),
                Op("experts", "compute",
                   lambda b, t, n: moe.experts(t["x"], t["topk_weights"], t["topk_ids"], t["hidden"]),
                   ("x", "topk_weights", "topk_ids"), ("hidden",)),
            ]
        else:
            mlp = self.mlp
            ops += [
                Op("gate_up", "compute", lambda b, t, n: mlp.gate_up(t["x"], t["gate_up"], self._gemm_cap(n)), ("x",),
                   ("gate_up",)),
                Op("act", "memory", lambda b, t, n: mlp.act(t["gate_up"], t["act"]), ("gate_up",), ("act",)),
                Op("down", "compute", lambda b, t, n: mlp.down(t["act"], t["hidden"], self._gemm_cap(n)), ("act",),
                   ("hidden",)),
            ]
        return (*ops, *self._all_reduce("ffn_all_reduce"))

    def _gemm_cap(self, num_ctas: int | None) -> int | None:
        # the eager path (PyTorch reference ops) leaves every GEMM to cuBLAS / the CPU
        return None if self.enforce_eager else num_ctas

    def _input_norm(self, batch: ForwardBatch, t: Buffers, num_ctas: int | None, first: bool) -> None:
        if first:
            self.input_layernorm(t["residual"], t["x"])
        else:
            self.input_layernorm.add_norm(t["hidden"], t["residual"], t["x"])

    def _all_reduce(self, name: str) -> list[Op]:
        if self.par.size == 1:
            return []
        return [Op(name, "network", lambda b, t, n: self.par.all_reduce(t["hidden"]), ("hidden",), ("hidden",))]


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, arch: ModelArch, dtype: torch.dtype, max_positions: int, par: ParallelState | None = None,
        enforce_eager: bool = True,
    ) -> None:
        super().__init__()
        par = par or ParallelState()
        self.arch, self.dtype = arch, dtype
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype, par)
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, par, enforce_eager) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, enforce_eager)
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype, par)
        self.register_buffer("cos_sin", cos_sin_table(arch.head_dim, arch.rope, max_positions,
                                                      self.embed_tokens.weight.device), persistent=False)
        self.layer_ops: list[tuple[Op, ...]] = []  # bind_kv_caches builds them

    def bind_kv_caches(self, kv_caches: Sequence[KVCache]) -> None:
        """Gives each layer its KV cache (the runner owns the tensors) and builds the layers' ops
        over them once: `layer_ops`, what the forward and any pipeline walk. An empty list unbinds."""
        if not kv_caches:
            self.layer_ops = []
            return
        self.layer_ops = [layer.make_ops(kv, self.cos_sin, i == 0)
                          for i, (layer, kv) in enumerate(zip(self.layers, kv_caches, strict=True))]

    def prepare(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with the attention ops' metadata (every layer's attention reads the same)."""
        layer = self.layers[0]
        return layer.prefill_attention.metadata(layer.decode_attention.metadata(batch))

    def prefill_tile_capacity(self, num_tokens: int, spare: int) -> int:
        """Prefill tiles that a batch of num_tokens tokens with up to `spare` prefill chunks needs."""
        return self.layers[0].prefill_attention.tile_capacity(num_tokens, spare)

    def buffers(self, batch: ForwardBatch) -> Buffers:
        """The iteration's activation buffers, [T, width] each; `residual` starts as the embeddings."""
        T, H, dev = batch.num_tokens, self.arch.hidden_size, self.embed_tokens.weight.device
        layer = self.layers[0]
        empty = partial(torch.empty, device=dev, dtype=self.dtype)
        bufs = {"residual": self.embed_tokens(batch.input_ids), "hidden": empty(T, H), "x": empty(T, H),
                "qkv": empty(T, layer.qkv_proj.weight.shape[0]), "attn": empty(T, layer.o_proj.weight.shape[1])}
        if isinstance(layer.mlp, MixtureOfExperts):
            k = layer.mlp.top_k
            bufs |= {"topk_weights": empty(T, k), "topk_ids": torch.empty(T, k, dtype=torch.int64, device=dev)}
        else:
            gate_up, down = layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight  # this rank's shares
            bufs |= {"gate_up": empty(T, gate_up.shape[0]), "act": empty(T, down.shape[1])}
        return bufs

    def forward(self, batch: ForwardBatch, walk: Walk | None = None) -> torch.Tensor:
        """Returns the final hidden states [T, H] of every token in the flat batch. `walk` runs the
        layers' ops over the buffers (default: in order over the whole batch, which then carries its
        attention metadata, `prepare`); the KV caches are bound (`bind_kv_caches`)."""
        bufs = self.buffers(batch)
        (walk or partial(_walk_whole, batch=batch))(self.layer_ops, bufs)
        return self.norm.add_norm(bufs["hidden"], bufs["residual"])

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


def _walk_whole(layer_ops: Sequence[Sequence[Op]], bufs: Buffers, batch: ForwardBatch) -> None:
    run_sequential(layer_ops, bufs, [batch])
