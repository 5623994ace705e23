"""Bad models and bad requests give clear errors; a bad request never takes the others down."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from nanoflow import LLM, SamplingParams


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_architecture(tiny_model, tmp_path):
    path = _copy(tiny_model("llama"), tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        LLM(path)


def test_missing_folder_and_weights(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    path = _copy(tiny_model("llama"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="no .safetensors"):
        LLM(path)


def test_shape_mismatch_and_missing_tensor(tiny_model, tmp_path):
    path = _copy(tiny_model("llama"), tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name][:, :8].contiguous()
    save_file(tensors, f)
    with pytest.raises(ValueError, match="shape mismatch"):
        LLM(path)
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match="missing weights for parameter 'layers.0.o_proj.weight'"):
        LLM(path)


def test_sharded_checkpoint_loads(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("mixtral")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shutil.copy(os.path.join(src, "tokenizer.json"), tmp_path / "m")
    shutil.copy(os.path.join(src, "tokenizer_config.json"), tmp_path / "m")
    assert os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    a = LLM(src).generate("Hello", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    b = LLM(str(tmp_path / "m")).generate("Hello", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_too_long_prompts_get_per_request_errors(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=64, num_kv_pages=3)
    prompts = [{"prompt_token_ids": [5] * 10}, {"prompt_token_ids": [5] * 64}, {"prompt_token_ids": [5] * 60},
               {"prompt_token_ids": []}, {"prompt_token_ids": [999999]}, "Hello"]
    llm_big = LLM(tiny_model("llama"), max_model_len=256, num_kv_pages=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) >= 1
    assert "max_model_len=64" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert "KV pages" in outs[2].error
    assert "empty" in outs[3].error
    assert "token ids must be in" in outs[4].error
    assert outs[5].error is None
    assert "the whole cache" in llm_big.generate({"prompt_token_ids": [5] * 100}, use_tqdm=False)[0].error
    assert llm.engine.num_free_pages == llm.engine.num_pages


def test_output_stops_at_max_model_len(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=32)
    out = llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float64"}, "dtype"), ({"device": "tpu"}, "device"), ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"max_model_len": 100000}, "max_model_len"),
    ({"all_reduce": "mpi"}, "all_reduce"), ({"all_reduce": "symm-mem", "device": "cpu"}, "needs CUDA GPUs"),
])
def test_bad_engine_settings(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model("llama"), **kwargs)


def test_abort_frees_pages(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=128)
    eng = llm.engine
    eng.add_request("a", "Hello world", None, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", "The quick brown fox", None, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.num_free_pages < eng.num_pages
    out = eng.abort_request("a")
    assert out.outputs[0].finish_reason == "abort"
    eng.abort_request("b")
    assert eng.num_free_pages == eng.num_pages and not eng.has_unfinished_requests()


def test_sequence_outgrowing_the_whole_pool_stops_with_length(tiny_model):
    """A lone sequence that needs more pages than the pool has ends with "length" instead of being
    preempted and recomputed forever."""
    llm = LLM(tiny_model("llama"), max_model_len=256, num_kv_pages=2)
    out = llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) >= 11
    assert llm.engine.num_free_pages == llm.engine.num_pages
