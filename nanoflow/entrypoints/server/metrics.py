"""Prometheus metrics, named like vLLM's (`vllm:` -> `nanoflow:`).

Each server owns its CollectorRegistry, so two servers in one process (tests) never share state
and nothing lands in prometheus_client's global default registry. Engine gauges are pushed by the
engine thread after each iteration (prometheus_client metrics are thread safe); scrapes never
touch the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0)


@dataclass
class EngineStats:
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    preemptions: int  # cumulative


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"nanoflow:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"nanoflow:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"nanoflow:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self._model = model_name
        self.running = gauge("num_requests_running", "Requests with sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0..1).")
        self.kv_free = gauge("kv_pages_free", "Free KV-cache pages.")
        self.kv_total = gauge("kv_pages_total", "KV-cache pages in the pool.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter("nanoflow:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._http = Counter("nanoflow:http_requests", "HTTP responses by route and status code.",
                             ["model_name", "route", "status"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             _E2E_BUCKETS)
        self._preemptions_seen = 0

    # --- called by the engine thread -------------------------------------------------------------
    def engine_stats(self, s: EngineStats) -> None:
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self.kv_free.set(s.free_pages)
        self.kv_total.set(s.total_pages)
        self.kv_usage.set(1.0 - s.free_pages / s.total_pages if s.total_pages else 0.0)
        if s.preemptions > self._preemptions_seen:
            self.preemptions.inc(s.preemptions - self._preemptions_seen)
            self._preemptions_seen = s.preemptions

    def first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(prompt_tokens)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def finished(self, reason: str, e2e: float, tpot: float | None) -> None:
        self._success.labels(self._model, reason).inc()
        self.e2e.observe(e2e)
        if tpot is not None:
            self.tpot.observe(tpot)

    # --- called by the HTTP side -----------------------------------------------------------------
    def http_response(self, route: str, status: int) -> None:
        self._http.labels(self._model, route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
