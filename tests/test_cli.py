"""The console script runs end to end on a tiny checkpoint."""

import subprocess
import sys


def test_generate_cli(tiny_model):
    r = subprocess.run([sys.executable, "-m", "nanoflow.cli", "generate", tiny_model("llama"), "--prompt", "Hello",
                        "--max-tokens", "5", "--max-model-len", "128"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "finish_reason=" in r.stdout


def test_cli_reports_errors_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanoflow.cli", "generate", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr
