"""The CLI starts at once: building the parser, --help and argument errors import neither torch nor
transformers (the package's public names load lazily), and `make default-model` starts no Python
when the model is already prepared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "triton", "fastapi")
ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import contextlib, io, json, sys
from nanoflow.cli import build_parser, main
parser = build_parser()
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.mark.parametrize("argvs", [
    [],  # the parser alone
    [["--help"], ["bench", "--help"], ["serve", "--help"], ["generate", "--help"], ["tune", "--help"]],
    [["serve", "--port", "x"], ["bench", "--dummy", "nope"], ["generate", "--kv-cache-dtype", "int8"], ["nope"]],
], ids=["parser", "help", "argument-errors"])
def test_cli_imports_nothing_heavy(argvs):
    code = _PROBE.format(argvs=argvs, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [], out.stdout


def test_help_is_fast():
    for argv in (["--help"], ["bench", "--help"], ["serve", "--port", "x"]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "nanoflow.cli", *argv], capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - t0
        assert r.returncode == (2 if "x" in argv else 0), r.stderr
        print(f"nanoflow {' '.join(argv)}: {took:.2f}s")
        assert took < 2.0, f"nanoflow {' '.join(argv)} took {took:.2f}s"


def test_package_names_load_lazily():
    code = ("import sys, nanoflow\nassert 'torch' not in sys.modules\n"
            "from nanoflow import LLM, SamplingParams, RequestOutput, CompletionOutput\n"
            "assert LLM.__name__ == 'LLM' and SamplingParams.__module__ == 'nanoflow.sampling_params'\n"
            "assert 'LLM' in dir(nanoflow) and nanoflow.__version__\n"
            "try:\n    nanoflow.nope\nexcept AttributeError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_default_model_skips_a_prepared_model(tmp_path):
    """PY=false: if the Makefile started Python at all, make would fail."""
    model = tmp_path / "SmolLM2-135M-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    make = ["make", "-s", "-C", str(ROOT), "-o", ".venv/.nanoflow-installed", "default-model", "PY=false",
            f"NANOFLOW_CACHE={tmp_path}"]
    r = subprocess.run(make, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == str(model), r.stdout + r.stderr
    (model / "model.safetensors").unlink()  # not prepared: the conversion step runs (and fails here)
    assert subprocess.run(make, capture_output=True, text=True, timeout=30).returncode != 0


def test_bench_defaults_to_the_built_in_model_and_takes_num_prompts(monkeypatch):
    from nanoflow import cli

    seen = {}
    monkeypatch.setattr("nanoflow.models.default_model.default_model_path", lambda: "/cache/smol")
    monkeypatch.setattr("nanoflow.bench.throughput.run_bench", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["bench", "--num-prompts", "7"]) == 0
    assert seen["args"].model == "/cache/smol" and seen["args"].num_requests == 7
    seen.clear()
    cli.main(["bench", "--dummy", "llama3-8b"])
    assert seen["args"].model is None and seen["args"].dummy == "llama3-8b"


def test_a_runner_start_freezes_the_heap_and_frees_what_an_earlier_one_froze() -> None:
    """freeze_heap (at every ModelRunner start): the objects alive then skip the collector's full
    passes, and cyclic garbage among them goes at the next start."""
    import gc
    import weakref

    from nanoflow.executor.model_runner import freeze_heap

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: exempt from collection
        freeze_heap()
        assert gone() is None  # the next start unfreezes first
    finally:
        gc.unfreeze()
