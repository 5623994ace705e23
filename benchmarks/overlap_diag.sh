#!/usr/bin/env bash
# Why ping-pong wins on one H200 and loses under TP2 (issue 13), in one call on a 2-GPU machine:
#   1. benchmarks/gemm_share.py --no-triton: each Llama-3-8B GEMM as cuBLAS sized for a share of the
#      SMs (the SM carveout) alone and beside the pipeline's capped decode kernel (GPU 0 only);
#   2. benchmarks/tp_step_profile.py on Llama-3-8B (fp8 cache): decode-only steps of DIAG_TOKENS
#      tokens, per kernel group busy / alone / idle on rank 0, for the sequential schedule, ping-pong
#      with decode attention on 66 SMs, and the same with every GEMM as cuBLAS sized for 66 SMs:
#      under TP2 (symm-mem) and on one GPU.
#
#   OUT=DIR bash benchmarks/overlap_diag.sh      # DIAG_TOTAL_S (560), DIAG_TOKENS (512,1024)
#   PACK=1: everything but summary.txt into DIR/results.tgz (a device call brings back few files; the
#   profiles' chrome traces are left out of it)
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench-results/overlap_diag_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
END=$(( $(date +%s) + ${DIAG_TOTAL_S:-560} ))
TOKENS=${DIAG_TOKENS:-512,1024}

# run NAME CAP CMD...: CMD under min(CAP, time left) seconds, its output in $OUT/NAME.log
run() {
  local name=$1 cap=$2 left=$(( END - $(date +%s) ))
  shift 2
  (( left < cap )) && cap=$left
  (( cap < 20 )) && { echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"; return; }
  echo "=== $name (limit ${cap}s): $*"
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$?" | tee -a "$OUT/summary.txt"
  grep -v "CUDA graphs:" "$OUT/$name.log" | tail -16
}

B="--bounds 256,512,1024,2048"
python benchmarks/make_pipeline.py pingpong --tp $B --decode-ctas 66 --out "$OUT/pp66_tp.json" > /dev/null
python benchmarks/make_pipeline.py pingpong --tp $B --decode-ctas 66 --gemm-ctas 66 --cublas --out "$OUT/pp66g_tp.json" > /dev/null
python benchmarks/make_pipeline.py pingpong $B --decode-ctas 66 --out "$OUT/pp66_1.json" > /dev/null
python benchmarks/make_pipeline.py pingpong $B --decode-ctas 66 --gemm-ctas 66 --cublas --out "$OUT/pp66g_1.json" > /dev/null

CUDA_VISIBLE_DEVICES=0 run gemm_share 150 python benchmarks/gemm_share.py --no-triton --rows 512 1024 2048 \
  --decode-ctas 66 --out "$OUT/gemm_share"
profile() {  # profile NAME TP PIPELINE [more flags]
  local name=$1 tp=$2 pipe=$3
  shift 3
  run "$name" 120 python benchmarks/tp_step_profile.py --tp "$tp" --kv-cache-dtype fp8 --tokens "$TOKENS" \
    --pipeline "$pipe" --out "$OUT/$name" "$@"
}
profile tp2_seq 2 off --all-reduce symm-mem
profile tp2_pp66 2 "$OUT/pp66_tp.json" --all-reduce symm-mem
profile tp2_pp66g 2 "$OUT/pp66g_tp.json" --all-reduce symm-mem
profile tp1_seq 1 off
profile tp1_pp66 1 "$OUT/pp66_1.json"
profile tp1_pp66g 1 "$OUT/pp66g_1.json"
echo "=== done"; cat "$OUT/summary.txt"
if [[ ${PACK:-0} == 1 ]]; then
  find "$OUT" -name "trace_*.json.gz" -delete
  bash benchmarks/pack_results.sh "$OUT" summary.txt
fi
