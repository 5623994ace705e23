import torch, torch.nn.functional as F, json, os
torch.manual_seed(0)
shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
W = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (kk, n) in shapes.items()}
def layer(xs):
    return [F.linear(xs[k], W[k]) for k in shapes]
res = {}
for M in [384, 400, 416, 432, 440, 448, 456, 464, 480, 496, 512]:
    xs = {k: torch.randn(M, kk, device="cuda", dtype=torch.bfloat16) for k, (kk, n) in shapes.items()}
    for _ in range(3): layer(xs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(8): layer(xs)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = {}
    for mode in ("eager", "graph"):
        for _ in range(3):
            (g.replay() if mode == "graph" else [layer(xs) for _ in range(8)])
        torch.cuda.synchronize(); s.record()
        for _ in range(20):
            (g.replay() if mode == "graph" else [layer(xs) for _ in range(8)])
        e.record(); torch.cuda.synchronize()
        out[mode] = s.elapsed_time(e) / 20 / 8 * 1e3  # us per layer
    res[M] = out
    print(M, {k: round(v, 1) for k, v in out.items()})
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gemm_m.json"), "w"))
