"""Arguments of `nanoflow bench` (kept apart from the bench itself, so the CLI builds its parser
without importing the harness, transformers or matplotlib)."""

from __future__ import annotations

import argparse

from nanoflow.engine_args import add_engine_args

# Kept in sync with dummy_models.DUMMY_CONFIGS by a test; listed here so building the parser
# imports nothing else.
DUMMY_NAMES = ("llama3-8b", "llama2-7b", "qwen2-7b", "mixtral-8x7b", "llama2-70b")
# hf: the workload's own requests in padded static batches; hf-mean: equal-length requests at the
# workload's mean lengths (no padding, kinder to HF); see nanoflow/bench/hf_baseline.py.
# nanoflow-sequential: nanoflow with --pipeline off (the pipeline's gain); sequential: eager reference ops.
COMPARE_CHOICES = ("nanoflow-sequential", "nanoflow-fp8", "hf", "hf-mean", "sequential")

EXAMPLES = """examples:
  nanoflow bench --dummy llama3-8b --workload 512x512 --compare hf,sequential
  nanoflow bench --dummy llama3-8b --workload 512x1024 --pipeline auto --compare nanoflow-sequential --timeline
  nanoflow bench --dummy llama3-8b --workload trace:benchmarks/data/splitwise_azure_conv_2023.csv \\
      --num-requests 1000 --compare hf,sequential
  nanoflow bench --model /path/to/hf_folder --workload 32x16 --num-requests 8 --device cpu --dtype float32
"""


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face model folder (weights loaded unless "
                     "--load-format dummy; default: the built-in SmolLM2-135M-Instruct)")
    src.add_argument("--dummy", default=None, choices=DUMMY_NAMES,
                     help="a published model's config.json with random weights (nothing downloaded)")
    p.add_argument("--load-format", default=None, choices=("auto", "dummy"),
                   help="weights for --model: auto (safetensors) or dummy (random); --dummy forces dummy")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="512x512",
                   help="INPUTxOUTPUT (e.g. 512x512, 1024x512, 512x1024) or trace:FILE (CSV with "
                   "ContextTokens,GeneratedTokens columns)")
    w.add_argument("--num-requests", "--num-prompts", type=int, default=None,  # --num-prompts: vLLM's name
                   help="requests to run (default 1000; for a trace, its first N rows)")
    w.add_argument("--num-warmup", type=int, default=16,
                   help="requests run untimed before each engine run (compile, autotune, graph capture)")
    w.add_argument("--warmup-max-tokens", type=int, default=32, help="output cap of the warm-up requests")

    c = p.add_argument_group("comparison")
    c.add_argument("--compare", default="",
                   help="comma list of systems run after nanoflow, in this order: nanoflow-sequential (the "
                   "same engine, kernels and CUDA graphs as nanoflow with --pipeline off: nanoflow's speedup "
                   "over it is the nano-batch pipeline's gain), nanoflow-fp8 (our fast "
                   "path with --kv-cache-dtype fp8), hf (Hugging Face "
                   "generate on the same requests, padded static batches), hf-mean (HF generate on "
                   "equal-length requests at the workload's mean lengths: no padding, kinder to HF), "
                   "sequential (our engine, eager, PyTorch reference kernels)")
    c.add_argument("--hf-max-batch", type=int, default=None,
                   help="cap on hf generate's static batch (default: on a GPU the largest batch free memory "
                   "holds, on the CPU 256)")
    c.add_argument("--hf-num-requests", type=int, default=None,
                   help="hf generate runs at most the workload's first N requests (default: all, within "
                   "--hf-max-seconds)")
    c.add_argument("--hf-max-seconds", type=float, default=60.0,
                   help="no new hf batch starts after this many seconds (one always runs; 0: no cap)")
    c.add_argument("--peak-seconds", type=float, default=2.0,
                   help="how long to time the 8192^3 bf16 GEMM for the peak rate (after warm-up)")
    c.add_argument("--peak-tflops", type=float, default=None,
                   help="use this peak (TFLOP/s) instead of measuring it")

    # one definition with generate/serve; --dtype and --device also apply to the HF baseline
    add_engine_args(p.add_argument_group("engine"), positional_model=False)

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="bench-results",
                   help="where the JSON and PNG go (default: bench-results/ in the current directory, "
                   "git-ignored; a run to commit goes under benchmarks/results/ with a row in its "
                   "README.md index)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    o.add_argument("--timeline", action="store_true",
                   help="after the nanoflow run, time one full-budget step shaped like its full steps (eager, "
                   "outside CUDA graphs): one layer's ops per stream over time, coloured by resource, "
                   "written to <stem>_timeline.png and into the JSON")
    o.add_argument("--no-tqdm", action="store_true", help="no progress bars")
