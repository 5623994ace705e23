"""The built-in default (real SmolLM2-135M-Instruct) matches transformers' generate in fp32."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoflow import LLM, SamplingParams
from nanoflow.models.default_model import default_model_path

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Explain what a GPU is in one sentence."}],
]


@pytest.fixture(scope="module")
def default_path():
    try:
        return default_model_path()
    except ValueError as e:
        pytest.skip(str(e))


def test_default_model_matches_transformers(default_path):
    llm = LLM(default_path, dtype="float32", max_model_len=512)
    outs = llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(default_path, dtype=torch.float32).eval()
    for conv, out in zip(CONVERSATIONS, outs, strict=True):
        ids = llm.apply_chat_template(conv)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref
    assert "paris" in outs[0].outputs[0].text.lower()
