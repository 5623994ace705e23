"""What does the host wait for inside a step's launch? torch.profiler over the first steps of a
decode-heavy run (the ramp-up, where the pipelined runs on an H200 showed every other launch taking
the host ~two steps while its graph launch took 0.3 ms: docs/pipeline.md, Where it stands).

Prints each profiled step's host ms in the launch, then the CUDA runtime / driver calls and torch
ops that held the host longest (self CPU time), and each single call over --long-ms with the step
it fell in. The Chrome trace goes to $OUT/host_stall_<mode>.json.gz.

    PYTHONPATH=$PWD NANOFLOW_CACHE=... python benchmarks/host_stall_check.py --pipeline auto --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.entrypoints.llm import LLM
from nanoflow.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b")
    p.add_argument("--pipeline", default="auto", help="auto, or off (the sequential schedule)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=24, help="steps profiled, from the first")
    p.add_argument("--long-ms", type=float, default=10.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.95)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_stall_check.py profiles CUDA launches: it needs a GPU")
    llm = LLM(dummy_model_dir(args.dummy), load_format="dummy", skip_tokenizer_init=True,
              pipeline=args.pipeline, gpu_memory_utilization=args.gpu_memory_utilization)
    engine = llm.engine
    rng = random.Random(0)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    # a few short requests first: one-off first-step costs (Triton autotuning) stay out of the profile
    for i in range(8):
        engine.add_request(f"w{i}", None, [rng.randrange(vocab) for _ in range(args.input_len)],
                           SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    for i in range(args.requests):
        engine.add_request(str(i), None, [rng.randrange(vocab) for _ in range(args.input_len)], params)
    engine.stats.reset()
    engine.stats.keep_timeline = True
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for i in range(args.steps):
            with record_function(f"engine_step_{i}"):
                engine.step()
    torch.cuda.synchronize()
    tl = engine.stats.timeline_columns()
    print("step  tokens decodes  host launch ms  graph launch ms  host wait ms  gpu idle ms")
    for i in range(len(tl["tokens"])):
        print(f"{i:4} {tl['tokens'][i]:7} {tl['decodes'][i]:7} {tl['host_launch_ms'][i]:15.2f} "
              f"{tl['host_graph_launch_ms'][i]:16.2f} {tl['host_wait_ms'][i]:13.2f} {tl['gpu_idle_ms'][i]:12.2f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    events = prof.events()
    steps = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith("engine_step_")]
    long = []
    for e in events:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        if ms >= args.long_ms and not e.name.startswith("engine_step_") and e.device_type.name == "CPU":
            step = next((n for a, b, n in steps if a <= e.time_range.start < b), "?")
            stack = [s for s in (e.stack or []) if "nanoflow" in s][:4]
            long.append({"name": e.name, "ms": round(ms, 2), "step": step, "stack": stack})
    print(f"host calls of {args.long_ms} ms or more:")
    for row in long:
        print(f"  {row['step']:16} {row['ms']:8.2f} ms  {row['name']}  <- {' <- '.join(row['stack'])}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"host_stall_{args.pipeline}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as f, gzip.open(f"{raw}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        (out / f"host_stall_{args.pipeline}_long.json").write_text(json.dumps(
            {"timeline": tl, "long_calls": long, "when": time.strftime("%Y%m%d-%H%M%S")}, indent=1))


if __name__ == "__main__":
    main()
