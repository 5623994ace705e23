"""`nanoflow tune` end to end on a tiny checkpoint: it profiles, searches and caches a pipeline where
`--pipeline auto` finds it, and the engine that picks it up generates what the sequential one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import synthetic_profiles as sp

from nanoflow import LLM, SamplingParams
from nanoflow.cli import build_parser, main
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.model_runner import pipeline_key
from nanoflow.pipeline.cache import cache_path, choose_pipeline
from nanoflow.pipeline.schedule import Pipeline

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_pages": 64, "max_model_len": 256,
          "max_num_batched_tokens": 32}
FLAGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-pages", "64", "--max-model-len", "256",
         "--max-num-batched-tokens", "32", "--no-tqdm"]
# 24 sequences: steps of up to 32 tokens (chunked prefills beside the first decodes), then decodes
PROMPTS = [[(7 * i + 3 * j) % 300 + 3 for j in range(5 + i % 4)] for i in range(24)]


def _greedy(path: str, pipeline: str) -> tuple[list[list[int]], LLM, list[int]]:
    """Greedy outputs, the engine, and the sizes of the steps that ran a pipeline schedule."""
    llm = LLM(path, pipeline=pipeline, **ENGINE)
    runner, pipelined = llm.engine.runner, []
    choose = runner.executor_for

    def spy(num_tokens: int):
        ex = choose(num_tokens)
        if ex is not None and ex.schedule.num_streams > 1:
            pipelined.append(num_tokens)
        return ex

    runner.executor_for = spy
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm, pipelined


def _key(path: str) -> dict:
    return pipeline_key(EngineConfig.from_args(EngineArgs(path, **ENGINE)), 1)


def test_parser_knows_the_options() -> None:
    args = build_parser().parse_args(["tune", "--dummy", "llama3-8b", "--sizes", "512,1024", "--ctas", "32,44",
                                      "--profile-only", "--max-num-batched-tokens", "1024"])
    assert (args.dummy, args.sizes, args.ctas, args.profile_only) == ("llama3-8b", [512, 1024], [32, 44], True)
    assert args.output_dir == "bench-results" and args.max_num_batched_tokens == 1024 and args.output is None
    # the defaults are what won on an H200: serving steps, buckets from 256 tokens
    assert (args.decode_fraction, args.size_step, args.pingpong_splits) == ("serve", 256, [0.25, 0.375, 0.5])
    assert build_parser().parse_args(["tune", "--decode-fraction", "0.5"]).decode_fraction == 0.5
    args = build_parser().parse_args(["tune", "--dummy", "llama3-8b", "--decode-fraction", "serve",
                                      "--budget-decodes", "512", "--pingpong-splits", "0.5"])
    assert (args.decode_fraction, args.budget_decodes, args.pingpong_splits) == ("serve", 512, [0.5])
    assert args.tp_schedules == ["network", "pingpong"]
    assert build_parser().parse_args(["tune", "--tp-schedules", "pingpong"]).tp_schedules == ["pingpong"]
    assert args.tp_units == [] and not args.execution_units
    assert build_parser().parse_args(["tune", "--tp-units", "56/56/16,120/8"]).tp_units == [(56, 56, 16), (120, 8)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--dummy", "llama3-8b", "--decode-fraction", "1.5"])


def test_default_sizes_follow_the_graphs() -> None:
    """On a GPU each pipeline bucket ends at a CUDA graph size, so every graph gets the schedule
    tuned for its own size; above the largest graph, multiples of --size-step."""
    from nanoflow.config import graph_sizes
    from nanoflow.executor.cuda_graph import capture_sizes
    from nanoflow.tune.cli import default_sizes

    graphs = capture_sizes(2048)  # the engine's defaults at a 2,048-token budget
    assert graphs[-1] == 2048 and 320 in graphs
    assert default_sizes(graphs, 256, 2048) == [256, 320, 384, 448, 512, 768, 1024, 1280, 1536, 1792, 2048]
    few = capture_sizes(1024, graph_sizes([512, 1024], 1024))  # --cuda-graph-sizes 512 1024, max 1024
    assert few == [512, 1024]
    assert default_sizes(few, 256, 2048) == [512, 1024, 1280, 1536, 1792, 2048]
    assert capture_sizes(0) == [] and default_sizes([], 512, 2048) == [512, 1024, 1536, 2048]  # no graphs


def test_tune_then_pipeline_auto(tiny_model, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    path = tiny_model("llama")
    out = tmp_path / "results"
    assert main(["tune", "--model", path, *FLAGS, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--pipeline auto" in printed and "sequential ms" in printed
    cached = cache_path(_key(path))
    assert cached.is_file()
    pipe = Pipeline.load(cached)
    assert [(s.min_tokens, s.max_tokens) for s in pipe.schedules] == [(1, 8), (9, 16), (17, 32)]
    assert all(s.predicted_ms and s.predicted_ms > 0 for s in pipe.schedules)
    (profile_json,) = out.glob("tune-profile_cpu_*.json")
    (search_json,) = out.glob("tune-search_cpu_*.json")
    assert json.loads(search_json.read_text())["pipeline_path"] == str(cached)

    want, _, _ = _greedy(path, "off")
    got, llm, _ = _greedy(path, "auto")
    assert llm.engine.runner.executors, "the engine did not pick the tuned pipeline up"
    assert got == want

    # --profile-only writes a profile and caches nothing new; --profile-json searches it again
    cached.unlink()
    assert main(["tune", "--model", path, *FLAGS, "--output-dir", str(out), "--profile-only"]) == 0
    assert not cached.exists() and len(list(out.glob("tune-profile_*.json"))) == 2
    assert main(["tune", "--profile-json", str(profile_json), "--output", str(tmp_path / "p.json"),
                 "--output-dir", str(out)]) == 0
    assert Pipeline.load(tmp_path / "p.json").key == _key(path)


def test_auto_names_a_pipeline_tuned_for_other_run_settings(tmp_path: Path, monkeypatch, caplog) -> None:
    """--pipeline auto with no file for its key runs sequential, and names a cached file that differs
    only in the settings a run picks (dtype, KV dtype, token budget): a tune in the checkpoint's
    float16 missed by a bench in bfloat16 is a warning, not silence. Another GPU or model is no miss."""
    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path))
    key = {"gpu": "NVIDIA H200", "architecture": "LlamaForCausalLM", "hidden": 8192, "tp": 2, "dtype": "bfloat16",
           "kv_cache_dtype": "float8_e4m3fn", "max_num_batched_tokens": 2048}
    fp16, other_gpu = {**key, "dtype": "float16"}, {**key, "gpu": "NVIDIA H100", "dtype": "float16"}
    for k in (fp16, other_gpu):
        Pipeline((), k).save(cache_path(k))
    (tmp_path / "pipelines" / "garbage.json").write_text("[1, 2")
    with caplog.at_level("INFO", logger="nanoflow.pipeline.cache"):
        assert choose_pipeline("auto", key) is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(cache_path(fp16)) in warned[0]
    assert "but dtype float16 (this engine: dtype bfloat16)" in warned[0]
    caplog.clear()
    assert choose_pipeline("auto", key, quiet=True) is None and not caplog.records
    assert choose_pipeline("auto", fp16) is not None  # its own key: taken


def test_a_saved_profile_where_overlap_pays(tiny_model, tmp_path: Path, monkeypatch, capsys) -> None:
    """A synthetic profile (overlap pays, the tiny model's key) searched by the CLI: the cached
    pipeline splits the decode steps in two nano-batches, and the engine runs it token-exact."""
    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    path = tiny_model("llama")
    profile = sp.profile(0.75, 0.85, 0.5, sizes=[8, 16, 32], key=_key(path), num_layers=2, fixed_costs=False)
    saved = tmp_path / "profile.json"
    saved.write_text(json.dumps(profile))
    assert main(["tune", "--model", path, *FLAGS, "--profile-json", str(saved), "--output-dir",
                 str(tmp_path / "out")]) == 0
    assert "2 nano-batches" in capsys.readouterr().out
    pipe = Pipeline.load(cache_path(_key(path)))
    split = pipe.for_tokens(32)
    assert split is not None and len(split.partitions["dense"]) == 3 and split.num_streams == 2

    want, _, _ = _greedy(path, "off")
    got, llm, pipelined = _greedy(path, "auto")
    # every pipelined step ran a bucket the search split (the synthetic profile makes it split the
    # buckets above 8 tokens, each with the order it prices fastest)
    assert pipelined and all((s := pipe.for_tokens(n)) is not None and s.num_streams == 2 for n in pipelined)
    assert got == want

    # a profile of another setup is refused rather than cached under this one's key
    wrong = json.loads(saved.read_text())
    wrong["key"]["hidden_size"] = 4096
    saved.write_text(json.dumps(wrong))
    assert main(["tune", "--model", path, *FLAGS, "--profile-json", str(saved)]) == 2
    assert "hidden_size" in capsys.readouterr().err
