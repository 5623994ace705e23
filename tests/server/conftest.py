"""A real `nanoflow serve` process on 127.0.0.1 serving the tiny llama checkpoint (tests/helpers.py),
shared by the whole folder; the API key is set so the auth checks run against that same server."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

# The server's extra ([server] and [test]) may be absent, e.g. on a GPU image: skip the folder then.
_NEEDED = ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx", "hypothesis")
_MISSING = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if _MISSING:
    collect_ignore_glob = ["test_*.py"]
else:
    import httpx
    from server_utils import API_KEY, Server, start_server, stop_server


@pytest.fixture(scope="session")
def model_path(tiny_model) -> str:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(model_path, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    code = stop_server(srv)
    assert code == 0, f"server exited with {code} on SIGTERM:\n{srv.log()}"


@pytest.fixture(scope="session")
def client(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60.0) as c:
        yield c
