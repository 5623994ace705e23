"""`nanoflow generate | serve | bench`: the top floor; each subcommand imports what it runs lazily,
so the engine's import path never pulls in server-only packages."""

from __future__ import annotations

import argparse
import sys

from nanoflow.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, positional_model: bool = True) -> None:
    """The EngineConfig options, shared by generate, serve and bench (which names its model with
    --model / --dummy instead of the positional argument)."""
    if positional_model:
        p.add_argument("model", nargs="?", default=None,
                       help="Hugging Face model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | "
                   "float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="dense token budget per iteration (default 2048 on GPU, 512 on CPU)")
    p.add_argument("--admission-output-tokens", type=int, default=1024,
                   help="admission projects each request to prompt + min(max_tokens, this) tokens")
    p.add_argument("--num-kv-pages", type=int, default=None, help="KV pool size in 16-token pages")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="KV cache storage: auto (the model dtype) | fp8 (e4m3, scale 1: twice the tokens)")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=None,
                   help="largest iteration replayed from a CUDA graph (default: the token budget; 0: none)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (and, in bench, the prompts and weights)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields that add_engine_args defined, besides the model."""
    names = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "admission_output_tokens",
             "num_kv_pages", "gpu_memory_utilization", "kv_cache_dtype", "cuda_graph_max_tokens",
             "tensor_parallel_size", "seed")
    return {n: getattr(args, n) for n in names}


def engine_config_from_args(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(model=model, **engine_kwargs(args))


def _generate(args: argparse.Namespace) -> int:
    from nanoflow.entrypoints.llm import LLM
    from nanoflow.models.default_model import default_model_path
    from nanoflow.sampling_params import SamplingParams

    llm = LLM(args.model or default_model_path(), **engine_kwargs(args))
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
    from nanoflow.models.default_model import default_model_path

    config = engine_config_from_args(args, args.model or default_model_path())
    return run_server(config, host=args.host, port=args.port, served_model_name=args.served_model_name,
                      api_key=args.api_key)


def _bench(args: argparse.Namespace) -> int:
    from nanoflow.bench.throughput import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
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
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--api-key", default=None)
    srv.set_defaults(func=_serve)

    from nanoflow.bench.cli_args import add_bench_args

    bench = sub.add_parser("bench", help="offline throughput benchmark (vLLM `bench throughput` style)")
    add_bench_args(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"nanoflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
