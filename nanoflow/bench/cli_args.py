"""Arguments of `nanoflow bench` (kept apart from the bench itself, so the CLI builds its parser
without importing the harness, transformers or matplotlib)."""

from __future__ import annotations

import argparse
import os
import re

from nanoflow.engine_args import add_engine_args

# Kept in sync with dummy_models.DUMMY_CONFIGS by a test; listed here so building the parser
# imports nothing else.
DUMMY_NAMES = ("llama3-8b", "llama2-7b", "qwen2-7b", "mixtral-8x7b", "llama2-70b")
# hf: the workload's own requests in padded static batches; hf-mean: equal-length requests at the
# workload's mean lengths (no padding, kinder to HF); see nanoflow/bench/hf_baseline.py.
# nanoflow-sequential: nanoflow with --pipeline off (the pipeline's gain); sequential: eager reference ops.
COMPARE_CHOICES = ("nanoflow-sequential", "nanoflow-fp8", "hf", "hf-mean", "sequential")

# The workload grammar (workloads.parse_workload_spec reads it): INPUTxOUTPUT or trace:FILE. The
# pattern lives here so that the vLLM aliases resolve at the CLI edge (nanoflow.cli.parse_args),
# before numpy or torch load.
FIXED_SPEC = re.compile(r"^(\d+)x(\d+)$")
DEFAULT_INPUT_LEN = DEFAULT_OUTPUT_LEN = 512
DEFAULT_WORKLOAD = f"{DEFAULT_INPUT_LEN}x{DEFAULT_OUTPUT_LEN}"
DEFAULT_OUTPUT_DIR = "bench-results"
# vLLM's --dataset-name values we have: random (fixed lengths), sharegpt (a lengths CSV), trace (Splitwise CSV).
DATASET_NAMES = ("random", "sharegpt", "trace")
_EXAMPLE_PATH = {"sharegpt": "benchmarks/data/sharegpt_lengths.csv",
                 "trace": "benchmarks/data/splitwise_azure_conv_2023.csv"}

EXAMPLES = """examples:
  nanoflow bench --dummy llama3-8b --workload 512x512 --compare hf,sequential
  nanoflow bench --dummy llama3-8b --workload 512x1024 --pipeline auto --compare nanoflow-sequential --timeline
  nanoflow bench --dummy llama3-8b --workload trace:benchmarks/data/splitwise_azure_conv_2023.csv \\
      --num-requests 1000 --compare hf,sequential
  nanoflow bench --model /path/to/hf_folder --workload 32x16 --num-requests 8 --device cpu --dtype float32

vLLM `bench throughput` flags work as aliases:
  nanoflow bench --input-len 512 --output-len 128 --num-prompts 200 --output-json out.json
  nanoflow bench --dataset-name sharegpt --dataset-path benchmarks/data/sharegpt_lengths.csv --num-prompts 500
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
    # default None, so that a --workload the user typed can be told apart from the default when it
    # meets the vLLM aliases below (resolve_bench_args settles it to a spec string)
    w.add_argument("--workload", default=None,
                   help=f"INPUTxOUTPUT (e.g. 512x512, 1024x512, 512x1024) or trace:FILE (CSV with "
                   f"ContextTokens,GeneratedTokens columns); default {DEFAULT_WORKLOAD}")
    w.add_argument("--input-len", type=_positive_int, default=None, metavar="N",
                   help=f"vLLM's name: prompt tokens per request, --workload NxM with the --output-len M "
                   f"(default {DEFAULT_INPUT_LEN})")
    w.add_argument("--output-len", type=_positive_int, default=None, metavar="M",
                   help=f"vLLM's name: output tokens per request (default {DEFAULT_OUTPUT_LEN})")
    w.add_argument("--dataset-name", default=None, choices=DATASET_NAMES,
                   help="vLLM's name: random (fixed --input-len/--output-len), sharegpt (request lengths from "
                   "a CSV such as benchmarks/data/sharegpt_lengths.csv; not vLLM's ShareGPT JSON) or trace "
                   "(a Splitwise CSV, the same as --workload trace:FILE); the file is --dataset-path")
    w.add_argument("--dataset-path", default=None, metavar="FILE",
                   help="the CSV of --dataset-name sharegpt or trace (ContextTokens,GeneratedTokens columns)")
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
    o.add_argument("--output-dir", default=None,
                   help=f"where the JSON and PNG go (default: {DEFAULT_OUTPUT_DIR}/ in the current directory, "
                   "git-ignored, or with --output-json the JSON's folder; a run to commit goes under "
                   "benchmarks/results/ with a row in its README.md index)")
    o.add_argument("--output-json", default=None, metavar="FILE",
                   help="vLLM's name: write the result JSON exactly to FILE; the PNGs (unless --no-plot) "
                   "are named after it, beside it or in --output-dir")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    o.add_argument("--timeline", action="store_true",
                   help="after the nanoflow run, time one step of the shape that held most of its GPU time "
                   "(eager, outside CUDA graphs): one layer's ops per stream over time, coloured by resource, "
                   "written to <stem>_timeline.png and into the JSON")
    o.add_argument("--no-tqdm", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def resolve_bench_args(args: argparse.Namespace) -> None:
    """Settles vLLM's aliases in place, once (nanoflow.cli.parse_args calls it after parsing):
    args.workload becomes the one spec string the bench builds its Workload from, args.output_dir
    the pictures' folder. Raises ValueError on a conflict."""
    args.workload = resolve_workload(args.workload, args.input_len, args.output_len, args.dataset_name,
                                     args.dataset_path)
    if args.output_json is not None:
        if not args.output_json or os.path.isdir(args.output_json):
            raise ValueError(f"--output-json {args.output_json!r} is not a file name (it names where the "
                             "result JSON is written)")
        if args.output_dir is None:  # the pictures go beside the JSON; nothing in ./bench-results
            args.output_dir = os.path.dirname(args.output_json) or "."
    elif args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR


