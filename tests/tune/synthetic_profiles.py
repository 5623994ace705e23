"""Synthetic profiles of a Llama-3-8B-shaped layer on an H200-like GPU (ms per layer), for the
search's tests. OPS mirrors DecoderLayer.make_ops (one GPU, dense FFN). DISJOINT_OPS is the same
table with decode and prefill attention writing different buffers, which is what their rows are
(each writes only its own rows of `attn`): with OPS the executor orders prefill attention after
the decode attention of its nano-batch, which leaves the pipeline nothing to overlap."""

from __future__ import annotations

from typing import Any

OPS = [  # name, resource, reads, writes
    ("input_norm", "memory", ["hidden", "residual"], ["x", "residual"]),
    ("qkv", "compute", ["x"], ["qkv"]),
    ("rope_kv_write", "memory", ["qkv"], ["qkv", "kv"]),
    ("decode_attention", "memory", ["qkv", "kv"], ["attn"]),
    ("prefill_attention", "compute", ["qkv", "kv"], ["attn"]),
    ("o", "compute", ["attn"], ["hidden"]),
    ("post_attention_norm", "memory", ["hidden", "residual"], ["x", "residual"]),
    ("gate_up", "compute", ["x"], ["gate_up"]),
    ("act", "memory", ["gate_up"], ["act"]),
    ("down", "compute", ["act"], ["hidden"]),
]
NAMES = [o[0] for o in OPS]
DISJOINT_OPS = [(n, r, rd, ["attn_prefill_rows"] if n == "prefill_attention" else wr) for n, r, rd, wr in OPS]
# per-layer ms at n rows (dense ops), d decodes or p prefill tokens (attention)
DENSE = {"input_norm": (0.003, 8e-6), "qkv": (0.02, 8e-5), "rope_kv_write": (0.003, 5e-6),
         "o": (0.015, 5e-5), "post_attention_norm": (0.003, 8e-6), "gate_up": (0.05, 3e-4), "act": (0.003, 2e-5),
         "down": (0.03, 1.5e-4)}
DECODE_MS_PER_SEQ, PREFILL_MS_PER_TOKEN = 1e-3, 1e-4
SLOWDOWN = {16: 3.0, 32: 1.6, 44: 1.25, 66: 1.1}  # decode attention capped vs on all SMs


def profile(op_kept: float, attention_kept: float, memory_kept: float | None = None, *,
            sizes: list[int] | None = None, key: dict[str, Any] | None = None, decode_fraction: float = 0.5,
            num_layers: int = 32, ops: list | None = None, fixed_costs: bool = True,
            pairs: bool = True) -> dict[str, Any]:
    """Interference: compute ops keep op_kept of their speed beside capped decode attention, which
    keeps attention_kept; memory ops keep memory_kept (default: op_kept) and the same attention_kept.
    fixed_costs=False drops the dense ops' per-launch term (tiny sizes, where it would dominate)."""
    sizes = sizes or list(range(128, 2049, 128))
    batches = [{"num_tokens": n, "num_decodes": round(n * decode_fraction),
                "prefill_tokens": n - round(n * decode_fraction)} for n in sizes]
    op_ms = {name: [a * fixed_costs + b * n for n in sizes] for name, (a, b) in DENSE.items()}
    op_ms["decode_attention"] = [DECODE_MS_PER_SEQ * b["num_decodes"] for b in batches]
    op_ms["prefill_attention"] = [PREFILL_MS_PER_TOKEN * b["prefill_tokens"] for b in batches]
    capped = {str(c): [f * t for t in op_ms["decode_attention"]] for c, f in SLOWDOWN.items()}
    kept = {"compute": op_kept, "memory": op_kept if memory_kept is None else memory_kept}
    table = {name: {str(c): {"op_kept": kept[res], "attention_kept": attention_kept} for c in SLOWDOWN}
             for name, res, _, _ in ops or DISJOINT_OPS if name != "decode_attention"}
    return {
        "version": 1, "kind": "nanoflow-tune-profile", "device": "synthetic",
        "key": key or {"gpu": "synthetic", "architecture": "LlamaForCausalLM"}, "peak_tflops": None,
        "num_layers": num_layers, "workload": {"context_len": 1024, "decode_fraction": decode_fraction,
                                               "prefill_chunk": 512},
        "ops": [{"name": n, "resource": r, "reads": rd, "writes": wr} for n, r, rd, wr in ops or DISJOINT_OPS],
        "sizes": sizes, "batches": batches, "op_ms": op_ms, "ctas": sorted(SLOWDOWN),
        "decode_attention_capped_ms": capped, "forward_ms": [], "interference": {"pairs": table if pairs else {}},
    }
