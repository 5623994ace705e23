"""Tiny real checkpoints for tests: a BPE tokenizer trained offline and random models of each
supported architecture, written with transformers' save_pretrained."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch

from nanoflow.executor.step_plan import StepPlan

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Large language models generate text one token at a time.",
    "A paged KV cache stores keys and values in fixed-size pages of sixteen tokens.",
    "Serving throughput is measured in tokens per second on one GPU.",
    "Hello world! How are you today? I am fine, thank you very much.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: + - * / = < > ( ) [ ] { }",
] * 20
VOCAB_SIZE = 384


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                          rope_theta=10000.0)
    elif arch == "llama_tied":
        cfg = LlamaConfig(**{**common, "tie_word_embeddings": True, "num_key_value_heads": 4})
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "mixtral":
        cfg = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "mixtral")


def write_model(path: Path, arch: str, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """A random model of `arch` saved as safetensors. Weights are widened (std 0.1, biases too) so
    the top-1 logit is rarely a near-tie and greedy comparisons are meaningful."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    if with_tokenizer:
        write_tokenizer(path)
    return path


def tiny_models_root() -> Path:
    root = Path(os.environ.get("NANOFLOW_TEST_MODELS", "/tmp/nanoflow-test-models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def teacher_forced_agreement(llm, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Fraction of positions where llm's greedy next token, given the prompt and the continuation up to
    there, is the continuation's token. Unlike comparing free-running outputs, one flipped token
    does not change every later position."""
    from nanoflow import SamplingParams

    forced = [{"prompt_token_ids": p + c[:i]} for p, c in zip(prompts, continuations, strict=True)
              for i in range(len(c))]
    want = [t for c in continuations for t in c]
    outs = llm.generate(forced, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return sum(o.outputs[0].token_ids[0] == w for o, w in zip(outs, want, strict=True)) / len(want)


def step_plan(decodes: list[int], prefills: list[tuple[int, int]], first_page: int = 0) -> StepPlan:
    """decodes: context lengths (one new token each); prefills: (tokens already cached, chunk length)."""
    return StepPlan.synthetic(decodes, prefills, first_page=first_page)


def layer_op_names(arch: str, tp: bool = False) -> list[str]:
    """The op names a decoder layer publishes (models/llama.py): on one GPU, or (tp) with its
    tensor-parallel all-reduces."""
    from nanoflow.models.llama import layer_op_names as names

    return names(arch == "mixtral", tp)


def pipeline_for(arch: str, max_tokens: int, tp: bool = False):
    """A pipeline covering every size from 2 to max_tokens tokens with two dense nano-batches and
    three attention nano-batches at uneven bounds: boundaries fall inside the decode rows and inside
    prefill chunks, and the attention runs on a second stream (in order on the CPU); the GEMMs beside
    it are capped at 3 CTAs (the persistent Triton GEMM on the fast path). The middle range runs
    the "mlp" order (decode attention beside the other nano-batch's FFN), 41-100 tokens each
    nano-batch on a stream of its own (pingpong_schedule; with tp, the all-reduces on a third), the
    others NanoFlow's order. tp: over the ops of a tensor-parallel layer."""
    from nanoflow.pipeline.schedule import Pipeline, overlap_schedule, pingpong_schedule

    names = layer_op_names(arch, tp)
    ranges = [(2, 9, 1, None, "qkv"), (10, 40, 7, (0, 3, 7, 40), "mlp"),
              (41, 100, 30, None, "pingpong"), (101, max_tokens, 29, (0, 13, 29, max_tokens), "qkv")]
    schedules = tuple(pingpong_schedule(names, min(hi, max_tokens), split, lo, decode_ctas=8)
                      if beside == "pingpong" else
                      overlap_schedule(names, hi, split, lo, decode_ctas=8, attention_parts=attn, gemm_ctas=3,
                                       beside=beside)
                      for lo, hi, split, attn, beside in ranges if lo <= max_tokens)
    return Pipeline(schedules, {"test": arch}, "tests")


def tp_step_error(config, tokens: int) -> tuple[float | None, float | None]:
    """In a fresh process (run_isolated): a tensor-parallel engine's ranks, and
    tune.live_steps.step_error on a decode-only step of `tokens` (a pipelined graph where the
    config's pipeline covers it) and on a 1-token step (a sequential one: None)."""
    from nanoflow.tune.live_steps import engine_runner, step_error
    from nanoflow.tune.profile import Workload, mixed_plan

    with engine_runner(config) as runner:
        plans = [mixed_plan(n, Workload(24, 1.0), runner.arch.vocab_size, runner.num_pages, runner.config.max_model_len)
                 for n in (tokens, 1)]
        return tuple(step_error(runner, plan) for plan in plans)


def worker_that_dies_before_joining(rank: int, *args) -> None:
    """A tensor-parallel worker (TensorParallelGroup.start's `worker`) that exits before it joins the
    process group, as one would whose GPU or imports fail."""
    os._exit(3)


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/<name>.py imported as a module (the folder is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
