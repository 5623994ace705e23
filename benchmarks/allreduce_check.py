"""A step's all-reduces on 2+ GPUs: NCCL vs torch symmetric memory (`--all-reduce symm-mem`), alone and
beside a GEMM on a second stream (the network row of NanoFlow's interference table), every call
captured in a CUDA graph as the engine runs them.

    python benchmarks/allreduce_check.py --out DIR                # all visible GPUs, Llama-3-8B / 70B widths
    python benchmarks/allreduce_check.py --tokens 256,2048 --hidden 8192 --nccl-max-ctas 8

For each message (tokens x hidden, bf16): microseconds per all-reduce alone (NCCL, symm-mem), the
GEMM alone ([tokens, hidden] x [hidden, 2 * hidden], the size of a TP2 shard's gate_up), and both
launched together on two streams (the all-reduce first): the pair's time against the sum of the two
alone, per backend. Results from rank 0, as JSON. Multicast stays off in every process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_pair import stream_pair  # noqa: E402

from nanoflow.executor.distributed import disable_multicast  # noqa: E402
from nanoflow.executor.symm_all_reduce import SymmAllReduce  # noqa: E402
from nanoflow.tune.timing import Timer  # noqa: E402


def _per_call_us(timer: Timer, fn: Callable[[], None], calls: int = 10) -> float:
    """us per call of fn, `calls` of them in one CUDA graph (a replay's launch is spread over them)."""
    return 1e3 * timer.ms(lambda: [fn() for _ in range(calls)]) / calls


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results: dict) -> None:
    disable_multicast()
    if args.nccl_max_ctas:
        os.environ["NCCL_MAX_CTAS"] = str(args.nccl_max_ctas)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), device_id=dev)
    dist.all_reduce(torch.ones(1, device=dev))  # the communicator exists before any capture
    largest = max(args.tokens) * max(args.hidden)
    symm = SymmAllReduce(largest, torch.bfloat16, dev)
    timer = Timer(dev, warmup=3, repeats=20)  # every rank replays as often: the collectives pair up
    rows = []
    for hidden in args.hidden:
        w = torch.randn(hidden, 2 * hidden, device=dev, dtype=torch.bfloat16) / hidden ** 0.5
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
            a = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
            y = torch.empty(tokens, 2 * hidden, device=dev, dtype=torch.bfloat16)
            ref = x.clone()
            dist.all_reduce(ref)
            got = x.clone()
            assert symm(got)
            err = (got.float() - ref.float()).abs().max().item()

            def gemm(a=a, w=w, y=y) -> None:
                torch.mm(a, w, out=y)

            comms = {"nccl": lambda x=x: dist.all_reduce(x), "symm-mem": lambda x=x: symm(x)}
            row = {"tokens": tokens, "hidden": hidden, "mib": x.numel() * 2 / 2**20, "symm_max_abs_err": err,
                   "gemm_us": _per_call_us(timer, gemm)}
            for name, comm in comms.items():
                alone = _per_call_us(timer, comm)
                both = _per_call_us(timer, stream_pair(comm, gemm))  # the all-reduce issued first
                row[name] = {"alone_us": alone, "beside_gemm_us": both,
                             "gain_vs_sequential": (alone + row["gemm_us"]) / both,
                             "bus_gbps": 2 * (world - 1) / world * x.numel() * 2 / (alone * 1e-6) / 1e9}
            rows.append(row)
            if rank == 0:
                print(f"{tokens:>5} x {hidden:<5} {row['mib']:6.1f} MiB  gemm {row['gemm_us']:7.1f} us  " +
                      "  ".join(f"{n}: {row[n]['alone_us']:6.1f} us alone, {row[n]['bus_gbps']:5.0f} GB/s, "
                                f"beside gemm {row[n]['gain_vs_sequential']:.2f}x" for n in comms), flush=True)
    if rank == 0:
        results.update({"world_size": world, "device": torch.cuda.get_device_name(dev),
                    "nccl_max_ctas": args.nccl_max_ctas, "torch": torch.__version__, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512, 1024, 2048])
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--nccl-max-ctas", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for allreduce_check.json")
    args = p.parse_args()
    disable_multicast()
    world = torch.cuda.device_count()
    if world < 2:
        sys.exit("allreduce_check needs 2 or more GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, port, args, results), nprocs=world)
        data = dict(results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "allreduce_check.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
