"""Graceful shutdown of a real server process: SIGINT/SIGTERM stop new connections, in-flight
streams finish, the process exits 0. (The session server's teardown checks SIGTERM too.)"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from server_utils import MODEL_NAME, start_server


@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_signal_drains_in_flight_streams_and_exits_0(model_path, tmp_path, sig):
    srv = start_server(model_path, tmp_path / "server.log")
    try:
        results: dict[int, list[dict]] = {}
        first_chunk = threading.Barrier(5, timeout=60)  # a failed stream breaks it instead of hanging

        def stream(i: int) -> None:
            body = {"model": MODEL_NAME, "prompt": f"story {i}", "max_tokens": 240, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            chunks: list[dict] = []
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                              timeout=60.0) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if not chunks:
                            first_chunk.wait()
                        chunks.append(json.loads(line[6:]) if line != "data: [DONE]" else {"done": True})
                        time.sleep(0.002)  # a slowish reader keeps the request in flight a while
            results[i] = chunks

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        first_chunk.wait()  # every stream is generating
        srv.proc.send_signal(sig)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutdown began
            httpx.get(f"{srv.url}/health", timeout=2.0)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert len(results) == 4
    for chunks in results.values():
        assert chunks[-1] == {"done": True}
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage and usage[0]["completion_tokens"] == 240  # finished, not cut off
