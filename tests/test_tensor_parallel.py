"""Tensor parallelism on the CPU: 2 gloo ranks (rank 0 in this process, rank 1 spawned) give the
same greedy tokens as one process, with the plans sent through the plan channel (a shared-memory
ring) and through the gloo fallback; bad sizes are clear errors; each rank reads only its slices."""

import multiprocessing
import os
import random
import shutil
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from helpers import VOCAB_SIZE, worker_that_dies_before_joining
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.distributed import NO_MULTICAST, TensorParallelGroup, check_tensor_parallel
from nanoflow.executor.plan_channel import PREFIX, SHM_DIR
from nanoflow.layers.linear import LazyTensor
from nanoflow.layers.parallel import ParallelState
from nanoflow.model_arch import ModelArch, load_hf_config
from nanoflow.models.loader import build_model, safetensors_files

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(seed: int, n: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(3, 41))]}
            for _ in range(n)]


def _greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


@pytest.mark.parametrize("arch, ep, kv", [("llama", False, "auto"), ("mixtral", False, "auto"),
                                           ("mixtral", True, "auto"), ("mixtral", True, "fp8")],
                         ids=["llama", "mixtral", "mixtral-ep", "mixtral-ep-fp8"])
def test_two_ranks_match_one(tiny_model, arch, ep, kv):
    """Llama with GQA (4 heads, 2 KV heads: one per rank) and Mixtral, its experts sliced or (ep)
    whole, 2 of the 4 per rank, also over an fp8 KV cache; a 64-token budget chunks the prompts, and
    every decode step takes its input token from the step still in flight."""
    path = tiny_model(arch)
    prompts = _prompts(1)
    settings = dict(max_model_len=256, max_num_batched_tokens=64, kv_cache_dtype=kv)
    expected = _greedy(LLM(path, **settings), prompts)
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=ep, **settings)
    try:
        assert llm.engine.runner.par.size == 2
        if arch == "mixtral":
            moe = llm.engine.runner.model.layers[0].mlp
            assert llm.engine.runner.par.expert_parallel == ep
            assert moe.w13.shape == ((2, 256, 64) if ep else (4, 128, 64))  # whole experts, or slices
        assert llm.engine.runner.par.plans is not None  # one host: the plans go through the ring
        assert not _ring_files()  # unlinked once every rank mapped it
        assert llm.engine.runner.kv_cache.shape[3] == 1  # this rank's KV heads
        assert _greedy(llm, prompts) == expected
        assert _greedy(llm, prompts[:3]) == expected[:3]  # the engine keeps working across generate calls
        (worker,) = llm.engine.tp.worker_gpu_idle()
        assert worker["messages_read"] == llm.engine.runner.par.plans.seq  # it read every plan
        assert all(os.environ[k] == v for k, v in NO_MULTICAST.items())
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()
    llm.shutdown()  # idempotent


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_network_overlap_pipeline_matches_one(tiny_model, tmp_path, monkeypatch, arch):
    """Two ranks running the network-overlap schedules (each nano-batch's all-reduces on a stream of
    their own, beside the other nano-batch's ops; ping-pong among them) give one process's tokens;
    nano-batch bounds fall inside the decode rows and inside prefill chunks. --nccl-max-ctas
    reaches NCCL's environment."""
    from helpers import layer_op_names

    from nanoflow.pipeline.schedule import Pipeline, network_overlap_schedule, pingpong_schedule, tp_overlap_schedule

    path = tiny_model(arch)
    names = layer_op_names(arch, tp=True)
    # the first range with its GEMMs capped (the persistent Triton GEMM); the middle: all-reduces on
    # a third stream beside decode attention and the GEMMs; the last: each nano-batch on a stream of
    # its own, the all-reduces on a third (ping-pong), its GEMMs capped as cuBLAS (uncapped on the CPU)
    pipeline = Pipeline((network_overlap_schedule(names, 9, 1, 2, gemm_ctas=3),
                         tp_overlap_schedule(names, 40, 7, 10, 4),
                         pingpong_schedule(names, 64, 29, 41, 4, gemm_ctas=5, cublas=True)), {"test": arch}, "tests")
    pipeline.save(tmp_path / "net.json")
    prompts = _prompts(2)
    settings = dict(max_model_len=256, max_num_batched_tokens=64)
    expected = _greedy(LLM(path, **settings), prompts)
    monkeypatch.setenv("NCCL_MAX_CTAS", "unset")  # restored after the test
    llm = LLM(path, tensor_parallel_size=2, pipeline=str(tmp_path / "net.json"), nccl_max_ctas=4, **settings)
    try:
        assert len(llm.engine.runner.executors) == 3
        assert os.environ["NCCL_MAX_CTAS"] == "4"
        assert _greedy(llm, prompts) == expected
    finally:
        llm.shutdown()


