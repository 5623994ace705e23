"""Predicts how a scheduling change would do on the GPU without spending GPU time.

The scheduler's decisions depend only on request lengths, the KV pool size and the token budget,
never on the model's values, so a bench run on the CPU with a tiny model and the GPU run's pool
size reproduces the GPU run's steps exactly (same count, same tokens per step). A GPU bench JSON's
step timeline fits a per-step cost model, GPU ms = a + b * tokens + c * KV tokens read by decode
attention, which then prices the CPU run's steps.

    python benchmarks/simulate_schedule.py --fit benchmarks/results/bench_<gpu run>.json \\
        --workload 512x512 --num-requests 1500 -- --admission-output-tokens 256

Everything after `--` goes to `nanoflow bench` (engine options to try). The pool size and the
token budget default to those of the fitted run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np


def fit(paths: list[str], system: str) -> tuple[float, float, float]:
    """(a ms, b ms per token, c ms per KV token read) by least squares over the steps of `system`
    in the given GPU bench JSONs (one KV dtype: an fp8 cache reads half the bytes per token)."""
    rows = []
    for path in paths:
        tl = json.load(open(path))["systems"].get(system, {}).get("step_timeline")
        if tl:
            rows += zip(tl["tokens"], tl["decode_context_tokens"], tl["gpu_busy_ms"], strict=True)
    x = np.array([(1.0, t, c) for t, c, _ in rows])
    y = np.array([ms for _, _, ms in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    rmse = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
    print(f"cost model from {len(rows)} GPU steps: {coef[0]:.2f} ms + {coef[1] * 1e3:.2f} us/token + "
          f"{coef[2] * 1e6:.1f} us per 1k KV tokens (rmse {rmse:.2f} ms)")
    return float(coef[0]), float(coef[1]), float(coef[2])


def predict(result: dict[str, Any], model: tuple[float, float, float]) -> dict[str, float]:
    a, b, c = model
    s = result["systems"]["nanoflow"]
    tl = s["step_timeline"]
    seconds = sum(a + b * t + c * kv for t, kv in zip(tl["tokens"], tl["decode_context_tokens"], strict=True)) / 1e3
    tokens = s["input_tokens"] + s["output_tokens"]
    return {"steps": len(tl["tokens"]), "gpu_seconds": seconds, "total_tokens_per_s": tokens / seconds,
            "preemptions": s["num_preemptions"]}


def tiny_model(folder: str, max_positions: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                      bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", nargs="+", required=True, help="GPU bench JSON(s) whose step timelines fit the cost")
    p.add_argument("--workload", required=True)
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument("--system", default="nanoflow", help="the engine system of the GPU runs to fit and mimic "
                   "(nanoflow-fp8: also pass -- --kv-cache-dtype fp8)")
    args = p.parse_args(argv)

    model = fit(args.fit, args.system)
    ref = json.load(open(args.fit[0]))["systems"][args.system]
    cfg = ref["engine_config"]
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model(os.path.join(tmp, "tiny"), ref["max_model_len"])
        cmd = [sys.executable, "-m", "nanoflow.cli", "bench", "--model", os.path.join(tmp, "tiny"),
               "--workload", args.workload, "--num-requests", str(args.num_requests), "--device", "cpu",
               "--dtype", "float32", "--num-kv-pages", str(ref["kv_pool"]["pages"]),
               "--max-num-batched-tokens", str(cfg["max_num_batched_tokens"]), "--max-num-seqs",
               str(cfg["max_num_seqs"]), "--max-model-len", str(ref["max_model_len"]), "--output-dir",
               os.path.join(tmp, "out"), "--no-plot", "--no-tqdm", "--peak-seconds", "0.05", "--num-warmup", "1",
               *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (path,) = glob.glob(os.path.join(tmp, "out", "bench_*.json"))
        result = json.load(open(path))
    pred = predict(result, model)
    print(f"{args.workload} x {args.num_requests} {' '.join(extra) or '(defaults)'}: {pred['steps']} steps, "
          f"predicted {pred['gpu_seconds']:.1f} GPU s = {pred['total_tokens_per_s']:,.0f} tok/s, "
          f"{pred['preemptions']} preemptions")


if __name__ == "__main__":
    main()
