"""Greedy output equals transformers' generate, token for token, for every architecture, also when
prompts are chunked across iterations and when the KV pool is so small that preemption happens."""

import random

import pytest
import torch
from helpers import ARCHS, VOCAB_SIZE, pipeline_for
from transformers import AutoModelForCausalLM

from nanoflow import LLM, SamplingParams

MAX_TOKENS = 24


def _prompts(seed: int, n: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(3, 41))] for _ in range(n)]


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = False) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    outs = []
    for ids in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(g[0, len(ids):].tolist())
    return outs


ENGINE_SETTINGS = {
    "plain": dict(max_num_batched_tokens=512),
    "chunked": dict(max_num_batched_tokens=16),
    # admission_output_tokens=1 under-projects growth on purpose, so running sequences outgrow the pool.
    "preempt": dict(max_num_batched_tokens=64, num_kv_pages=5, admission_output_tokens=1),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipeline"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_model, arch, pipelined, tmp_path):
    """With pipelined=True every step of two tokens or more runs the layers' ops as a two-stream
    nano-batch pipeline (in its issue order on the CPU), with nano-batch bounds inside decodes and
    inside prefill chunks."""
    path = tiny_model(arch)
    prompts = _prompts(ARCHS.index(arch))
    expected = hf_greedy(path, prompts, MAX_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for name, settings in ENGINE_SETTINGS.items():
        pipeline = "off"
        if pipelined:
            pipeline = str(tmp_path / f"{name}.json")
            pipeline_for(arch.removesuffix("_tied"), settings["max_num_batched_tokens"]).save(pipeline)
        llm = LLM(path, max_model_len=256, pipeline=pipeline, **settings)
        budget_seen = []
        schedule = llm.engine.scheduler.schedule

        def recording_schedule(schedule=schedule, budget_seen=budget_seen):
            out = schedule()
            budget_seen.append(out.num_tokens)
            return out

        llm.engine.scheduler.schedule = recording_schedule
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == expected, f"{arch}/{name}: outputs differ from transformers"
        assert max(budget_seen) <= llm.engine.config.max_num_batched_tokens
        assert llm.engine.num_free_pages == llm.engine.num_pages, "pages leaked"
        if name == "chunked":
            assert max(len(p) for p in prompts) > 16  # some prompt really spans several iterations
        if name == "preempt":
            assert llm.engine.scheduler.num_preemptions > 0, "the small pool should force preemption"
