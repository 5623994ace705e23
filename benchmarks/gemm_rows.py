"""Time of one Llama-3-8B layer's four GEMMs (cuBLAS via F.linear) per row count, launched one by
one and replayed from a CUDA graph. Found that cuBLAS is much slower at exactly 448 rows than at 440
or 512 on the H100, which is why the graph runner picks buckets by measured time.

    OUT=DIR python benchmarks/gemm_rows.py [ROWS ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS, REPS = 8, 20


def main() -> None:
    rows = [int(a) for a in sys.argv[1:]] or [384, 400, 416, 432, 440, 448, 456, 464, 480, 496, 512]
    torch.manual_seed(0)
    weights = {k: torch.randn(n, k_in, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (k_in, n) in SHAPES.items()}
    result = {}
    for m in rows:
        xs = {k: torch.randn(m, k_in, device="cuda", dtype=torch.bfloat16) for k, (k_in, _) in SHAPES.items()}

        def layers(xs: dict[str, torch.Tensor] = xs) -> None:
            for _ in range(LAYERS):
                for k in SHAPES:
                    F.linear(xs[k], weights[k])

        layers()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layers()
        out = {}
        for mode, run in (("eager", layers), ("graph", graph.replay)):
            for _ in range(3):
                run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPS):
                run()
            end.record()
            end.synchronize()
            out[mode] = start.elapsed_time(end) / REPS / LAYERS * 1e3  # us per layer
        result[m] = out
        print(m, {k: round(v, 1) for k, v in out.items()})
    with open(os.path.join(os.environ.get("OUT", "."), "gemm_rows.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
