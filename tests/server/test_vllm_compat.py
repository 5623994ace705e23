"""What a vLLM user types works as in vLLM: the README's curl and openai examples run as written
against a server started with the name they use, several served names, vLLM's flags and endpoints.
One extra server (no API key, vLLM-style flags) is shared by this module."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_utils import Server, start_server, stop_server

README = Path(__file__).resolve().parents[2] / "README.md"
README_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIAS = "smol"


TEMPLATE = ("{% for m in messages %}[[{{ m['role'] }}]]{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}[[assistant]]{% endif %}")
GENERATION_CONFIG = {"temperature": 0.0, "max_new_tokens": 3, "bos_token_id": 0}


@pytest.fixture(scope="module")
def vllm_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No API key, two names, and vLLM's flags: a chat template file, a generation config folder
    (greedy, 3 tokens by default), no request log, uvicorn at warning."""
    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "template.jinja").write_text(TEMPLATE)
    (tmp / "gen").mkdir()
    (tmp / "gen" / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    srv = start_server(model_path, tmp / "server.log", "--chat-template", str(tmp / "template.jinja"),
                       "--generation-config", str(tmp / "gen"), "--disable-log-requests",
                       "--uvicorn-log-level", "warning", served_names=(README_NAME, ALIAS), api_key=None)
    yield srv
    code = stop_server(srv)
    assert code == 0, f"server exited with {code} on SIGTERM:\n{srv.log()}"


def _readme_block(lang: str, needle: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, f"expected one {lang} block with {needle!r} in README.md"
    return found[0]


def _on(server: Server, text: str) -> str:
    """The README talks to the default port; the test server runs on a free one."""
    return text.replace("http://127.0.0.1:8000", server.url)


def test_readme_curl_example(vllm_server):
    words = shlex.split(_readme_block("bash", "curl http").replace("\\\n", " "))
    assert words[0] == "curl"
    url = next(w for w in words if w.startswith("http"))
    headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
    data = words[words.index("-d") + 1]
    r = httpx.post(_on(vllm_server, url), content=data.encode(), headers=headers, timeout=60.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == README_NAME and body["choices"][0]["message"]["content"] is not None


def test_readme_openai_example(vllm_server):
    code = _readme_block("python", "from openai import OpenAI")
    scope: dict = {}
    exec(compile(_on(vllm_server, code), "README.md", "exec"), scope)  # noqa: S102 - the README's own snippet
    r = scope["r"]
    assert r.model == README_NAME and r.choices[0].finish_reason in ("stop", "length")


def test_served_model_names(vllm_server):
    """Every --served-model-name is accepted; responses and /v1/models report the first."""
    import openai

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0)
    for name in (README_NAME, ALIAS):
        resp = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert resp.model == README_NAME
        assert client.models.retrieve(name).id == README_NAME
    assert [m.id for m in client.models.list().data] == [README_NAME]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2)


def test_model_argument_is_the_served_name(monkeypatch):
    """Without --served-model-name the model is served under the argument as given; the built-in
    model's Hugging Face id names the built-in copy (nothing is fetched from a hub)."""
    from nanoflow import cli

    monkeypatch.setattr("nanoflow.models.default_model.default_model_path", lambda: "/cache/smol")
    assert cli.resolve_model(None) == ("/cache/smol", README_NAME)
    assert cli.resolve_model(README_NAME) == ("/cache/smol", README_NAME)
    assert cli.resolve_model("./my/model") == ("./my/model", "./my/model")
    args = cli.build_parser().parse_args(["serve", "m", "--served-model-name", "a", "b"])
    assert args.served_model_name == ["a", "b"]


def test_chat_template_flag(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=60.0) as http:
        ids = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
        assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "[[user]]Hi[[assistant]]"


def test_generation_config_defaults(vllm_server):
    """Requests that leave temperature and the length unset get the generation config's values."""
    import openai

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hello there"}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3  # max_new_tokens, not max_model_len
    runs = [client.completions.create(model=ALIAS, prompt="The quick brown", extra_body={"ignore_eos": True})
            for _ in range(2)]
    greedy = client.completions.create(model=ALIAS, prompt="The quick brown", temperature=0, max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert runs[0].choices[0].text == runs[1].choices[0].text == greedy.choices[0].text  # temperature 0
    assert runs[0].usage.completion_tokens == 3  # not OpenAI's 16
    own = client.completions.create(model=ALIAS, prompt="The quick brown", max_tokens=5, temperature=1.0, seed=1,
                                    extra_body={"ignore_eos": True})
    assert own.usage.completion_tokens == 5  # what the request sets wins


def test_load_sampling_defaults(tmp_path):
    from nanoflow.entrypoints.server.generation_config import load_sampling_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True}))
    assert load_sampling_defaults("auto", str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                              "repetition_penalty": 1.1}
    assert load_sampling_defaults(str(tmp_path / "generation_config.json"), "elsewhere")["top_k"] == 20
    assert load_sampling_defaults("vllm", str(tmp_path)) == {}
    assert load_sampling_defaults("auto", str(tmp_path / "none")) == {}  # a checkpoint without the file
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_sampling_defaults(str(tmp_path / "none"), "m")
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ValueError, match="top_p"):
        load_sampling_defaults("auto", str(tmp_path))