def test_pingpong_under_tensor_parallelism_takes_turns() -> None:
    """Ping-pong over a tensor-parallel layer: each nano-batch's compute on its own stream, every
    all-reduce on stream 2, issued a segment at a time in turns (the network stream's order, the
    same on every rank: 0's attention all-reduce, 1's, 0's FFN all-reduce, 1's)."""
    from helpers import layer_op_names

    from nanoflow.pipeline.schedule import GEMM_OPS, NETWORK_OPS, Schedule, Step, pingpong_schedule

    names = layer_op_names("llama", tp=True)
    s = pingpong_schedule(names, 64, 29, 41, 4)
    s.check(names)
    assert s.num_streams == 3
    assert [(x.op, x.part) for x in s.steps if x.op in NETWORK_OPS] == [
        ("attn_all_reduce", 0), ("attn_all_reduce", 1), ("ffn_all_reduce", 0), ("ffn_all_reduce", 1)]
    assert all(x.stream == (2 if x.op in NETWORK_OPS else x.part) for x in s.steps)
    assert {x.num_ctas for x in s.steps if x.op == "decode_attention"} == {4}
    first = names.index("attn_all_reduce") + 1
    assert [x.op for x in s.steps[:first]] == names[:first] and {x.part for x in s.steps[:first]} == {0}
    assert {(x.num_ctas, x.cublas) for x in s.steps if x.op in GEMM_OPS} == {(None, False)}
    # every GEMM capped, as cuBLAS sized for the SMs the other stream's decode attention leaves
    capped = pingpong_schedule(names, 64, 29, 41, 4, gemm_ctas=60, cublas=True)
    assert [replace(x, num_ctas=None, cublas=False) if x.op in GEMM_OPS else x for x in capped.steps] == list(s.steps)
    assert {(x.num_ctas, x.cublas) for x in capped.steps if x.op in GEMM_OPS} == {(60, True)}
    bad = Schedule(1, 8, {"whole": (0, 8)}, (*(Step(op) for op in names if op != "input_norm"),
                                            Step("input_norm", num_ctas=4, cublas=True)))
    with pytest.raises(ValueError, match="cublas applies to a capped GEMM"):
        bad.check(names)


def _ring_files() -> list:
    return list(SHM_DIR.glob(f"{PREFIX}{os.getpid()}-*"))


def test_gloo_fallback_matches_one(tiny_model, monkeypatch):
    """NANOFLOW_PLAN_CHANNEL=gloo (what ranks on several hosts use): the synchronous broadcast."""
    monkeypatch.setenv("NANOFLOW_PLAN_CHANNEL", "gloo")
    path = tiny_model("llama")
    prompts = _prompts(3, 4)
    settings = dict(max_model_len=256, max_num_batched_tokens=64)
    expected = _greedy(LLM(path, **settings), prompts)
    llm = LLM(path, tensor_parallel_size=2, **settings)
    try:
        assert llm.engine.runner.par.plans is None and llm.engine.tp.worker_gpu_idle() is None
        assert _greedy(llm, prompts) == expected
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()


def test_two_ranks_fp8_kv_cache(tiny_model):
    """Rank 1 builds its runner from the resolved config, so its KV heads are stored in fp8 too: were
    they not, its heads' attention would differ from the one-process fp8 run and so would the tokens."""
    path = tiny_model("llama")
    prompts = _prompts(2)
    settings = dict(max_model_len=256, max_num_batched_tokens=64, kv_cache_dtype="fp8")
    expected = _greedy(LLM(path, **settings), prompts)
    llm = LLM(path, tensor_parallel_size=2, **settings)
    try:
        assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
        assert _greedy(llm, prompts) == expected
    finally:
        llm.shutdown()


def test_dead_worker_fails_loudly(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=256, tensor_parallel_size=2)
    try:
        (worker,) = llm.engine.tp.processes
        worker.kill()
        worker.join()
        with pytest.raises(RuntimeError, match="worker rank 1 .* died"):
            llm.generate(_prompts(2, 2), PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()  # must not hang on the dead worker
    assert not multiprocessing.active_children()
    assert not _ring_files()


def test_worker_dead_before_joining_fails_the_start_at_once(tiny_model):
    """Rank 0 does not wait out the rendezvous timeout for a worker that exited before joining."""
    cfg = EngineConfig.from_args(EngineArgs(model=tiny_model("llama"), max_model_len=256, tensor_parallel_size=2))
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) died with exit code 3"):
        TensorParallelGroup.start(cfg, worker=worker_that_dies_before_joining)
    assert time.perf_counter() - t0 < 60
    assert not multiprocessing.active_children() and not dist.is_initialized()


def test_worker_watch_reports_a_death_unless_shutting_down(tiny_model):
    """The watchdog of --all-reduce symm-mem (which has no device timeout), on the CPU: a worker's
    death is reported with its rank; after shutdown begins, an exiting worker is not."""
    llm = LLM(tiny_model("llama"), max_model_len=256, tensor_parallel_size=2)
    tp, reports = llm.engine.tp, []
    try:
        (worker,) = tp.processes
        watch = threading.Thread(target=tp.watch_workers, args=(reports.append,))
        watch.start()
        worker.kill()
        watch.join(30)
        assert not watch.is_alive() and len(reports) == 1 and "worker rank 1 (pid" in reports[0]
    finally:
        llm.shutdown()
    tp.watch_workers(reports.append)  # closed: the workers are gone and nothing is reported
    assert len(reports) == 1


