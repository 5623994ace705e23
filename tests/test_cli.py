"""The console script runs end to end on a tiny checkpoint."""

import subprocess
import sys

import pytest

from nanoflow.cli import build_parser
from nanoflow.engine_args import engine_args_from_cli, engine_kwargs


def test_generate_cli(tiny_model):
    r = subprocess.run([sys.executable, "-m", "nanoflow.cli", "generate", tiny_model("llama"), "--prompt", "Hello",
                        "--max-tokens", "5", "--max-model-len", "128"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "finish_reason=" in r.stdout


def test_cli_reports_errors_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanoflow.cli", "generate", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_kv_cache_dtype_option():
    parser = build_parser()
    for cmd in ("generate", "serve"):
        args = parser.parse_args([cmd, "m", "--kv-cache-dtype", "fp8"])
        assert engine_kwargs(args)["kv_cache_dtype"] == "fp8"
        assert engine_args_from_cli(args, "m").kv_cache_dtype == "fp8"
        assert engine_kwargs(parser.parse_args([cmd]))["kv_cache_dtype"] == "auto"
    assert parser.parse_args(["bench", "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    assert parser.parse_args(["bench"]).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--kv-cache-dtype", "int8"])


def test_enable_expert_parallel_option():
    parser = build_parser()
    for cmd in ("generate", "serve"):
        args = parser.parse_args([cmd, "m", "-tp", "2", "--enable-expert-parallel"])
        assert engine_args_from_cli(args, "m").enable_expert_parallel is True
        assert engine_kwargs(parser.parse_args([cmd]))["enable_expert_parallel"] is False
    assert engine_kwargs(parser.parse_args(["bench", "--enable-expert-parallel"]))["enable_expert_parallel"] is True
    assert parser.parse_args(["bench"]).enable_expert_parallel is False
