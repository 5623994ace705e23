"""Property-based fuzz: hypothesis builds request bodies (mostly valid values, some wrong types,
out-of-range numbers, unknown fields, broken JSON) and the server must answer every one with a
2xx or a 4xx carrying the OpenAI error body, never a 500, and stay healthy."""

from __future__ import annotations

import json
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import MODEL_NAME

EXAMPLES = 300

_text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["Hello world", "The quick", "\n", " "])
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8), st.lists(st.integers(-5, 500), max_size=4), st.dictionaries(st.text(max_size=4),
                                                                                   st.integers(), max_size=2),
)
_prompt = st.one_of(_text, st.lists(st.integers(-2, 400), min_size=0, max_size=12),
                    st.lists(_text, min_size=1, max_size=3),
                    st.lists(st.lists(st.integers(0, 383), min_size=1, max_size=6), min_size=1, max_size=2))
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot"])},
    optional={"content": st.one_of(_text, st.none(), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": _text}), max_size=2)),
              "name": _text},
)
_stop = st.one_of(_text, st.lists(_text, max_size=3), st.none())

# In-range values per field: a request built only from these should mostly succeed.
_VALID = {
    "model": st.just(MODEL_NAME),
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2, allow_nan=False) | st.sampled_from([0, 1e-30, 1e30]),
    "top_p": st.floats(0.01, 1, allow_nan=False),
    "top_k": st.integers(-1, 1000) | st.just(2**30),
    "min_p": st.floats(0, 1, allow_nan=False),
    "n": st.integers(1, 3),
    "stop": st.one_of(_text.filter(bool), st.lists(_text.filter(bool), max_size=3), st.none()),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2, allow_nan=False),
    "frequency_penalty": st.floats(-2, 2, allow_nan=False),
    "repetition_penalty": st.floats(0.01, 3, allow_nan=False),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "stop_token_ids": st.lists(st.integers(0, 383), max_size=3),
    "stream": st.booleans(),
    "user": _text,
    "skip_special_tokens": st.booleans(),
}
_VALID_COMPLETION = {**_VALID, "prompt": st.one_of(_text.filter(str.strip),
                                                   st.lists(st.integers(0, 383), min_size=1, max_size=12)),
                     "logprobs": st.integers(0, 5) | st.none(), "echo": st.booleans()}
_VALID_CHAT = {**_VALID, "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _text}), min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(),
    "add_generation_prompt": st.booleans()}
# Hostile values: out of range, unsupported, unknown; each field may also get junk of any type.
_HOSTILE = {
    "model": st.sampled_from([MODEL_NAME, "other-model", ""]),
    "max_tokens": st.integers(-1, 6) | st.none(),
    "temperature": st.floats(-0.5, 2.5, allow_nan=False),
    "top_p": st.floats(-0.1, 1.1, allow_nan=False),
    "top_k": st.integers(-3, 1000) | st.just(2**40),
    "min_p": st.floats(-0.1, 1.1, allow_nan=False),
    "n": st.integers(-1, 3) | st.just(10**6),
    "stop": _stop,
    "seed": st.integers(-(2**70), 2**70),
    "presence_penalty": st.floats(-3, 3, allow_nan=False),
    "repetition_penalty": st.floats(-1, 3, allow_nan=False),
    "min_tokens": st.integers(-1, 8),
    "stop_token_ids": st.lists(st.integers(-1, 10**6), max_size=3),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2"]), st.floats(-1, 1), max_size=1),
    "unknown_field": st.integers(),
}
_HOSTILE_COMPLETION = {**_HOSTILE, "prompt": _prompt, "logprobs": st.integers(-1, 30), "echo": st.booleans(),
                       "suffix": st.none() | _text, "best_of": st.integers(0, 3)}
_HOSTILE_CHAT = {**_HOSTILE, "messages": st.lists(_message, min_size=0, max_size=3),
                 "max_completion_tokens": st.integers(-1, 6), "logprobs": st.booleans(),
                 "top_logprobs": st.integers(-1, 30),
                 "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                 "tools": st.lists(st.just({"type": "function"}), max_size=1)}
_ENDPOINTS = {"/v1/completions": (_VALID_COMPLETION, _HOSTILE_COMPLETION, "prompt"),
              "/v1/chat/completions": (_VALID_CHAT, _HOSTILE_CHAT, "messages")}


@st.composite
def requests(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(_ENDPOINTS)))
    valid, hostile, required = _ENDPOINTS[path]
    kind = draw(st.integers(0, 19))
    if kind == 0:  # not JSON at all, or not an object
        return path, draw(st.sampled_from([b"{", b"", b"[]", b"null", b'{"prompt": }', b"\xff", b'"x"']))
    body = {required: draw(valid[required])}
    if kind < 11:  # in range: these mostly generate
        for name in sorted(draw(st.sets(st.sampled_from(sorted(valid)), max_size=8))):
            body[name] = draw(valid[name])
    else:  # one to three hostile fields on top of valid ones
        for name in sorted(draw(st.sets(st.sampled_from(sorted(valid)), max_size=4))):
            body[name] = draw(valid[name])
        bad = draw(st.sets(st.sampled_from(sorted(hostile) + [required]), min_size=1, max_size=3))
        for name in sorted(bad):
            body[name] = draw(_junk if draw(st.booleans()) else hostile[name])
    if "stream" not in body and draw(st.integers(0, 2)) == 0:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    # Keeps generation short: chat without a limit would run to max_model_len.
    if not isinstance(body.get("max_tokens"), int) and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return path, json.dumps(body).encode()


def _check_response(r: httpx.Response, stream: bool) -> None:
    assert r.status_code != 500 and r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return
    assert r.status_code == 200
    if not stream:
        assert r.json()["choices"]
        return
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        chunk = json.loads(ln.removeprefix("data: "))
        assert "error" not in chunk, chunk


def test_fuzz_never_500(server):
    seen: Counter[tuple[int, bool]] = Counter()
    with httpx.Client(base_url=server.url, headers={**server.headers, "content-type": "application/json"},
                      timeout=60.0) as http:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def run(req: tuple[str, bytes]) -> None:
            path, body = req
            r = http.post(path, content=body)
            try:
                stream = json.loads(body).get("stream") is True
            except (ValueError, AttributeError):
                stream = False
            _check_response(r, stream)
            seen[(r.status_code // 100, stream)] += 1

        run()
        assert http.get("/health").status_code == 200
    # The fuzz must exercise generation (streamed and not) as well as rejections.
    assert sum(seen.values()) == EXAMPLES, seen
    assert min(seen[(2, False)], seen[(2, True)], seen[(4, False)]) >= EXAMPLES // 10, seen
