from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanoflow.bench.cli_args import DUMMY_NAMES
from nanoflow.bench.dummy_models import DUMMY_CONFIGS, dummy_model_dir
from nanoflow.bench.peak import measure_peak_tflops, optimum_tokens_per_s
from nanoflow.model_arch import ModelArch, load_hf_config

# Published parameter counts: (total, active).
EXPECTED = {
    "llama3-8b": (8.03e9, 8.03e9),
    "llama2-7b": (6.74e9, 6.74e9),
    "qwen2-7b": (7.62e9, 7.62e9),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "llama2-70b": (68.98e9, 68.98e9),
}


def test_names_in_sync() -> None:
    assert tuple(DUMMY_CONFIGS) == DUMMY_NAMES == tuple(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dummy_parameter_counts(name: str, tmp_path: Path) -> None:
    folder = dummy_model_dir(name, str(tmp_path))
    assert json.loads((Path(folder) / "config.json").read_text()) == DUMMY_CONFIGS[name]
    arch = ModelArch.from_hf(load_hf_config(folder))
    total, active = EXPECTED[name]
    assert arch.num_parameters() == pytest.approx(total, rel=5e-3)
    assert arch.active_parameters() == pytest.approx(active, rel=5e-3)


def test_exact_counts() -> None:
    """The well-known exact figures, so a typo in a config cannot hide inside a tolerance."""
    counts = {}
    for name in ("llama3-8b", "llama2-7b", "mixtral-8x7b", "llama2-70b"):
        arch = ModelArch.from_hf(load_hf_config(dummy_model_dir(name)))
        counts[name] = (arch.num_parameters(), arch.active_parameters())
    assert counts["llama3-8b"][0] == 8_030_261_248
    assert counts["llama2-7b"][0] == 6_738_415_616
    assert counts["mixtral-8x7b"] == (46_702_792_704, 12_879_925_248)
    assert counts["llama2-70b"][0] == 68_976_648_192


def test_unknown_dummy() -> None:
    with pytest.raises(ValueError, match="unknown dummy model"):
        dummy_model_dir("gpt-5")


def test_optimum_arithmetic() -> None:
    # gpu-facts.md: 735 TFLOP/s / (2 x 8.03e9) ~ 45,700 tokens/s.
    assert optimum_tokens_per_s(735.0, 8_030_261_248) == pytest.approx(45_764, rel=1e-3)
    assert optimum_tokens_per_s(735.0, 8_030_261_248, num_gpus=8) == pytest.approx(8 * 45_764, rel=1e-3)


def test_cpu_peak_is_labelled() -> None:
    peak = measure_peak_tflops(torch.device("cpu"), seconds=0.02, warmup_seconds=0.0, n=128)
    assert peak["kind"] == "cpu-small" and peak["n"] == 128 and peak["dtype"] == "float32"
    assert peak["samples"] >= 1 and 0 < peak["tflops_min"] <= peak["tflops"] <= peak["tflops_max"]
