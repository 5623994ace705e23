"""What a decode-attention step costs in instructions, on a machine without a GPU: compiles the decode
kernels for sm_90a (Triton's bundled ptxas), disassembles them (nvdisasm) and counts the SASS
instructions of the inner loop (one K/V step) per warp, by opcode.

    python benchmarks/decode_sass.py                        # per-head and all-heads, int32 and int64 offsets
    python benchmarks/decode_sass.py --kernel all_heads --warps 4,8 --stages 5 --mix

Why: on a capped grid a decode CTA moves ~35-45 GB/s whatever its bytes in flight (docs/pipeline_history.md);
its warps run out of issue slots and latency hiding first, so fewer instructions per step is a lever
that can be measured here, before a GPU run. Integer arguments are compiled as Triton specialises a
real launch (pointers and strides divisible by 16), or the K/V loads would not be pipelined at all.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.kernels.decode_all_heads import decode_all_heads_kernel  # noqa: E402
from nanoflow.kernels.decode_attention import _decode_kernel  # noqa: E402

PTRS = ("q_ptr", "k_cache_ptr", "v_cache_ptr", "page_tables_ptr", "seq_lens_ptr", "num_seqs_ptr", "out_ptr",
        "part_acc_ptr", "part_m_ptr", "part_l_ptr")
PTR_TYPES = ("*bf16", "*bf16", "*bf16", "*i32", "*i32", "*i32", "*bf16", "*fp32", "*fp32", "*fp32")
STRIDES = ("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_pt", "stride_cp", "stride_ch", "stride_ct")


def compile_kernel(kernel: str, warps: int, stages: int, block_n: int, i32: bool,
                   gate: bool = False, heads: int = 8, batched: bool = True, fp8: bool = False) -> tuple[bytes, int]:
    """The cubin and shared memory (bytes) of one decode kernel for Llama-3-8B's shape (8 kv heads x 4
    query heads, D 128, bf16 q; fp8: an fp8 e4m3 cache, widened to fp16 for the dots)."""
    common = dict(GROUP=4, HEAD_DIM=128, PAGE_SIZE=16, BLOCK_N=block_n, SPLIT=True, NUM_STAGES=stages, FLATTEN=False,
                  PRECISION="tf32", FP16_DOTS=fp8, I32_OFFSETS=i32)
    if kernel == "per_head":
        fn, ints = _decode_kernel, ("num_kv_heads", "num_parts", "partition", "sliding_window")
        const = dict(BLOCK_G=16, **common)
    else:
        fn, ints = decode_all_heads_kernel, ("num_kv_heads", "num_head_blocks", "num_parts", "partition",
                                             "sliding_window")
        const = dict(BLOCK_G=4, HEADS=heads, BLOCK_H=heads, BATCHED=batched, EVEN_HEADS=True, DYNAMIC=gate,
                     SM_GATE=gate, **common)  # BLOCK_G: as the launcher pads the group
        ints = (*ints, "share", "num_sms", "ctas_per_sm")
    ptr_types = dict(zip(PTRS, PTR_TYPES, strict=True))
    if fp8:
        ptr_types.update(k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv")
    types = {**ptr_types, "work_counter_ptr": "*i32", "qk_scale": "fp32",
             **dict.fromkeys(ints, "i32"),
             **dict.fromkeys(STRIDES, "i32"), **dict.fromkeys(const, "constexpr")}
    names = list(fn.arg_names)  # the signature goes in the kernel's parameter order
    sig = {n: types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*PTRS, *STRIDES, "partition")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"], compiled.metadata.shared


def registers(cubin: bytes, workdir: Path) -> int:
    """Registers per thread of the cubin's kernel (cuobjdump's resource usage)."""
    path = workdir / "r.cubin"
    path.write_bytes(cubin)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else -1


def inner_loop(cubin: bytes, workdir: Path) -> list[str]:
    """Opcodes of the innermost loop: the shortest backward branch's body that holds MMAs."""
    path = workdir / "k.cubin"
    path.write_bytes(cubin)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    sass = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\.(L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            ops = [m2.group(1) for x in lines[labels[m.group(1)]: i + 1]
                   if (m2 := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", x))]
            loops.append(ops)
    # the K/V step: the shortest loop with MMAs (the SM gate's spin loop has none)
    return min((ops for ops in loops if "HMMA" in ops), key=len, default=[])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=("per_head", "all_heads", "both"), default="both")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", type=int, default=None, help="default: 8 (per-head), 5 (all-heads)")
    p.add_argument("--mix", action="store_true", help="also the opcodes, most frequent first")
    p.add_argument("--gate", action="store_true", help="all-heads: the SM-gated variant (DecodeConfig.sm_gate)")
    p.add_argument("--heads", type=int, default=8, help="all-heads: kv heads per work item (kv_heads_per_item)")
    p.add_argument("--flat", action="store_true",
                   help="all-heads: the 2-D dot (DecodeConfig(batched_dot=False)): heads x group rows against heads x "
                   "tokens columns, off-diagonal blocks masked; at 4 heads x a group of 4 the rows fill one 16-row MMA "
                   "tile with no padding")
    p.add_argument("--fp8", action="store_true",
                   help="an fp8 e4m3 cache (engine defaults: 64-token steps x 6 stages per-head, 32 x 7 all-heads)")
    p.add_argument("--block-n", type=int, default=None, help="tokens per step (default: the engine's)")
    p.add_argument("--top", type=int, default=12, help="with --mix: this many opcodes")
    args = p.parse_args()
    import tempfile

    kernels = ("per_head", "all_heads") if args.kernel == "both" else (args.kernel,)
    print(f"{'kernel':<10} {'warps':>5} {'stages':>6} {'offsets':>7} {'instructions/step/warp':>23} "
          f"{'regs':>5} {'smem KiB':>8} {'CTAs/SM':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in kernels:
            if args.fp8:
                stages, block_n = args.stages or (6 if kernel == "per_head" else 7), 64 if kernel == "per_head" else 32
            else:
                stages, block_n = args.stages or (8 if kernel == "per_head" else 5), 128 if kernel == "per_head" else 16
            block_n = args.block_n or block_n
            for warps in (int(w) for w in args.warps.split(",")):
                for i32 in (False, True):
                    gate = args.gate and kernel == "all_heads"
                    cubin, smem = compile_kernel(kernel, warps, stages, block_n, i32, gate, args.heads,
                                                 not (args.flat and kernel == "all_heads"), args.fp8)
                    ops, regs = inner_loop(cubin, Path(tmp)), registers(cubin, Path(tmp))
                    # Hopper: 64 Ki registers and 228 KiB of shared memory per SM (1 KiB reserved per CTA)
                    fit = min(65536 // max(1, regs * 32 * warps), (228 * 1024) // (smem + 1024))
                    print(f"{kernel:<10} {warps:>5} {stages:>6} {'int32' if i32 else 'int64':>7} {len(ops):>23} "
                          f"{regs:>5} {smem / 1024:>8.0f} {fit:>7}")
                    if args.mix:
                        mix = collections.Counter(ops).most_common(args.top)
                        print("    " + ", ".join(f"{op} {n}" for op, n in mix))


if __name__ == "__main__":
    main()
