"""/metrics speaks Prometheus text and carries every metric the issue lists, without the API key."""

from __future__ import annotations

import httpx
from server_utils import metric, scrape

NAMES = (
    "nanoflow:num_requests_running", "nanoflow:num_requests_waiting", "nanoflow:kv_cache_usage_perc",
    "nanoflow:kv_pages_free", "nanoflow:kv_pages_total", "nanoflow:num_preemptions_total",
    "nanoflow:prompt_tokens_total", "nanoflow:generation_tokens_total", "nanoflow:request_success_total",
    "nanoflow:http_requests_total", "nanoflow:time_to_first_token_seconds_bucket",
    "nanoflow:time_per_output_token_seconds_bucket", "nanoflow:e2e_request_latency_seconds_bucket",
)


def test_metrics_names_and_format(server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = scrape(server.url)
    names = {n for n, _, _ in samples}
    assert not [n for n in NAMES if n not in names]
    assert metric(samples, "nanoflow:kv_pages_total") > 0
    assert metric(samples, "nanoflow:request_success_total", finished_reason="length") >= 1
    assert metric(samples, "nanoflow:http_requests_total", route="/v1/completions", status="200") >= 1
    # Every sample carries the served model name.
    assert all(lab.get("model_name") == "tiny" for name, lab, _ in samples if name.startswith("nanoflow:"))
