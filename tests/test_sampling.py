"""Sampling parameters: validation, seeds, n, stops, min_tokens, logprobs, penalties, filters."""

import pytest
import torch
from test_equivalence import _prompts
from transformers import AutoModelForCausalLM

from nanoflow import LLM, SamplingParams
from nanoflow.executor import sampler as sampler_mod
from nanoflow.executor.sampler import Sampler, SamplingMetadata, apply_top_k_top_p_min_p


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), max_model_len=256)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = {"prompt_token_ids": _prompts(1, 1)[0]}
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": q} for q in _prompts(2, 5)]
    batched = llm.generate(others[:2] + [p] + others[2:], [SamplingParams(temperature=1.0, max_tokens=16)] * 2
                           + [params] + [SamplingParams(temperature=1.0, max_tokens=16)] * 3, use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([p], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_returns_n_distinct_samples(llm):
    out = llm.generate("The quick brown fox", SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8,
                                                             ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_stop_string_is_excluded_and_ends_generation(llm):
    prompt = "Hello world"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = full.text[5:8]
    assert stop.strip(), f"need a visible stop string in {full.text!r}"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    p = {"prompt_token_ids": _prompts(3, 1)[0]}
    ids = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ids[3]]),
                       use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[3])
    assert out.finish_reason == "stop" and out.stop_reason == ids[3] and out.token_ids == ids[: first + 1]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, min_tokens=8, stop_token_ids=[ids[3]]),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 8 and ids[3] not in out.token_ids[:7]


def test_logprobs_are_top_k_of_the_model_distribution(llm, tiny_model):
    p = _prompts(4, 1)[0]
    out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=3, logprobs=3,
                                                                 ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    hf = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1], -1)
    top = ref.topk(3)
    first = out.logprobs[0]
    assert set(first) == set(top.indices.tolist())
    for tok, lp in first.items():
        assert lp.logprob == pytest.approx(ref[tok].item(), abs=1e-4)
    assert first[out.token_ids[0]].rank == 1


def test_repetition_penalty_matches_transformers(tiny_model):
    path = tiny_model("qwen2")
    prompts = _prompts(5, 3)
    llm = LLM(path, max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.5, ignore_eos=True),
                        use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    for p, o in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, repetition_penalty=1.5,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref


def test_presence_and_frequency_penalties_reduce_repeats(llm):
    p = {"prompt_token_ids": _prompts(6, 1)[0]}
    plain = llm.generate([p], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    pen = llm.generate([p], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=2.0,
                                           presence_penalty=2.0), use_tqdm=False)
    distinct = lambda o: len(set(o[0].outputs[0].token_ids))  # noqa: E731
    assert distinct(pen) >= distinct(plain)


def test_top_k_one_is_greedy(llm):
    p = {"prompt_token_ids": _prompts(7, 1)[0]}
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    k1 = llm.generate([p], SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True, seed=3),
                      use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == k1[0].outputs[0].token_ids


def test_filter_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2, 5, 5]), torch.tensor([1.0, 0.7, 1.0]),
                                  torch.tensor([0.0, 0.0, 0.3]))
    kept = torch.isfinite(out).tolist()
    assert kept[0] == [True, True, False, False, False]  # top_k=2
    assert kept[1] == [True, True, False, False, False]  # p(4)=0.64 < 0.7 so the second token is needed
    assert kept[2] == [True, True, False, False, False]  # min_p: p(2)/p(4) = e^-2 < 0.3


def _mixed_meta(rows: int, vocab: int) -> SamplingMetadata:
    """Greedy rows and seeded random rows, filters, penalties, logprobs and a banned token: every
    sampled token is determined, so passes of any size must give the same result."""
    meta = SamplingMetadata.worst_case(rows, vocab, torch.device("cpu"))
    meta.temperature[::3] = 0.0
    meta.top_k[1::2] = vocab
    meta.output_counts[:, :4] = 2
    meta.seen_mask[:, 2:6] = True
    meta.generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    meta.banned = [(4, [7, 8]), (9, [1])]
    return meta


def test_sampling_in_passes_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rows, vocab = 11, 40
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    whole = Sampler(torch.device("cpu"), 0)(logits, _mixed_meta(rows, vocab))
    monkeypatch.setattr(sampler_mod, "ROW_CHUNK_ELEMENTS", 3 * vocab)  # passes of 3 rows: 4 passes
    parts = Sampler(torch.device("cpu"), 0)(logits, _mixed_meta(rows, vocab))
    assert torch.equal(whole.tokens, parts.tokens) and whole.num_logprobs == parts.num_logprobs == 20
    for a, b in zip(whole.logprobs, parts.logprobs, strict=True):
        assert torch.equal(a, b)
    assert parts.tokens[4] not in (7, 8) and parts.tokens[9] != 1
    assert parts.logprobs[2].shape == (rows, 20)
