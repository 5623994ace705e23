"""Request semantics as vLLM's: max_tokens beyond the room max_model_len leaves is a 400 naming the
three numbers, unknown fields are ignored (and logged once per name), and every validation message
says the limit or the expected form in plain words."""

from __future__ import annotations

import time

import openai
import pytest
from server_utils import MAX_MODEL_LEN, MODEL_NAME

PROMPT = [5] * (MAX_MODEL_LEN - 16)  # token ids: exactly 16 tokens of room left


def test_max_tokens_beyond_context_is_400(client):
    ok = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    assert ok.usage.prompt_tokens == len(PROMPT)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=17)
    err = e.value.body
    assert err["param"] == "max_tokens"
    assert (f"maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {MAX_MODEL_LEN + 1} "
            f"tokens ({len(PROMPT)} in the prompt, 17 in the completion)") in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI's default max_tokens (16) counts too
        client.completions.create(model=MODEL_NAME, prompt=PROMPT + [5])
    assert "16 in the completion" in e.value.body["message"]


def test_max_completion_tokens_beyond_context_is_400(client, http):
    n = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["count"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=MAX_MODEL_LEN)
    err = e.value.body
    assert err["param"] == "max_completion_tokens"
    assert f"({n} in the messages, {MAX_MODEL_LEN} in the completion)" in err["message"], err
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]


def test_unknown_fields_are_ignored_and_logged_once(client, server):
    extras = {"langchain_extra": {"run_id": 1}, "top_a": 0.1}
    for _ in range(2):
        resp = client.chat.completions.create(
            model=MODEL_NAME, max_completion_tokens=2, extra_body=extras,
            messages=[{"role": "user", "content": "hi", "refusal": None}],  # type: ignore[typeddict-unknown-key]
            stream_options=None)
        assert resp.choices[0].message.content is not None
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, extra_body=extras,
                                     stream=True, stream_options={"include_usage": True, "x_usage": True})
    assert any(chunk.usage for chunk in resp)
    time.sleep(0.2)  # the log line is written by the server process
    log = server.log_path.read_text(errors="replace")
    for name in ("langchain_extra", "top_a", "messages[].refusal", "stream_options.x_usage"):
        assert log.count(f"ignoring the unknown request field '{name}'") == 1, name


def test_too_many_stop_strings_says_the_limit(http):
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "stop": [f"s{i}" for i in range(65)]}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert "at most 64 stop strings" in err["message"] and err["param"] == "stop", err
    assert "more error" not in err["message"]
    body["stop"] = body["stop"][:64]
    assert http.post("/v1/completions", json=body).status_code == 200


def test_union_errors_are_one_message(http):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "stop": [1, 2]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert "more error" not in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "Hello", "stop": [1], "n": "2"})
    assert r.json()["error"]["message"].endswith("Also invalid: 'stop'."), r.json()  # both fields named


@pytest.mark.parametrize("content_type,payload,says", [
    ("text/plain", b'{"prompt": "Hello"}', "must be JSON, sent with 'Content-Type: application/json'"),
    ("application/x-www-form-urlencoded", b'{"prompt": "Hello"}', "Content-Type 'application/x-www-form"),
    ("text/plain", b"", "must be JSON"),
    ("application/json", b"{bad", "must be valid JSON"),
    ("application/json", b"[1, 2]", "must be a JSON object ({...}), not an array"),
    ("application/json", b"", "body is required"),
])
def test_body_must_be_json(http, content_type, payload, says):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=payload, headers={"content-type": content_type})
        assert r.status_code == 400, r.text
        assert says in r.json()["error"]["message"], r.json()
