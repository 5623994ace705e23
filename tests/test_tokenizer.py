"""A checkpoint folder without tokenizer files: a clear error naming what is missing and the two
ways out, a tokenizer from another folder (tokenizer=PATH), or none at all (skip_tokenizer_init)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.tokenizer import load_tokenizer

_WEIGHTS_AND_CONFIG = ("config.json", "generation_config.json", "model.safetensors")
_GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def no_tokenizer_model(tiny_model, tmp_path) -> str:
    """The tiny llama checkpoint without its tokenizer files."""
    src, dst = tiny_model("llama"), tmp_path / "model"
    dst.mkdir()
    for f in _WEIGHTS_AND_CONFIG:
        shutil.copy(os.path.join(src, f), dst)
    assert not any(f.startswith("tokenizer") for f in os.listdir(dst))
    return str(dst)


def test_missing_tokenizer_names_the_folder_the_files_and_the_ways_out(no_tokenizer_model):
    with pytest.raises(ValueError) as e:
        LLM(no_tokenizer_model, max_model_len=64, num_kv_pages=8)
    msg = str(e.value)
    assert no_tokenizer_model in msg
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json + merges.txt", ".tiktoken"):
        assert f in msg
    for way_out in ("tokenizer=PATH", "--tokenizer PATH", "skip_tokenizer_init=True", "--skip-tokenizer-init",
                    "prompt_token_ids"):
        assert way_out in msg
    assert "installed" not in msg  # not transformers' advice to install sentencepiece or tiktoken


def test_transformers_failure_is_wrapped(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    with pytest.raises(ValueError, match="(?s)could not load a tokenizer from .*tokenizer=PATH.*transformers said"):
        load_tokenizer(str(tmp_path), None, False)
    assert load_tokenizer(str(tmp_path), None, True) is None


def test_tokenizer_from_another_folder(no_tokenizer_model, tiny_model):
    llm = LLM(no_tokenizer_model, tokenizer=tiny_model("llama"), max_model_len=64, num_kv_pages=8)
    tok = llm.get_tokenizer()
    assert tok is not None
    ids = tok.encode("The quick brown fox")
    by_text, by_ids = llm.generate(["The quick brown fox", {"prompt_token_ids": ids}], _GREEDY, use_tqdm=False)
    assert by_text.error is None and by_text.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    out = by_text.outputs[0]
    assert len(out.token_ids) == 4 and out.text == tok.decode(out.token_ids)


def test_skip_tokenizer_init_takes_token_ids_and_rejects_text(no_tokenizer_model):
    llm = LLM(no_tokenizer_model, skip_tokenizer_init=True, max_model_len=64, num_kv_pages=8)
    assert llm.get_tokenizer() is None
    by_ids, by_text = llm.generate([{"prompt_token_ids": [5, 17, 42, 99]}, "Hello"], _GREEDY, use_tqdm=False)
    assert by_ids.error is None and len(by_ids.outputs[0].token_ids) == 4 and by_ids.outputs[0].text == ""
    assert by_text.outputs[0].finish_reason == "error" and "tokenizer" in by_text.error
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        llm.chat([{"role": "user", "content": "Hi"}], _GREEDY, use_tqdm=False)
