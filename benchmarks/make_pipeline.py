"""Writes a hand-made pipeline JSON (for `--pipeline PATH`) from the schedule builders, to measure
a schedule before `nanoflow tune` searches for one: two nano-batches split at --split for
iterations of --min-tokens to --tokens tokens (sequential below).

    python benchmarks/make_pipeline.py network --tp --split 1024 --out net.json     # issue 13
    python benchmarks/make_pipeline.py tp-overlap --split 1024 --decode-ctas 66 --out tpo.json   # 3 streams
    python benchmarks/make_pipeline.py overlap --split 1024 --decode-ctas 44 --gemm-ctas 88 --out ov.json
    python benchmarks/make_pipeline.py pingpong --bounds 256,512,1024,2048 --decode-ctas 66 --out pp.json
    python benchmarks/make_pipeline.py pingpong --bounds 256,512,1024,2048 --decode-ctas 66 --gemm-ctas 66 --cublas \
        --out pp_halves.json   # every GEMM told to size its grid for the 66 SMs the decode leaves

The op names are a Llama/Mixtral decoder layer's (models/llama.layer_op_names); the engine checks
them against the model it loads and refuses a pipeline that does not match.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.models.llama import layer_op_names  # noqa: E402
from nanoflow.pipeline.schedule import (  # noqa: E402
    OVERLAP_ORDERS,
    Pipeline,
    network_overlap_schedule,
    overlap_schedule,
    pingpong_schedule,
    tp_overlap_schedule,
)
from nanoflow.tune.model import ALIGN, split_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("network", "overlap", "tp-overlap", "pingpong"),
                   help="network: all-reduces beside the other nano-batch's ops; overlap: decode attention beside "
                   "them; tp-overlap: both, on three streams (tensor parallel); pingpong: each nano-batch on a "
                   "stream of its own")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="the token budget (largest iteration)")
    p.add_argument("--split", type=int, default=1024)
    p.add_argument("--min-tokens", type=int, default=None, help="smallest pipelined iteration (default split + 1)")
    p.add_argument("--tp", action="store_true", help="a tensor-parallel layer (with its all-reduces)")
    p.add_argument("--moe", action="store_true", help="Mixtral's layer (route, experts)")
    p.add_argument("--decode-ctas", type=int, default=None)
    p.add_argument("--gemm-ctas", type=int, default=None, help="cap the GEMMs (overlap: those beside decode "
                   "attention; network, pingpong: all)")
    p.add_argument("--cublas", action="store_true", help="a capped GEMM is cuBLAS sized for --gemm-ctas SMs (the "
                   "SM carveout), not the persistent Triton GEMM")
    p.add_argument("--beside", choices=OVERLAP_ORDERS, default="qkv",
                   help="overlap: what decode attention runs beside (pipeline.schedule.overlap_schedule)")
    p.add_argument("--bounds", default=None,
                   help="pingpong: comma list of iteration sizes b0,b1,...: one schedule for each (b_i, b_i+1], "
                   "split at half its top (at b_i if that is less), e.g. the CUDA graph sizes (overrides --split, "
                   "--tokens and --min-tokens)")
    a = p.parse_args()
    if a.kind == "pingpong" and a.bounds:
        bounds = [int(b) for b in a.bounds.split(",")]
        # graphs replay a range's schedule at their own size, the range's top where the bounds are
        # the graph sizes: split at half of it (tune.model.split_for), unless the smallest step would
        # leave nothing past it
        schedules = tuple(pingpong_schedule(layer_op_names(a.moe, a.tp), hi,
                                            split_for(lo + 1, hi, 0.5) or lo // ALIGN * ALIGN, lo + 1, a.decode_ctas,
                                            a.gemm_ctas, a.cublas)
                          for lo, hi in itertools.pairwise(bounds))
        Pipeline(schedules, {"made_by": "benchmarks/make_pipeline.py", **vars(a)}, "hand-made").save(a.out)
        print(f"wrote {a.out}: pingpong, {len(schedules)} schedules over {bounds[0] + 1}-{bounds[-1]} tokens")
        return
    names = layer_op_names(a.moe, a.tp or a.kind in ("network", "tp-overlap"))
    lo = a.min_tokens or a.split + 1
    if a.kind == "network":
        schedule = network_overlap_schedule(names, a.tokens, a.split, lo, a.gemm_ctas, a.cublas)
    elif a.kind == "pingpong":
        schedule = pingpong_schedule(names, a.tokens, a.split, lo, a.decode_ctas, a.gemm_ctas, a.cublas)
    elif a.kind == "tp-overlap":
        schedule = tp_overlap_schedule(names, a.tokens, a.split, lo, a.decode_ctas)
    else:
        schedule = overlap_schedule(names, a.tokens, a.split, lo, a.decode_ctas, gemm_ctas=a.gemm_ctas,
                                    beside=a.beside, cublas=a.cublas)
    Pipeline((schedule,), {"made_by": "benchmarks/make_pipeline.py", **vars(a)}, "hand-made").save(a.out)
    print(f"wrote {a.out}: {a.kind}, split {a.split}, iterations of {lo}-{a.tokens} tokens")


if __name__ == "__main__":
    main()
