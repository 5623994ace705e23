"""`nanoflow generate | serve | bench | tune`: the top floor; each subcommand imports what it runs lazily,
so the engine's import path never pulls in server-only packages."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from nanoflow.engine_args import add_engine_args, engine_args_from_cli, engine_kwargs

if TYPE_CHECKING:
    import torch

# The built-in default model's Hugging Face id: the name it is served under, and a model argument
# equal to it (what a vLLM user types) loads the built-in copy, since nothing is fetched from a hub.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def resolve_model(model: str | None) -> tuple[str, str]:
    """(the folder to load, the name to serve it as): the model argument as given, as vLLM does."""
    if model is None or (model == DEFAULT_MODEL_ID and not os.path.isdir(model)):
        from nanoflow.models.default_model import default_model_path

        return default_model_path(), DEFAULT_MODEL_ID
    return model, model


def _generate(args: argparse.Namespace) -> int:
    from nanoflow.entrypoints.llm import LLM
    from nanoflow.sampling_params import SamplingParams

    llm = LLM(resolve_model(args.model)[0], **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, n=args.n)
    prompts = args.prompt or ["What is the capital of France?"]
    if args.no_chat_template or not llm.get_tokenizer().chat_template:
        outs = llm.generate(prompts, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"\n>>> {prompt}")
        if out.error:
            print(f"error: {out.error}")
        for o in out.outputs:
            print(o.text.strip() + f"\n[finish_reason={o.finish_reason}, tokens={len(o.token_ids)}]")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from nanoflow.entrypoints.server.app import run_server

    path, name = resolve_model(args.model)
    config = engine_args_from_cli(args, path)
    return run_server(config, host=args.host, port=args.port, served_model_name=args.served_model_name or [name],
                      api_key=args.api_key, chat_template=args.chat_template, generation_config=args.generation_config,
                      disable_log_requests=args.disable_log_requests, uvicorn_log_level=args.uvicorn_log_level)


def _bench(args: argparse.Namespace) -> int:
    from nanoflow.bench.throughput import run_bench

    if not args.model and not args.dummy:  # like generate and serve: the built-in model
        args.model = resolve_model(None)[0]

    return run_bench(args)


def _tune(args: argparse.Namespace) -> int:
    from nanoflow.bench.dummy_models import dummy_model_dir
    from nanoflow.bench.peak import measure_peak_tflops
    from nanoflow.tune.cli import run_tune

    def peak_tflops(device: torch.device) -> float:
        # a burst, as the profile times its ops (the bench's optimum takes the sustained rate over seconds)
        return measure_peak_tflops(device, seconds=0.05, warmup_seconds=0.05)["tflops"]

    return run_tune(args, dummy_model_dir, peak_tflops)


def build_parser() -> argparse.ArgumentParser:
    """The `nanoflow` parser; parse_args also settles what the bench's flags say together."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `nanoflow` parser and its `bench` sub-parser (whose error() reports a conflict of vLLM's aliases)."""
    parser = argparse.ArgumentParser(prog="nanoflow", description="Throughput-first LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("-n", type=int, default=1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--no-chat-template", action="store_true", help="send prompts as raw text")
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="the names clients send as `model` (all accepted, the first reported in responses; "
                     "default: the model argument as given, or HuggingFaceTB/SmolLM2-135M-Instruct)")
    srv.add_argument("--api-key", default=os.environ.get("NANOFLOW_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $NANOFLOW_API_KEY, like vLLM's VLLM_API_KEY)")
    srv.add_argument("--chat-template", default=None,
                     help="a Jinja chat template file (or the template text) replacing the tokenizer's")
    srv.add_argument("--generation-config", default="auto",
                     help="auto: the model's generation_config.json sampling defaults (temperature, top_p, top_k, "
                     "min_p, repetition_penalty, max_new_tokens) for requests that leave them unset; vllm: ignore "
                     "it; PATH: a folder holding generation_config.json (or the file)")
    srv.add_argument("--disable-log-requests", action="store_true", help="no log line per received request")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=("critical", "error", "warning", "info", "debug", "trace"))
    srv.set_defaults(func=_serve)

    from nanoflow.bench.cli_args import add_bench_args

    bench = sub.add_parser("bench", help="offline throughput benchmark (vLLM `bench throughput` style)")
    add_bench_args(bench)
    bench.set_defaults(func=_bench)

    from nanoflow.bench.cli_args import DUMMY_NAMES
    from nanoflow.tune.cli import add_tune_args

    tune = sub.add_parser("tune", help="profile the layer ops and search a nano-batch pipeline (--pipeline auto)")
    add_tune_args(tune, DUMMY_NAMES)
    tune.set_defaults(func=_tune)
    return parser, bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and settled: `nanoflow bench`'s vLLM aliases resolve here, once, into
    its --workload spec and output folder; a conflict is an argparse error of `nanoflow bench` (its
    usage, exit 2) before anything heavy loads."""
    from nanoflow.bench.cli_args import resolve_bench_args

    parser, bench = _build_parsers()
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            resolve_bench_args(args)
        except ValueError as e:
            bench.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"nanoflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
