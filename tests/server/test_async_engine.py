"""AsyncEngine in-process: streams equal offline generation, early exit aborts, rejections raise,
a failing step fails only the requests in flight, shutdown aborts what is left."""

from __future__ import annotations

import asyncio

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.engine import LLMEngine
from nanoflow.engine_args import EngineArgs
from nanoflow.entrypoints.server.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from nanoflow.entrypoints.server.metrics import EngineMetrics

PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [40, 41]]


@pytest.fixture
def engine(model_path):
    eng = AsyncEngine(LLMEngine.from_args(EngineArgs(model_path, device="cpu", max_model_len=128, num_kv_pages=64)),
                      EngineMetrics("t"))
    eng.start()
    yield eng
    eng.shutdown()


async def _final(eng: AsyncEngine, rid: str, ids: list[int], params: SamplingParams):
    last = None
    async for out in eng.generate(rid, None, ids, params):
        last = out
    return last


def test_concurrent_streams_match_offline(engine, model_path):
    params = SamplingParams(temperature=0, max_tokens=10)
    ref = LLM(model_path, device="cpu", max_model_len=128, num_kv_pages=64).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    async def run():
        return await asyncio.gather(*(_final(engine, f"r{i}", p, params) for i, p in enumerate(PROMPTS)))

    outs = asyncio.run(run())
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    assert all(o.finished for o in outs)


def test_early_exit_aborts_and_frees_pages(engine):
    async def run():
        gen = engine.generate("long", None, [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await gen.aclose()  # what a cancelled StreamingResponse does to its generator
        # The abort is processed by the engine thread; a later request proves it ran first.
        await _final(engine, "probe", [4, 5], SamplingParams(max_tokens=1))

    asyncio.run(run())
    assert engine.engine.num_free_pages == engine.num_pages
    assert not engine.engine.has_unfinished_requests()


def test_rejected_request_raises_value_error(engine):
    async def run():
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("too-long", None, list(range(200)), SamplingParams())
        with pytest.raises(ValueError, match="must be in"):
            await engine.add_request("bad-ids", None, [10**6], SamplingParams())
        # The rejected ids are free for reuse, and the engine still serves.
        out = await _final(engine, "too-long", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 2

    asyncio.run(run())


def test_failing_step_fails_in_flight_requests_only(engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", flaky_step)

    async def run():
        with pytest.raises(EngineStepError, match="injected"):
            await _final(engine, "a", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
        out = await _final(engine, "b", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 5

    asyncio.run(run())
    assert engine.engine.num_free_pages == engine.num_pages
    assert engine.healthy


def test_shutdown_aborts_in_flight(model_path):
    eng = AsyncEngine(LLMEngine.from_args(EngineArgs(model_path, device="cpu", max_model_len=128, num_kv_pages=64)))
    eng.start()

    async def run():
        gen = eng.generate("x", None, [1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True))
        await gen.__anext__()
        eng.shutdown()
        last = None
        async for out in gen:
            last = out
        assert last is not None and last.outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await eng.add_request("y", None, [1], SamplingParams())

    asyncio.run(run())
    assert not eng.healthy
