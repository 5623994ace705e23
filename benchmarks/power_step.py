"""Is overlap on this GPU limited by power? Steps replayed back to back for seconds, with the power
draw and clocks beside each one's time.

For each step (decodes x prefill-chunk tokens, decodes at --context), CUDA-graph replays of: the
sequential forward; ping-pong at half the step on each --ctas cap (the tune's candidate); the
step's compute ops alone (GEMMs, norms, activations, sequentially); its memory ops alone (decode
attention). Each is replayed for --seconds while `nanoflow.bench.power.PowerSampler` reads nvidia-smi; the
first half second is left out of the means (clocks settle). Energy per step = watts x ms. If the
sequential step already draws ~the cap and ping-pong's energy per step is no lower, no schedule of
the same kernels can be much faster: the ceiling is the power, not the SMs or the bytes. A short
burst (`Timer.ms`, what the tune times) is printed beside the sustained time. The ops-alone
variants run on the step's buffers as the last forward left them, so their power is indicative
(the data a kernel moves changes its power; `--kv-data zeros` shows how much for the K/V).

    PYTHONPATH=$PWD python benchmarks/power_step.py --steps 384x0,768x0,512x1536 --ctas 66 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pipeline_step import step, two_batches

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.bench.power import PowerSampler
from nanoflow.entrypoints.llm import LLM
from nanoflow.pipeline.executor import PipelineExecutor
from nanoflow.tune.timing import Timer

SETTLE_S = 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b")
    p.add_argument("--steps", default="384x0,768x0,512x1536", help="comma list of DECODESxCHUNK")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--ctas", default="66", help="ping-pong's decode caps, comma list")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="fp8: half the bytes decode attention moves, so (on a GPU at its power cap) less energy a step")
    p.add_argument("--kv-data", default="random", choices=("random", "zeros"),
                   help="what the K/V pages hold: random (the runner's seeded fill, as a served model's cache: "
                   "reading it costs the power real data costs) or zeros (what synthetic steps read before "
                   "2026-11-30)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    steps = [tuple(map(int, s.split("x"))) for s in args.steps.split(",")]
    budget = max(d + c for d, c in steps)
    llm = LLM(dummy_model_dir(args.dummy), load_format="dummy", skip_tokenizer_init=True, pipeline="off",
              cuda_graph_max_tokens=0, max_num_batched_tokens=budget, kv_cache_dtype=args.kv_cache_dtype)
    runner = llm.engine.runner
    model = runner.model
    if args.kv_data == "zeros":  # bits that do not toggle: HBM and tensor-core power depend on the data
        runner.kv_cache.zero_()
    names = [op.name for op in model.layer_ops[0]]
    timer = Timer(runner.device, warmup=2, repeats=10)
    results: dict[str, Any] = {"args": vars(args), "device": torch.cuda.get_device_name(), "rows": []}
    sampler = PowerSampler.for_devices(runner.device, 1)
    if sampler is None:
        raise SystemExit("power_step.py needs a CUDA GPU and nvidia-smi")
    with torch.inference_mode(), sampler as power:
        idle_t = time.time()
        time.sleep(1.0)
        results["idle"] = power.summary(idle_t, time.time())
        for decodes, chunk in steps:
            tokens = decodes + chunk
            batch = step(runner, decodes, args.context, chunk, False, False)
            bufs = model.buffers(batch)

            def only(resource: str, batch: Any = batch, bufs: Any = bufs) -> None:
                for ops in model.layer_ops:
                    for op in ops:
                        if op.resource == resource:
                            op.run(batch, bufs, None)

            variants = {"sequential": lambda batch=batch: model(batch),
                        "compute ops": partial(only, "compute"), "memory ops": partial(only, "memory")}
            for ctas in map(int, args.ctas.split(",")):
                ex = PipelineExecutor(two_batches(names, tokens, tokens // 2, ctas, None, "pingpong"),
                                      model.layer_ops, runner.device, side_priority=True)
                parts = ex.split(batch, model.prepare)
                walk = partial(ex.run, parts=parts)
                variants[f"pingpong@{ctas}"] = partial(lambda batch, walk: model(batch, walk), batch, walk)
            for name, fn in variants.items():
                burst = timer.ms(fn)
                ms, t0, t1 = sustained(timer, fn, args.seconds)
                row = {"decodes": decodes, "chunk": chunk, "variant": name, "burst_ms": burst, "sustained_ms": ms,
                       **(power.summary(t0 + SETTLE_S, t1) or {})}
                row["joules"] = row.get("watts", 0.0) * ms / 1e3
                results["rows"].append(row)
                print(f"{decodes:5d}x{chunk:<5d} {name:14s} burst {burst:7.2f} ms  sustained {ms:7.2f} ms  "
                      f"{row.get('watts', 0):5.0f} W  SM {row.get('sm_mhz', 0):5.0f} MHz  "
                      f"capped {row.get('power_capped', 0):4.2f}  {row['joules']:6.2f} J/step", flush=True)
            if args.out:  # after each step, so a run cut short keeps what it measured
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "power_step.json").write_text(json.dumps(results, indent=1))


def sustained(timer: Timer, fn: Any, seconds: float) -> tuple[float, float, float]:
    """fn captured once (warm) and replayed back to back for `seconds`: (mean ms per call, host start, end)."""
    graph = timer.capture(fn, 1)
    if graph is None:
        raise RuntimeError("power_step.py replays CUDA graphs; this forward could not be captured")
    graph.replay()
    torch.cuda.synchronize(timer.device)
    start = torch.cuda.Event(enable_timing=True)
    marks: list[torch.cuda.Event] = []
    calls, t0 = 0, time.time()
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(4):  # a replay is one launch: the host stays ahead
            graph.replay()
        calls += 4
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
        if len(marks) > 1:  # wait for the batch before this one: the GPU never runs dry, the queue stays short
            marks[-2].synchronize()
    marks[-1].synchronize()
    t1 = time.time()
    ms = start.elapsed_time(marks[-1]) / calls
    del graph
    return ms, t0, t1


if __name__ == "__main__":
    main()
