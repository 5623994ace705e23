"""Every client mistake gets a 4xx with the OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import API_KEY, MAX_MODEL_LEN, MODEL_NAME

COMPLETION = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_error(r: httpx.Response, status: int, param: str | None = "ANY", code: str | None = "ANY") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "ANY":
        assert err["param"] == param, err
    if code != "ANY":
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)],
                         ids=["completions", "chat"])
@pytest.mark.parametrize("change,param", [
    ({"temperature": "hot"}, "temperature"),  # wrong type
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": True}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": [1, 2]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"temperature": -0.5}, "temperature"),  # out of range
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 10**6}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"min_tokens": 5}, "min_tokens"),  # > max_tokens
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stop": ["x"] * 65}, "stop"),
], ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
def test_bad_parameters(http, path, body, change, param):
    assert_error(http.post(path, json={**body, **change}), 400, param)


@pytest.mark.parametrize("payload", [b"{bad json", b"", b"[1, 2]", b'"text"', b"\xff\xfe",
                                     b'{"prompt": NaN}'])
def test_malformed_body(http, payload):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(http.post(path, content=payload, headers={"content-type": "application/json"}), 400)


def _completion(http: httpx.Client, **change) -> httpx.Response:
    return http.post("/v1/completions", json={**COMPLETION, **change})


def _chat(http: httpx.Client, **change) -> httpx.Response:
    return http.post("/v1/chat/completions", json={**CHAT, **change})


def test_bad_prompts(http):
    assert_error(_completion(http, prompt="hello " * 400), 400, "prompt")  # longer than max_model_len
    assert_error(_completion(http, prompt=list(range(MAX_MODEL_LEN))), 400, "prompt")
    assert_error(_completion(http, prompt=[1, 10**9]), 400, "prompt")  # outside the vocabulary
    assert_error(_completion(http, prompt=[-1]), 400, "prompt")
    assert_error(_completion(http, prompt=[]), 400, "prompt")
    assert_error(_completion(http, prompt=""), 400, "prompt")
    assert_error(_completion(http, prompt=["ok", "x" * 2000]), 400, "prompt")  # one bad prompt of a batch
    assert_error(_completion(http, prompt=["a"] * 257), 400, "prompt")
    assert_error(_completion(http, prompt=["a"] * 9, n=128), 400, "n")
    # A lone surrogate is valid JSON but no tokenizer takes it (httpx refuses to encode it, hence bytes).
    lone = b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'
    r = http.post("/v1/completions", content=lone, headers={"content-type": "application/json"})
    assert_error(r, 400, "prompt")
    assert_error(_chat(http, messages=[{"role": "user", "content": "hello " * 400}]), 400, "messages")
    assert_error(_chat(http, messages=[]), 400, "messages")
    assert_error(_chat(http, messages=[{"role": "robot", "content": "x"}]), 400, "messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert_error(_chat(http, messages=image), 400, "messages")
    assert_error(_chat(http, top_logprobs=2), 400, "top_logprobs")  # without logprobs=true
    assert_error(_chat(http, tools=[{"type": "function"}]), 400, "tools")
    # The stream is refused before it starts: a 400, not a 200 with an error event.
    assert_error(_completion(http, prompt="hello " * 400, stream=True), 400, "prompt")


def test_unknown_model_is_404(http, client):
    assert_error(_completion(http, model="gpt-4"), 404, "model", "model_not_found")
    assert_error(_chat(http, model="gpt-4"), 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-4"), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_auth(server):
    url = server.url
    routes = (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("POST", "/tokenize"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": "Basic x"}):
        for method, path in routes:
            r = httpx.request(method, url + path, json=COMPLETION, headers=headers)
            assert_error(r, 401, code="invalid_api_key")
        # Malformed JSON without a key is still an auth failure first.
        assert_error(httpx.post(url + "/v1/completions", content=b"{", headers=headers), 401)
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_routes_and_methods(http):
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={}), 400, "prompt")
    assert_error(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model")


def test_bad_request_does_not_disturb_others(http, client):
    """A stream in flight survives a burst of bad requests next to it."""
    stream = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=30, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for _ in range(10):
        assert_error(_completion(http, prompt="hello " * 400), 400)
        assert_error(http.post("/v1/completions", content=b"{"), 400)
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[0].completion_tokens == 30
    assert http.get("/health").status_code == 200
