"""GPU only: the per-op timeline of a pipelined forward, from CUDA events on the ops' streams."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import pipeline_for, step_plan

from nanoflow import LLM
from nanoflow.pipeline.timeline import plot_timeline, record_timeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_timeline_of_a_two_stream_layer(tiny_model, tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.json"
    pipeline_for("llama", 256).save(pipeline)
    llm = LLM(tiny_model("llama"), dtype="float32", max_model_len=512, max_num_batched_tokens=256,
              num_kv_pages=1024, pipeline=str(pipeline))
    runner = llm.engine.runner
    plan = step_plan([300, 40, 120] * 20, [(0, 150), (64, 46)])  # 256 tokens, 60 of them decodes; 617 pages
    records = record_timeline(runner, plan, layer=1)
    schedule = runner.executor_for(256).schedule
    assert Counter((r["op"], r["nano_batch"], r["stream"]) for r in records) == Counter(
        (st.op, st.part, st.stream) for st in schedule.steps)
    assert min(r["start_ms"] for r in records) == 0
    for stream in (0, 1):  # a stream runs its ops one after another (events have ~0.5 us resolution)
        rows = sorted((r for r in records if r["stream"] == stream), key=lambda r: r["start_ms"])
        assert rows and all(r["start_ms"] <= r["end_ms"] for r in rows)
        assert all(a["end_ms"] <= b["start_ms"] + 1e-3 for a, b in itertools.pairwise(rows))
    # the layer is held until fully queued: no launch gap as long as the spin kernel
    assert max(r["end_ms"] for r in records) < 5.0
    plot_timeline(records, str(tmp_path / "t.png"), "gpu")
    assert (tmp_path / "t.png").stat().st_size > 5000
