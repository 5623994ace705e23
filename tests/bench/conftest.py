"""A tiny random Llama checkpoint (no tokenizer: the bench runs on token ids) for the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner spinning OpenMP
    threads slow every op down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bench_tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench_tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture
def trace_csv(tmp_path: Path) -> Path:
    """Six rows: four that fit max_model_len=256, one too long, one with an empty prompt."""
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 18:15:46.68,40,8\r\n"
        "2023-11-16 18:15:50.99,300,20\r\n"  # 320 > 256: skipped
        "2023-11-16 18:15:51.00,12,30\r\n"
        "2023-11-16 18:15:52.00,0,5\r\n"  # empty prompt: skipped as invalid
        "2023-11-16 18:15:53.00,100,100\r\n"
        "2023-11-16 18:15:54.00,7,1\r\n"
    )
    return path


@pytest.fixture
def tiny_dummy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """shrink(name): the named `--dummy` shape cut to a few layers of width 64 (its architecture
    kept), its folder under tmp_path."""
    from nanoflow.bench import dummy_models

    def shrink(name: str) -> None:
        tiny = {**dummy_models.DUMMY_CONFIGS[name], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
        monkeypatch.setitem(dummy_models.DUMMY_CONFIGS, name, tiny)
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    return shrink