def test_log_flags(vllm_server, server):
    """--disable-log-requests drops the per-request line; --uvicorn-log-level warning uvicorn's info lines."""
    assert "Received request" not in vllm_server.log_path.read_text(errors="replace")
    assert "Uvicorn running on" not in vllm_server.log_path.read_text(errors="replace")
    httpx.post(f"{server.url}/v1/completions", headers=server.headers,
               json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    assert "Received request cmpl-" in server.log_path.read_text(errors="replace")
    assert "Uvicorn running on" in server.log_path.read_text(errors="replace")


def test_version_and_ping(server):
    """Open like /health (vLLM's probes), on the session server that has an API key."""
    import nanoflow

    assert httpx.get(f"{server.url}/version").json() == {"version": nanoflow.__version__}
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert httpx.post(f"{server.url}/ping").status_code == 200


@pytest.mark.parametrize("path,body,status,says", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool calling"),
    ("/v1/chat/completions", {"tool_choice": "required"}, 400, "tool calling"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, 400, "tool calling"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "structured output"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 400, "structured output"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, 400, "structured output"),
    ("/v1/chat/completions", {"guided_choice": ["a", "b"]}, 400, "structured output"),
    ("/v1/embeddings", {"input": "hi"}, 404, "embeddings: not supported by nanoflow"),
    ("/v1/rerank", {}, 404, "reranking: not supported"),
], ids=lambda x: str(x)[:30])
def test_missing_features_are_named(http, path, body, status, says):
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = http.post(path, json={**base, **body})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"] and "not supported by nanoflow" in r.json()["error"]["message"]


def test_vllm_flag_names(monkeypatch):
    from nanoflow.cli import build_parser
    from nanoflow.engine_args import engine_args_from_cli
    from nanoflow.entrypoints.server.app import read_chat_template

    monkeypatch.setenv("NANOFLOW_API_KEY", "from-env")
    parser = build_parser()
    args = parser.parse_args(["serve", "m", "-tp", "2", "--enforce-eager", "--tokenizer", "t",
                              "--disable-log-requests", "--uvicorn-log-level", "debug"])
    engine = engine_args_from_cli(args, "m")
    assert (engine.tensor_parallel_size, engine.enforce_eager, engine.tokenizer) == (2, True, "t")
    assert args.api_key == "from-env" and args.disable_log_requests and args.uvicorn_log_level == "debug"
    assert args.generation_config == "auto" and args.chat_template is None
    assert parser.parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    assert parser.parse_args(["bench", "-tp", "4"]).tensor_parallel_size == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--uvicorn-log-level", "loud"])
    assert read_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template("/no/such/template.jinja")
