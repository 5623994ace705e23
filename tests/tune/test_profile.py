"""The profiler on the CPU: a tiny checkpoint's layer ops timed at a few sizes, quickly, and the
mixed step it times; its interference tables (GPU only) against a fake timer that knows which ops
each stream ran."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from nanoflow.config import PAGE_SIZE, EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.model_runner import ModelRunner, pipeline_key
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.pipeline.schedule import GEMM_OPS
from nanoflow.tune import profile as profile_mod
from nanoflow.tune.cli import _print_profile
from nanoflow.tune.profile import Workload, mixed_plan, profile_ops
from nanoflow.tune.search import search


def _runner(path: str) -> ModelRunner:
    return ModelRunner(EngineConfig.from_args(EngineArgs(path, device="cpu", dtype="float32", num_kv_pages=64,
                                                         max_model_len=256, pipeline="off")))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_profile_a_tiny_checkpoint_on_the_cpu(tiny_model, arch) -> None:
    runner = _runner(tiny_model(arch))
    names = [op.name for op in runner.model.layer_ops[0]]
    sizes = [8, 16, 32]
    profile = profile_ops(runner, sizes, ctas=[16, 32], workload=Workload(32, 0.5, 8), layers=2, warmup=1,
                          repeats=2)
    assert profile["elapsed_s"] < 20
    profile = json.loads(json.dumps(profile))  # JSON-able as it is
    assert profile["key"] == pipeline_key(runner.config, 1) and profile["device"] == "cpu"
    assert profile["sizes"] == sizes and profile["num_layers"] == 2 and profile["layers_timed"] == [1]
    assert [b["num_decodes"] for b in profile["batches"]] == [4, 8, 16]
    assert [b["prefill_tokens"] for b in profile["batches"]] == [4, 8, 16]
    assert [o["name"] for o in profile["ops"]] == names
    assert {o["name"]: tuple(o["writes"]) for o in profile["ops"]}["decode_attention"] == ("attn@decode",)
    for name in names:
        assert len(profile["op_ms"][name]) == 3 and all(math.isfinite(t) and t > 0 for t in profile["op_ms"][name])
    assert len(profile["forward_ms"]) == 3 and all(t > 0 for t in profile["forward_ms"])
    # SM caps and the interference table need a GPU: recorded as not measured
    assert profile["ctas"] == [] and profile["decode_attention_capped_ms"] == {}
    assert profile["interference"]["needs_gpu"] is True and profile["interference"]["pairs"] == {}
    assert profile["interference"]["prefill_pairs"] == {}
    assert profile["peak_tflops"] is None and profile["timer"]["kind"] == "perf_counter"

    tuning = search(profile)  # the search takes it as it is, and its pipeline runs on this model
    tuning.pipeline.check(names)
    assert [(s.min_tokens, s.max_tokens) for s in tuning.pipeline.schedules] == [(1, 8), (9, 16), (17, 32)]
    for schedule in tuning.pipeline.schedules:
        PipelineExecutor(schedule, runner.model.layer_ops, runner.device)


def test_serving_steps() -> None:
    """--decode-fraction serve: a step of the whole budget holds budget_decodes decodes and prefill,
    a smaller one decodes only; the op profile times decodes-only steps at every size."""
    w = Workload(context_len=64, decode_fraction=1.0, prefill_chunk=10, budget_decodes=12, budget=64)
    assert [w.num_decodes(n) for n in (8, 32, 63, 64)] == [8, 32, 63, 12]
    plan = mixed_plan(64, w, vocab_size=300, num_pages=40, max_model_len=80)
    assert plan.num_decodes == 12 and sum(map(len, plan.token_ids[12:])) == 52
    assert mixed_plan(32, w, vocab_size=300, num_pages=40, max_model_len=80).num_decodes == 32
    assert [w.profiled().num_decodes(n) for n in (8, 64)] == [8, 64]
    plain = Workload(64, 0.25, 10)
    assert plain.profiled() is plain


def test_the_mixed_step() -> None:
    w = Workload(context_len=64, decode_fraction=0.25, prefill_chunk=10)
    plan = mixed_plan(64, w, vocab_size=300, num_pages=30, max_model_len=80)
    assert plan.num_decodes == 16
    assert [len(t) for t in plan.token_ids[16:]] == [10, 10, 10, 10, 8]  # 48 prefill tokens in chunks
    assert plan.starts[16:] == [0] * 5
    contexts = plan.seq_lens[:16]
    assert min(contexts) >= 32 and max(contexts) <= 79 and 40 <= sum(contexts) / 16 <= 80
    assert all(0 <= p < 30 for t in plan.tables for p in t)  # pages past the pool wrap around
    assert sum(map(len, plan.token_ids)) == 64
    shuffled = mixed_plan(64, dataclasses.replace(w, shuffle_pages=True), vocab_size=300, num_pages=30,
                          max_model_len=80)
    assert shuffled.seq_lens == plan.seq_lens and shuffled.tables != plan.tables
    # the same page of the pool maps to the same page shuffled: a permutation, not a resample
    mapping = {a: b for t, u in zip(plan.tables, shuffled.tables, strict=True) for a, b in zip(t, u, strict=True)}
    assert len(set(mapping.values())) == len(mapping)
    for p in (plan, shuffled):  # a page the step writes is its sequence's alone, though the pool wraps
        written = [t[s // PAGE_SIZE:] for t, s in zip(p.tables, p.starts, strict=True)]
        flat = [page for pages in written for page in pages]
        assert len(flat) == len(set(flat)) == 21
        read_only = {page for t, s in zip(p.tables, p.starts, strict=True) for page in t[: s // PAGE_SIZE]}
        assert not read_only & set(flat) and len(read_only) == 9
    with pytest.raises(ValueError, match="writes 21 pages"):
        mixed_plan(64, w, vocab_size=300, num_pages=20, max_model_len=80)


class _Proxy:
    """The wrapped object, with some attributes replaced."""

    def __init__(self, inner: Any, **replaced: Any) -> None:
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)


_ALONE_MS = {"decode_attention": 1.0, "prefill_attention": 2.0}  # any other op: 0.5 ms a call
# how much longer each side takes beside the other (first, second): decode attention and its partner
# both 1.25x (each keeps 0.8); prefill attention 1.25x, the GEMM beside it 2x, so the GEMM's stream
# ends later and runs a tail alone (it keeps 0.2: kept_fractions' arithmetic)
_SLOW = {"decode_attention": (1.25, 1.25), "prefill_attention": (1.25, 2.0)}


class _FakeGpuTimer:
    """Timer's interface; side_by_side runs each function once to see which ops it runs, then
    answers from the tables above."""

    kind = "fake"
    calls: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ms(self, fn) -> float:
        fn()
        return 1.0

    def _op(self, fn) -> str:
        self.calls.clear()
        fn()
        (name,) = set(self.calls)
        return name

    def side_by_side(self, first, reps_first: int, second, reps_second: int) -> tuple[float, float]:
        a = self._op(first)
        if second is None:
            return reps_first * _ALONE_MS.get(a, 0.5), 0.0
        b = self._op(second)
        assert a in _SLOW and b not in _SLOW, (a, b)  # attention launched first, beside another op
        sa, sb = _SLOW[a]
        return reps_first * _ALONE_MS[a] * sa, reps_second * _ALONE_MS.get(b, 0.5) * sb

    def side_by_side_runs(self, first, reps_first: int, second, reps_second: int,
                          runs: int) -> list[tuple[float, float]]:
        return [self.side_by_side(first, reps_first, second, reps_second) for _ in range(runs)]


def _on_a_fake_gpu(runner: ModelRunner, monkeypatch) -> Any:
    """The runner as profile_ops sees it on a GPU (device "cuda", the fake timer), its ops still run
    on the CPU, each recording its name as it runs."""
    ops = runner.model.layer_ops
    monkeypatch.setattr(profile_mod, "Timer", _FakeGpuTimer)

    def recorded(op):
        def run(batch, bufs, cap, _run=op.run, _name=op.name) -> None:
            _FakeGpuTimer.calls.append(_name)
            _run(batch, bufs, cap)

        return dataclasses.replace(op, run=run)

    model = _Proxy(runner.model, layer_ops=[[recorded(op) for op in layer] for layer in ops])
    return _Proxy(runner, device=torch.device("cuda"), model=model)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_interference_tables_on_a_fake_gpu(tiny_model, arch, monkeypatch, capsys) -> None:
    fake = _on_a_fake_gpu(_runner(tiny_model(arch)), monkeypatch)
    ops = fake.model.layer_ops
    names = [op.name for op in ops[0]]
    partners = [n for n in names if n in ("qkv", "o", "act")]  # --pair-ops: not every op, to be quick
    profile = profile_ops(fake, [8, 16], ctas=[16, 32], workload=Workload(32, 0.5, 8), layers=2, warmup=1,
                          repeats=2, pair_ops=partners, pair_repeats=2)
    profile = json.loads(json.dumps(profile))
    inter = profile["interference"]
    assert inter["num_tokens"] == 8 and inter["num_decodes"] == 4 and inter["ctas"] == [16, 32]
    # decode attention capped beside each partner, as before
    assert list(inter["pairs"]) == partners
    for by_cap in inter["pairs"].values():
        assert list(by_cap) == ["16", "32"]
        for v in by_cap.values():
            assert v["op_kept"] == pytest.approx(0.8) and v["attention_kept"] == pytest.approx(0.8)
            assert v["attention_alone_ms"] == pytest.approx(1.0) and v["op_alone_ms"] == pytest.approx(0.5)
    # prefill attention, uncapped, beside each dense GEMM the model has (MoE: no gate_up/down)
    gemms = [n for n in names if n in GEMM_OPS]
    assert gemms == (["qkv", "o", "gate_up", "down"] if arch == "llama" else ["qkv", "o"])
    assert list(inter["prefill_pairs"]) == gemms
    for v in inter["prefill_pairs"].values():
        assert v["attention_kept"] == pytest.approx(0.8) and v["op_kept"] == pytest.approx(0.2)
        assert v["attention_alone_ms"] == pytest.approx(2.0) and v["op_alone_ms"] == pytest.approx(0.5)
        assert v["reps"] == [1, 4]  # both carry 2 ms of work alone

    _print_profile(profile)
    out = capsys.readouterr().out
    assert "kept fractions beside capped decode attention" in out
    assert "kept fractions beside prefill attention, uncapped (op / attention):" in out
    assert any(line.startswith("qkv") and line.endswith("0.20/0.80") for line in out.splitlines())


def test_a_step_of_decodes_only_has_no_prefill_table(tiny_model, monkeypatch) -> None:
    fake = _on_a_fake_gpu(_runner(tiny_model("llama")), monkeypatch)
    profile = profile_ops(fake, [8], ctas=[16], workload=Workload(32, 1.0, 8), layers=2, warmup=1, repeats=1,
                          pair_ops=["o"], pair_repeats=1)
    assert list(profile["interference"]["pairs"]) == ["o"] and profile["interference"]["prefill_pairs"] == {}
