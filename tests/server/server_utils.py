"""Starting and stopping a real `nanoflow serve` process, and reading its /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256
NUM_KV_PAGES = 512  # 8192 tokens: the load test's 64 streams fit, the 50 cancelled ones nearly so


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model_path: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, log_path: Path, *extra: str, timeout: float = 600.0,
                 served_names: tuple[str, ...] = (MODEL_NAME,), api_key: str | None = API_KEY,
                 env: dict[str, str] | None = None) -> Server:
    """Starts `nanoflow serve` and waits until /health answers 200. It waits as long as the process is
    alive and still starting (a busy 2-core CI machine can take minutes to import torch and load the
    model), and fails at once if the process exits; `timeout` only guards against a hung start."""
    port = free_port()
    cmd = [sys.executable, "-m", "nanoflow.cli", "serve", model_path, "--port", str(port), "--device", "cpu",
           "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-pages", str(NUM_KV_PAGES),
           "--served-model-name", *served_names, *extra]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    # A NANOFLOW_API_KEY of the shell running the tests must not turn on auth; only `env` may set it.
    base = {k: v for k, v in os.environ.items() if k != "NANOFLOW_API_KEY"}
    env = {**base, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", model_path, proc, log_path)
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200:
                # Start-up time (imports, model load, first health answer), for the -s log.
                print(f"\nnanoflow serve healthy after {time.monotonic() - started:.1f}s", flush=True)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server still alive but not healthy after {timeout}s:\n{server.log()}")


def stop_server(server: Server, timeout: float = 30.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode




_SAMPLE = re.compile(r"^([^{\s]+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """/metrics as (name, labels, value) samples."""
    out = []
    for line in httpx.get(f"{url}/metrics", timeout=10.0).text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of a metric's samples over the label sets that match `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))