def test_bad_sizes_are_clear_errors(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        LLM(tiny_model("llama"), tensor_parallel_size=3)
    assert not multiprocessing.active_children()  # nothing was started
    arch = ModelArch.from_hf(load_hf_config(tiny_model("llama")))
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible"):
        check_tensor_parallel(arch, 4, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="exceeds the 1 visible GPU"):
        check_tensor_parallel(arch, 2, torch.device("cuda"))


def test_failed_start_is_the_checkpoint_error(tiny_model, tmp_path):
    """Every rank fails to load a bad checkpoint: rank 0 raises its own ValueError, no worker is left."""
    path = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :64].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatch for weight"):
        LLM(str(path), tensor_parallel_size=2)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("arch, ep", [("llama", False), ("mixtral", False), ("mixtral", True)],
                         ids=["llama", "mixtral", "mixtral-ep"])
def test_rank_reads_only_its_slices(tiny_model, monkeypatch, arch, ep):
    """Rank 1 of 2 loads without any process group: it reads exactly its parameters' worth of the
    checkpoint (about half of it), and its slices are the right ones; expert parallel: experts 2
    and 3 whole, nothing of experts 0 and 1."""
    path = tiny_model(arch)
    hf_config = load_hf_config(path)
    read = []
    orig = LazyTensor.read
    monkeypatch.setattr(LazyTensor, "read", lambda self: read.append(orig(self)) or read[-1])
    model = build_model(path, ModelArch.from_hf(hf_config), torch.float32, torch.device("cpu"), 64,
                        ParallelState(1, 2, expert_parallel=ep))
    (file,) = safetensors_files(path)
    with safe_open(file, "pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert sum(t.numel() for t in read) == sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in read) < 0.6 * sum(t.numel() for t in full.values())
    q = full["model.layers.0.self_attn.q_proj.weight"]
    layer = model.layers[0]
    assert torch.equal(layer.qkv_proj.weight[: q.shape[0] // 2], q[q.shape[0] // 2 :])
    o = full["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(layer.o_proj.weight, o[:, o.shape[1] // 2 :])
    emb = full["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, emb[emb.shape[0] // 2 :])
    if ep:
        moe = model.layers[1].mlp
        for local, e in enumerate((2, 3)):
            w1, w3, w2 = (full[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2"))
            assert torch.equal(moe.w13[local], torch.cat([w1, w3])) and torch.equal(moe.w2[local], w2)


def test_lazy_tensor_reads_the_region_a_tensor_would(tmp_path):
    t = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    save_file({"t": t}, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        lazy = LazyTensor(f.get_slice("t"))
        assert lazy.shape == t.shape
        assert torch.equal(lazy.read(), t)
        assert torch.equal(lazy[2].narrow(0, 1, 3).narrow(1, 2, 2).read(), t[2].narrow(0, 1, 3).narrow(1, 2, 2))
        assert torch.equal(lazy.narrow(1, 3, 3)[1].read(), t.narrow(1, 3, 3)[1])
        with pytest.raises(IndexError):
            lazy.narrow(0, 3, 2)


def test_nccl_cap_from_the_flag_else_the_tuned_pipeline(tiny_model, tmp_path, monkeypatch):
    """The communicator's NCCL CTA cap: --nccl-max-ctas when given, else the one `nanoflow tune -tp`
    put into the pipeline the engine runs (auto: the cached one), else NCCL's own."""
    from nanoflow.config import EngineConfig
    from nanoflow.engine_args import EngineArgs
    from nanoflow.executor.distributed import nccl_max_ctas
    from nanoflow.executor.model_runner import pipeline_key
    from nanoflow.pipeline.cache import cache_path
    from nanoflow.pipeline.schedule import Pipeline

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    config = lambda **kw: EngineConfig.from_args(EngineArgs(model=tiny_model("llama"), max_model_len=256,  # noqa: E731
                                                            tensor_parallel_size=2, **kw))
    assert nccl_max_ctas(config(), 2) is None  # nothing tuned
    Pipeline((), pipeline_key(config(), 2), "test", nccl_max_ctas=8).save(cache_path(pipeline_key(config(), 2)))
    assert nccl_max_ctas(config(), 2) == 8
    assert nccl_max_ctas(config(nccl_max_ctas=4), 2) == 4
    assert nccl_max_ctas(config(pipeline="off"), 2) is None


def test_symm_mem_declines_float16_on_every_rank(caplog):
    """torch's two-shot all-reduce has no float16 kernel (it raised NotImplementedError in the first
    step of a float16 Llama-2-70B under --all-reduce symm-mem): such a model uses NCCL instead, with
    a warning, decided before any symmetric memory is touched (so on the CPU too)."""
    from nanoflow.executor.symm_all_reduce import open_symm_all_reduce

    agreed = []
    with caplog.at_level("WARNING"):
        comm = open_symm_all_reduce(1024, torch.float16, torch.device("cpu"), lambda ok: agreed.append(ok) or ok)
    assert comm is None and agreed == [0]
    assert "float16" in caplog.text and "using NCCL" in caplog.text