def resolve_workload(workload: str | None, input_len: int | None, output_len: int | None,
                     dataset_name: str | None, dataset_path: str | None) -> str:
    """The --workload spec that --workload and vLLM's --input-len/--output-len/--dataset-name/
    --dataset-path say together; ValueError when they disagree or a file is missing."""
    lens = input_len is not None or output_len is not None
    if dataset_name in ("sharegpt", "trace"):
        if workload is not None:
            raise ValueError(f"--dataset-name {dataset_name} and --workload {workload} both choose the requests; "
                             "give one of them")
        if lens:
            raise ValueError(f"--input-len/--output-len set the lengths of --dataset-name random; "
                             f"{dataset_name} takes each request's lengths from --dataset-path")
        if dataset_path is None:
            raise ValueError(f"--dataset-name {dataset_name} needs --dataset-path FILE "
                             f"(e.g. {_EXAMPLE_PATH[dataset_name]})")
        if dataset_name == "sharegpt" and dataset_path.lower().endswith((".json", ".jsonl")):
            # vLLM's ShareGPT JSON holds conversation text, which would need the model's tokenizer
            # (the bench runs on random token ids): only its lengths, as a CSV, are read.
            raise ValueError(f"--dataset-path {dataset_path}: --dataset-name sharegpt reads a CSV of request "
                             "lengths (TIMESTAMP,ContextTokens,GeneratedTokens, e.g. "
                             f"{_EXAMPLE_PATH['sharegpt']}); vLLM's ShareGPT JSON is not supported")
        if not os.path.isfile(dataset_path):
            raise ValueError(f"--dataset-path {dataset_path}: no such file")
        return f"trace:{dataset_path}"  # both CSVs have the trace's columns: one loader reads them
    if dataset_path is not None:
        raise ValueError("--dataset-path needs --dataset-name sharegpt or trace (random makes requests of "
                         "--input-len/--output-len tokens)")
    if workload is None:
        return f"{input_len or DEFAULT_INPUT_LEN}x{output_len or DEFAULT_OUTPUT_LEN}"
    m = FIXED_SPEC.match(workload.strip())
    if dataset_name == "random" and m is None:
        raise ValueError(f"--dataset-name random makes fixed-length requests; --workload {workload} is not "
                         "INPUTxOUTPUT: give one of them")
    if lens:
        if m is None or input_len not in (None, int(m.group(1))) or output_len not in (None, int(m.group(2))):
            given = " ".join(f"--{k} {v}" for k, v in (("input-len", input_len), ("output-len", output_len))
                             if v is not None)
            raise ValueError(f"--workload {workload} conflicts with {given}; give one of them")
    return workload
