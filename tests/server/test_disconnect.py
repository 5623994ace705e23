"""Clients that hang up mid-stream: their requests are aborted inside the engine at once and every
KV page comes back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_utils import MODEL_NAME, metric, scrape

STREAMS = 50
MAX_TOKENS = 200  # far more than is read: the requests are still generating when the clients leave


async def _open_and_leave(client: httpx.AsyncClient, i: int, chat: bool) -> int:
    if chat:
        messages = [{"role": "user", "content": f"Tell me a story {i}"}]
        path, body = "/v1/chat/completions", {"messages": messages}
    else:
        path, body = "/v1/completions", {"prompt": f"Once upon a time {i}"}
    body |= {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    chunks = 0
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the request finished before the client left"
                chunks += 1
                if chunks == 3:
                    break
    # Leaving the block closes the connection mid-stream.
    return chunks


def _wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        busy = metric(m, "nanoflow:num_requests_running") + metric(m, "nanoflow:num_requests_waiting")
        idle = busy == 0 and metric(m, "nanoflow:kv_pages_free") == metric(m, "nanoflow:kv_pages_total")
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_cancelled_streams_free_everything(server, capsys):
    aborted_before = metric(scrape(server.url), "nanoflow:request_success_total", finished_reason="abort")
    tokens_before = metric(scrape(server.url), "nanoflow:generation_tokens_total")

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=STREAMS)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60.0,
                                     limits=limits) as c:
            return await asyncio.gather(*(_open_and_leave(c, i, chat=i % 2 == 1) for i in range(STREAMS)))

    assert all(n == 3 for n in asyncio.run(run()))
    left = time.monotonic()
    m = _wait_idle(server.url, timeout=10.0)
    freed_after = time.monotonic() - left
    assert metric(m, "nanoflow:num_requests_running") == 0
    assert metric(m, "nanoflow:num_requests_waiting") == 0
    assert metric(m, "nanoflow:kv_pages_free") == metric(m, "nanoflow:kv_pages_total") > 0
    assert metric(m, "nanoflow:kv_cache_usage_perc") == 0
    # Aborted, not run to completion: every request counted as aborted, and far fewer tokens were
    # generated than 50 x 200.
    aborted = metric(m, "nanoflow:request_success_total", finished_reason="abort") - aborted_before
    assert aborted == STREAMS
    generated = metric(m, "nanoflow:generation_tokens_total") - tokens_before
    assert generated < STREAMS * MAX_TOKENS / 2, generated
    with capsys.disabled():
        print(f"\n{STREAMS} cancelled streams: engine idle {freed_after * 1000:.0f} ms after clients left, "
              f"{generated:.0f} of {STREAMS * MAX_TOKENS} tokens generated")
    # And the server still serves.
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_timeout_aborts(server):
    """A non-streaming client that gives up is noticed through the ASGI disconnect message."""
    before = scrape(server.url)
    aborted_before = metric(before, "nanoflow:request_success_total", finished_reason="abort")
    tokens_before = metric(before, "nanoflow:generation_tokens_total")
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 240, "n": 64, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=0.3)
    # On a loaded machine the server may notice the disconnect before the request reached the
    # engine (nothing to abort) or a moment after the engine went idle: poll for the outcome.
    deadline = time.monotonic() + 10.0
    while True:
        m = _wait_idle(server.url, timeout=10.0)
        aborted = metric(m, "nanoflow:request_success_total", finished_reason="abort") - aborted_before
        never_ran = metric(m, "nanoflow:generation_tokens_total") == tokens_before
        if aborted == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert metric(m, "nanoflow:kv_pages_free") == metric(m, "nanoflow:kv_pages_total")
    assert aborted == 1 or (aborted == 0 and never_ran)
    assert metric(m, "nanoflow:request_success_total", finished_reason="length") == metric(
        before, "nanoflow:request_success_total", finished_reason="length")
