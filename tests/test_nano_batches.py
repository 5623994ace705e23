"""Nano-batches: running each layer's ops nano-batch by nano-batch, in order, gives the logits of
the whole batch, for every architecture, on the reference ops and on the Triton kernels (interpreted
on the CPU), with boundaries inside the decode rows and inside a prefill chunk."""

from __future__ import annotations

import pytest
import torch
from helpers import step_plan

from nanoflow.config import EngineConfig
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.model_runner import ModelRunner
from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.op import run_sequential
from nanoflow.layers.parallel import ParallelState
from nanoflow.models.loader import build_model

# 4 decodes (contexts 20, 5, 40, 9), then chunks of 17 tokens (16 cached) and 9 tokens (none
# cached): rows 0-3 decode, 4-20 the first chunk, 21-29 the second.
DECODES, PREFILLS = [20, 5, 40, 9], [(16, 17), (0, 9)]
SPLITS = {
    "2, inside the decodes": [0, 2, 30],
    "2, inside a chunk": [0, 11, 30],
    "3, uneven: decodes | decodes + chunk start | chunk end + chunk": [0, 3, 12, 30],
    "3, inside both chunks": [0, 7, 25, 30],
}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "mixtral"])
def runner(request, tiny_model) -> ModelRunner:
    cfg = EngineConfig.from_args(EngineArgs(tiny_model(request.param), device="cpu", dtype="float32",
                                            num_kv_pages=64, max_model_len=256))
    runner = ModelRunner(cfg)
    torch.manual_seed(0)
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))  # the contexts the new tokens attend to
    return runner


def _logits(model, batch: ForwardBatch, parts=None) -> torch.Tensor:
    walk = None if parts is None else lambda ops, bufs: run_sequential(ops, bufs, parts)
    with torch.inference_mode():
        return model.compute_logits(model(batch, walk)[batch.logits_indices])


@pytest.mark.parametrize("eager", [True, False], ids=["reference", "triton"])
@pytest.mark.parametrize("bounds", SPLITS.values(), ids=SPLITS.keys())
def test_nano_batches_give_the_whole_batch_logits(runner, bounds, eager) -> None:
    model = runner.model
    if not eager:
        cfg = runner.config
        model = build_model(cfg.model, cfg.arch, cfg.dtype, cfg.device, cfg.max_model_len, ParallelState(),
                            enforce_eager=False)
        model.bind_kv_caches(runner.kv_caches)
    batch = model.prepare(runner._build_batch(step_plan(DECODES, PREFILLS)))
    want = _logits(model, batch)
    parts = [model.prepare(p) for p in batch.split(bounds)]
    got = _logits(model, batch, parts)
    assert (got - want).abs().max().item() <= 1e-5


def test_split_describes_each_part(runner) -> None:
    batch = runner._build_batch(step_plan(DECODES, PREFILLS))
    a, b, c = batch.split([0, 3, 12, 30])
    assert (a.num_decodes, a.query_lens_cpu, a.seq_lens_cpu, a.token_offset) == (3, [1, 1, 1], [20, 5, 40], 0)
    # the last decode, then the first 8 of the 17-token chunk, whose context ends with them
    assert (b.num_decodes, b.query_lens_cpu, b.seq_lens_cpu, b.token_offset) == (1, [1, 8], [9, 24], 3)
    assert (c.num_decodes, c.query_lens_cpu, c.seq_lens_cpu, c.token_offset) == (0, [9, 9], [33, 9], 12)
    assert b.query_start_loc.tolist() == [0, 1, 9] and b.seq_lens.tolist() == [9, 24]
    assert c.query_start_loc.tolist() == [0, 9, 18] and c.seq_lens.tolist() == [33, 9]
    assert c.input_ids.data_ptr() == batch.input_ids[12:].data_ptr()  # a view, nothing copied
    assert torch.equal(b.page_tables, batch.page_tables[3:5])
    with pytest.raises(ValueError, match="bounds"):
        batch.split([0, 12, 12, 30])


def test_published_op_names(runner) -> None:
    """models.llama.layer_op_names (what hand-made pipelines and the tests name) is what a layer
    publishes; the tensor-parallel ones add the two all-reduces (test_tensor_parallel runs them)."""
    from nanoflow.models.llama import layer_op_names

    moe = runner.arch.is_moe
    assert [op.name for op in runner.model.layer_ops[1]] == layer_op_names(moe, False)
    with_reduces = layer_op_names(moe, True)
    assert [n for n in with_reduces if not n.endswith("_all_reduce")] == layer_op_names(moe, False)
