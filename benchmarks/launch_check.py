"""Does launching a CUDA graph wait for the GPU? Host time of each launch call, with 0-3 replays
already queued, for the engine's sequential and pipelined graphs of each size.

The pipelined runs on an H200 showed, in their ramp-up, every other launch taking the host about
two steps (docs/pipeline.md, Where it stands), the sequential runs none. A graph of two streams
holds about twice the kernel nodes of a sequential one; if the GPU's queue of pending work cannot
hold one more such graph behind the one running, the launch call returns only once enough of the
queued work has run. This replays each captured graph back to back from an idle GPU and prints the
host ms of each call (and of one small kernel launched after them, as the sampler's are), beside
the graph's replay time: a call that takes about a replay is one that waited. (On an H200 none
did, 0.05-0.29 ms a call with three queued; the stalls were in the eager logits GEMM after the
graph: benchmarks/host_stall_check.py, ModelRunner.warm_logits.)

    PYTHONPATH=$PWD NANOFLOW_CACHE=... python benchmarks/launch_check.py --sizes 1024,2048 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nanoflow.bench.dummy_models import dummy_model_dir
from nanoflow.entrypoints.llm import LLM


def host_ms(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b")
    p.add_argument("--sizes", default="1024,2048", help="graph token sizes, comma list")
    p.add_argument("--queued", type=int, default=3, help="launches back to back")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_check.py times CUDA graph launches: it needs a GPU")
    sizes = {int(s) for s in args.sizes.split(",")}
    llm = LLM(dummy_model_dir(args.dummy), load_format="dummy", skip_tokenizer_init=True, pipeline="auto",
              kv_cache_dtype=args.kv_cache_dtype, gpu_memory_utilization=0.9)
    graphs = llm.engine.runner.graphs
    small = torch.zeros(1, device=llm.engine.runner.device)
    rows = []
    for key in sorted(k for k in graphs.graphs if k[0] in sizes):
        graph = graphs.graphs[key]
        for _ in range(2):  # warm: the first replay after capture uploads the graph
            graph.replay()
        torch.cuda.synchronize()
        launches = [host_ms(graph.replay) for _ in range(args.queued)]
        after = host_ms(lambda: small.add_(1))
        torch.cuda.synchronize()
        row = {"tokens": key[0], "mixed": key[1], "pipelined": key[2], "replay_ms": graphs.replay_ms[key],
               "launch_host_ms": [round(x, 3) for x in launches], "small_kernel_after_ms": round(after, 3)}
        rows.append(row)
        print(f"{key[0]:>5} {'mixed' if key[1] else 'decode':6} {'pipelined' if key[2] else 'sequential':10} "
              f"replay {row['replay_ms']:7.2f} ms | launch calls (host ms) "
              + " ".join(f"{x:8.3f}" for x in launches) + f" | a small kernel after: {after:8.3f}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "launch_check.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
