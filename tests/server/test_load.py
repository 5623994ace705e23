"""Load: 64 concurrent streaming clients x 4 requests of mixed lengths, through the openai client.
Every request must come back whole (exactly max_tokens tokens), none lost, server healthy after."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import openai
from server_utils import API_KEY, MODEL_NAME, metric, scrape

CLIENTS = 64
REQUESTS_PER_CLIENT = 4
LENGTHS = (4, 9, 16, 33)  # max_tokens, mixed within each client


async def _client(oai: openai.AsyncOpenAI, c: int) -> list[tuple[int, int, float]]:
    """(max_tokens, completion_tokens, ttft seconds) of each of this client's requests."""
    results = []
    for r in range(REQUESTS_PER_CLIENT):
        max_tokens = LENGTHS[(c + r) % len(LENGTHS)]
        chat = (c + r) % 2 == 0
        start = time.perf_counter()
        ttft = None
        usage = None
        if chat:
            stream = await oai.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": f"client {c} request {r}"}],
                max_tokens=max_tokens, temperature=1.0, seed=c * 10 + r, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        else:
            stream = await oai.completions.create(
                model=MODEL_NAME, prompt=f"client {c} request {r}: " + "word " * (c % 7) * 5,
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            # The first chunk that carries generated output (chat opens with a role-only delta).
            if ttft is None and chunk.choices and (not chat or chunk.choices[0].delta.content
                                                   or chunk.choices[0].finish_reason):
                ttft = time.perf_counter() - start
        assert usage is not None, "no usage chunk"
        if ttft is None:  # every token decoded to nothing visible: count the whole request
            ttft = time.perf_counter() - start
        results.append((max_tokens, usage.completion_tokens, ttft))
    return results


def test_64_concurrent_streaming_clients(server, capsys):
    async def run() -> tuple[list[tuple[int, int, float]], float]:
        http_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS * 2), timeout=120.0)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      http_client=http_client) as oai:
            t0 = time.perf_counter()
            per_client = await asyncio.gather(*(_client(oai, c) for c in range(CLIENTS)))
            return [x for results in per_client for x in results], time.perf_counter() - t0

    before = scrape(server.url)
    results, elapsed = asyncio.run(run())
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT, "requests were lost"
    wrong = [(want, got) for want, got, _ in results if want != got]
    assert not wrong, f"{len(wrong)} requests came back with the wrong token count: {wrong[:5]}"

    after = scrape(server.url)
    assert httpx.get(f"{server.url}/health").status_code == 200
    done = metric(after, "nanoflow:request_success_total", finished_reason="length") - \
        metric(before, "nanoflow:request_success_total", finished_reason="length")
    assert done == len(results)
    assert metric(after, "nanoflow:kv_pages_free") == metric(after, "nanoflow:kv_pages_total")

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert grew("nanoflow:generation_tokens_total") == sum(want for want, _, _ in results)
    assert grew("nanoflow:prompt_tokens_total") > 0
    assert grew("nanoflow:time_to_first_token_seconds_count") == len(results)
    assert grew("nanoflow:e2e_request_latency_seconds_count") == len(results)
    assert grew("nanoflow:time_per_output_token_seconds_count") == len(results)  # all have > 1 token
    assert grew("nanoflow:http_requests_total") >= len(results)
    ttfts = sorted(t for _, _, t in results)
    p50 = statistics.median(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    tokens = sum(got for _, got, _ in results)
    with capsys.disabled():
        print(f"\nload: {len(results)} streaming requests from {CLIENTS} clients in {elapsed:.2f}s: "
              f"{len(results) / elapsed:.1f} req/s, {tokens / elapsed:.0f} output tok/s, "
              f"TTFT p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")

