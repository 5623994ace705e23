"""The OpenAI API through the real `openai` client: completions and chat, streamed and not, n > 1,
stop, logprobs, usage; greedy output equals LLM.generate / LLM.chat for the same prompts."""

from __future__ import annotations

import math

import pytest
from server_utils import MAX_MODEL_LEN, MODEL_NAME

from nanoflow import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Hello world! How are", "Numbers: 0 1 2"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]]


@pytest.fixture(scope="module")
def llm(model_path: str) -> LLM:
    return LLM(model_path, device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_pages=64)


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        assert chunk.model == MODEL_NAME and chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                assert c.index not in finish, "a choice finished twice"
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_greedy_completions_match_llm_generate(client, llm):
    ref = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, r in zip(PROMPTS, ref, strict=True):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.created > 0
        assert resp.model == MODEL_NAME
        (choice,) = resp.choices
        assert choice.text == r.outputs[0].text
        assert choice.finish_reason == r.outputs[0].finish_reason
        n_prompt = len(tok.encode(prompt))
        assert resp.usage.prompt_tokens == n_prompt
        assert resp.usage.completion_tokens == len(r.outputs[0].token_ids)
        assert resp.usage.total_tokens == n_prompt + len(r.outputs[0].token_ids)
        # Streamed: the deltas add up to the same text.
        texts, finish, usage = _stream_text(client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert texts == {0: r.outputs[0].text} and finish == {0: r.outputs[0].finish_reason}
        assert usage.completion_tokens == len(r.outputs[0].token_ids) and usage.prompt_tokens == n_prompt


def test_greedy_chat_matches_llm_chat(client, llm):
    ref = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for messages, r in zip(CHATS, ref, strict=True):
        resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                              temperature=0)
        assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
        (choice,) = resp.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == r.outputs[0].text
        assert choice.finish_reason == r.outputs[0].finish_reason
        assert resp.usage.prompt_tokens == len(r.prompt_token_ids)
        assert resp.usage.completion_tokens == len(r.outputs[0].token_ids)
        texts, finish, usage = _stream_text(client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert texts == {0: r.outputs[0].text} and finish == {0: r.outputs[0].finish_reason}
        assert usage.total_tokens == len(r.prompt_token_ids) + len(r.outputs[0].token_ids)


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_n_and_seed(client):
    kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=8, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    resp = client.completions.create(**kw)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 3 * 8
    assert len({c.text for c in resp.choices}) > 1, "n samples should differ at temperature 1"
    # Seeded sampling does not depend on the batch, so a streamed rerun reproduces every choice.
    texts, finish, usage = _stream_text(client.completions.create(**kw, stream=True,
                                                                   stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in resp.choices}
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0], max_tokens=5, n=2, seed=3,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10


def test_batch_prompts_and_echo(client, llm):
    tok = llm.get_tokenizer()
    resp = client.completions.create(model=MODEL_NAME, prompt=["Hello world", "The quick brown fox"],
                                     max_tokens=4, n=2, temperature=0, extra_body={"ignore_eos": True})
    # Choice index = prompt index * n + sample index, as OpenAI numbers them.
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 16
    assert resp.usage.prompt_tokens == len(tok.encode("Hello world")) + len(tok.encode("The quick brown fox"))
    by_ids = client.completions.create(model=MODEL_NAME, prompt=[tok.encode("Hello world"), [5, 6, 7]],
                                       max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    assert by_ids.usage.prompt_tokens == len(tok.encode("Hello world")) + 3
    # Streamed, the batch's engine requests are merged into one SSE stream.
    texts, finish, usage = _stream_text(client.completions.create(
        model=MODEL_NAME, prompt=["Hello world", "The quick brown fox"], max_tokens=4, n=2, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert texts == {c.index: c.text for c in resp.choices}
    assert finish == dict.fromkeys(range(4), "length") and usage.completion_tokens == 16
    echoed = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=3, temperature=0,
                                       echo=True)
    plain = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=3, temperature=0)
    assert echoed.choices[0].text == "Hello world" + plain.choices[0].text


def test_stop_string(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Paris is the capital of", max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    # A printable-ASCII stop string whose first occurrence is past the start of the text.
    cut = next(p for p in range(3, len(base) - 2)
               if base[p:p + 2].isascii() and base[p:p + 2].isprintable() and base.find(base[p:p + 2]) == p)
    stop = base[cut:cut + 2]
    resp = client.completions.create(model=MODEL_NAME, prompt="Paris is the capital of", max_tokens=24,
                                     temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].text == base[:cut] and resp.choices[0].finish_reason == "stop"
    texts, finish, _ = _stream_text(client.completions.create(
        model=MODEL_NAME, prompt="Paris is the capital of", max_tokens=24, temperature=0, stop=stop,
        stream=True, extra_body={"ignore_eos": True}))
    assert texts == {0: base[:cut]} and finish == {0: "stop"}


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == resp.choices[0].text or "\ufffd" in "".join(lp.tokens)
    assert lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), rel_tol=1e-5)  # greedy picks the top token
    streamed = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0,
                                         logprobs=3, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0], max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, rel_tol=1e-5)
    no_top = client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0], max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def test_extra_sampling_params_and_lengths(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=CHATS[1], max_completion_tokens=7, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=1,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True,
                    "min_tokens": 2})
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 7
    # max_tokens omitted in chat: generation may run up to max_model_len.
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0], temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == MAX_MODEL_LEN
    assert resp.choices[0].finish_reason == "length"


def test_tokenize_detokenize(http, llm):
    tok = llm.get_tokenizer()
    r = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Hello world"})
    assert r.status_code == 200
    assert r.json()["tokens"] == tok.encode("Hello world") and r.json()["max_model_len"] == MAX_MODEL_LEN
    r = http.post("/tokenize", json={"messages": CHATS[0]})
    assert r.json()["tokens"] == llm.apply_chat_template(CHATS[0])
    r = http.post("/detokenize", json={"tokens": tok.encode("Hello world")})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world"
