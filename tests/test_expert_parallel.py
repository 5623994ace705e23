"""Expert parallelism, in one process: the MoE layer of each of two simulated ranks holds half the
experts whole, and their partial outputs sum to the one-rank layer's (eager and fused paths); the
dummy weights build; the options that cannot work are ValueErrors before any process starts.
Two real ranks (gloo) against one process: tests/test_tensor_parallel.py (eager) and
tests/test_tensor_parallel_graphs.py (the fast path)."""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest
import torch
from helpers import write_model

from nanoflow import LLM
from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.distributed import check_tensor_parallel
from nanoflow.executor.model_runner import pipeline_key
from nanoflow.kernels.fused_moe import ExpertShard
from nanoflow.layers.mlp import MixtureOfExperts
from nanoflow.layers.parallel import ParallelState
from nanoflow.model_arch import ModelArch, load_hf_config
from nanoflow.models.loader import build_model

H, INTER, E, TOP_K = 32, 48, 4, 2


def _layers(enforce_eager: bool) -> tuple[MixtureOfExperts, list[MixtureOfExperts]]:
    """The one-rank layer and the two expert-parallel ranks' layers, loaded from the same experts
    through load_expert (each rank skips the other's)."""
    full = MixtureOfExperts(H, INTER, E, TOP_K, torch.float32, ParallelState(), enforce_eager)
    ranks = [MixtureOfExperts(H, INTER, E, TOP_K, torch.float32, ParallelState(r, 2, expert_parallel=True),
                              enforce_eager) for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(E, H, generator=gen)
    for layer in (full, *ranks):
        layer.router.weight.data.copy_(router)
        layer.w13.data.fill_(float("nan"))
        layer.w2.data.fill_(float("nan"))
    for e in range(E):
        for which, shape in (("w1", (INTER, H)), ("w3", (INTER, H)), ("w2", (H, INTER))):
            w = torch.randn(*shape, generator=gen) * shape[1] ** -0.5
            for layer in (full, *ranks):
                layer.load_expert(e, which, w)
    return full, ranks


def test_ranks_hold_whole_experts() -> None:
    full, ranks = _layers(enforce_eager=True)
    for r, layer in enumerate(ranks):
        assert layer.shard == ExpertShard(2 * r, E)
        assert layer.w13.shape == (2, 2 * INTER, H) and layer.w2.shape == (2, H, INTER)  # nothing sliced
        assert torch.equal(layer.w13, full.w13[2 * r : 2 * r + 2]) and torch.equal(layer.w2, full.w2[2 * r : 2 * r + 2])
    with pytest.raises(ValueError, match="out of range"):
        ranks[0].load_expert(E, "w1", torch.zeros(INTER, H))


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "fused"])
@pytest.mark.parametrize("routing", ["router", "rank0_only"])
def test_partial_outputs_sum_to_full_layer(enforce_eager: bool, routing: str) -> None:
    """rank0_only: every token routed to rank 0's experts, so rank 1 computes nothing and adds 0."""
    full, ranks = _layers(enforce_eager)
    T = 19
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    weights, ids = torch.empty(T, TOP_K), torch.empty(T, TOP_K, dtype=torch.int64)
    full.route(x, weights, ids)
    if routing == "rank0_only":
        ids = torch.stack([torch.zeros(T, dtype=torch.int64), torch.ones(T, dtype=torch.int64)], dim=1)
    want = torch.empty_like(x)
    full.experts(x, weights, ids, want)
    parts = []
    for layer in ranks:
        out = torch.full_like(x, float("nan"))
        layer.experts(x, weights, ids, out)
        parts.append(out)
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=1e-5, atol=1e-5)
    if routing == "rank0_only":
        assert (parts[1] == 0).all()


def test_dummy_weights(tiny_model) -> None:
    """load_format dummy: random local experts of the full intermediate size, no checkpoint read."""
    path = tiny_model("mixtral")
    arch = ModelArch.from_hf(load_hf_config(path))
    model = build_model(path, arch, torch.float32, torch.device("cpu"), 64, ParallelState(1, 2, expert_parallel=True),
                        dummy=True)
    moe = model.layers[0].mlp
    assert moe.shard == ExpertShard(2, 4)
    assert moe.w13.shape == (2, 2 * arch.intermediate_size, arch.hidden_size)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_errors_before_any_process(tiny_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="enable_expert_parallel needs a mixture-of-experts model"):
        LLM(tiny_model("llama"), tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):  # one rank too: a mistake
        LLM(tiny_model("llama"), enable_expert_parallel=True)
    three = write_model(tmp_path / "mixtral3", "mixtral", with_tokenizer=False, num_local_experts=3)
    with pytest.raises(ValueError, match=r"num_local_experts \(3\) is not divisible by tensor_parallel_size \(2\)"):
        LLM(str(three), tensor_parallel_size=2, enable_expert_parallel=True, skip_tokenizer_init=True)
    assert not multiprocessing.active_children()  # nothing was started
    # the experts are not sliced, so their intermediate size need not divide
    arch = dataclasses.replace(ModelArch.from_hf(load_hf_config(tiny_model("mixtral"))), intermediate_size=129)
    check_tensor_parallel(arch, 2, torch.device("cpu"), expert_parallel=True)
    with pytest.raises(ValueError, match=r"intermediate_size \(129\) is not divisible"):
        check_tensor_parallel(arch, 2, torch.device("cpu"))


def test_one_rank_is_a_no_op(tiny_model) -> None:
    """With tensor_parallel_size 1 every expert is local anyway: accepted, and nothing changes (the
    model, the pipeline cache key); the bench still records that it was asked for."""
    args = EngineArgs(model=tiny_model("mixtral"), device="cpu", enable_expert_parallel=True)
    config = EngineConfig.from_args(args)
    plain = EngineConfig.from_args(dataclasses.replace(args, enable_expert_parallel=False))
    assert not config.expert_parallel and config.args.enable_expert_parallel
    assert pipeline_key(config, 1) == pipeline_key(plain, 1)
    two = EngineConfig.from_args(dataclasses.replace(args, tensor_parallel_size=2))
    assert two.expert_parallel and pipeline_key(two, 2)["expert_parallel"] is True
