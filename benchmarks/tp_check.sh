#!/usr/bin/env bash
# Tensor parallelism with CUDA graphs (issue 13) on a 2-GPU machine (TP_SIZE=4: a 4-GPU one), in one
# call of under 10 minutes: the GPU test (TP2 with graphs against TP2 without them and one GPU), then `nanoflow bench` of
# Llama-3-8B TP2 on the Splitwise trace with graphs and, for comparison, with EAGER_FLAGS. Every step
# runs under `timeout`; the whole script ends within TP_CHECK_TOTAL_S. Logs and JSON go into $OUT.
#
#   OUT=/some/dir bash benchmarks/tp_check.sh
#   EAGER_FLAGS="--cuda-graph-max-tokens 0" bash benchmarks/tp_check.sh   # graphs off, same kernels
#
# Environment (all optional): OUT (default bench-results/tp_check_<time>, git-ignored), NUM_REQUESTS
# (1000), TRACE, EAGER_FLAGS (--enforce-eager), TP_CHECK_TOTAL_S (540), TESTS_S (200), BENCH_S (170),
# TP_CHECK_SECOND=network: the second bench runs the network-overlap pipeline (benchmarks/
# make_pipeline.py NET_KIND: network, default, or tp-overlap, all-reduces and decode attention on
# NET_DECODE_CTAS (66) SMs both beside the GEMMs, or pingpong, each nano-batch on a stream of its
# own and the all-reduces on a third; split NET_SPLIT, default 1024, for iterations of
# NET_MIN_TOKENS, default split + 1, to the budget; NET_BOUNDS, e.g. the graph sizes 256,320,...,2048: one
# pingpong schedule per range) against nanoflow-sequential instead of
# EAGER_FLAGS; TP_CHECK_SECOND=tune: `nanoflow tune` (network overlap measured per bucket, cached)
# then the bench with --pipeline auto against nanoflow-sequential (TUNE_ONLY=1: the tune alone, whose cache
# a later call's bench reads with NANOFLOW_CACHE); TP_CHECK_SECOND=ep: the second
# bench with --enable-expert-parallel (for TP_MODEL=mixtral-8x7b); NCCL_MAX_CTAS_FLAG, e.g.
# "--nccl-max-ctas 16"; TP_MODEL (llama3-8b), TP_WORKLOAD (the trace), TP_STEPS (tests,graphs,second;
# also allreduce: benchmarks/allreduce_check.py, NCCL vs symm-mem alone and beside a GEMM); BENCH_FLAGS
# (more bench arguments for every bench, e.g. "--all-reduce symm-mem --kv-cache-dtype fp8"); PACK=1:
# everything but the summary and the table in one $OUT/results.tgz (device calls bring back few files).

set -u -o pipefail
# NVLink multicast can take a shared host's GPUs out of service: off in every process started here
# (the engine sets them again in itself and in each worker it spawns).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
START=$(date +%s)
export OUT=${OUT:-bench-results/tp_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
TOTAL_S=${TP_CHECK_TOTAL_S:-540}
NUM_REQUESTS=${NUM_REQUESTS:-1000}
TRACE=${TRACE:-benchmarks/data/splitwise_azure_conv_2023.csv}
EAGER_FLAGS=${EAGER_FLAGS:---enforce-eager}
SUMMARY="$OUT/tp_check_summary.txt"
: > "$SUMMARY"

# step NAME CAP RESERVE CMD...: runs CMD under min(CAP, the time left less RESERVE kept for later steps).
step() {
  local name=$1 cap=$2 reserve=$3 left limit rc t0 verdict=ok
  shift 3
  left=$(( START + TOTAL_S - $(date +%s) - reserve ))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    echo "$name: SKIPPED (${left}s left)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 137 )); then verdict="TIMED OUT"; elif (( rc != 0 )); then verdict="FAILED rc=$rc"; fi
  echo "$name: $verdict after $(( $(date +%s) - t0 ))s (log $name.log)" | tee -a "$SUMMARY"
}

{
  echo "tp_check $(date -Is) on $(hostname), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>&1 || true
  nvidia-smi topo -m 2>&1 | head -4 || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count())" 2>&1
} | tee "$OUT/env.log"
TP=${TP_SIZE:-2}
if ! python -c "import sys, torch; sys.exit(torch.cuda.device_count() < $TP)"; then
  echo "tp_check needs $TP GPUs" | tee -a "$SUMMARY"
  exit 2
fi

MODEL=${TP_MODEL:-llama3-8b}
STEPS=${TP_STEPS:-tests,graphs,second}
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
bench=(python -m nanoflow.cli bench --dummy "$MODEL" --tensor-parallel-size "$TP" --workload "${TP_WORKLOAD:-trace:$TRACE}"
       --num-requests "$NUM_REQUESTS" --no-tqdm ${BENCH_FLAGS:-})
wanted tests && step tests "${TESTS_S:-200}" 340 python -m pytest tests/gpu/test_tensor_parallel_gpu.py -q -x \
  --no-header -p no:cacheprovider
wanted allreduce && step allreduce "${ALLREDUCE_S:-120}" 170 python benchmarks/allreduce_check.py --out "$OUT" \
  ${NCCL_MAX_CTAS_FLAG:-}
wanted graphs && step bench_graphs "${BENCH_S:-170}" 170 "${bench[@]}" --output-dir "$OUT/graphs"
if ! wanted second; then
  :
elif [[ ${TP_CHECK_SECOND:-eager} == tune ]]; then
  # the search measures each candidate in its own engine start; its pipeline lands in $OUT's cache.
  # --dtype bfloat16 as the bench runs every model (a float16 preset, e.g. llama2-70b, would otherwise
  # be tuned in float16 and its pipeline file missed by the bench); TUNE_FLAGS may name another.
  export NANOFLOW_CACHE="$OUT/cache"
  step tune "${TUNE_S:-200}" $(( ${TUNE_ONLY:-0} == 1 ? 0 : 120 )) python -m nanoflow.cli tune --dummy "$MODEL" \
    --tensor-parallel-size "$TP" --no-tqdm --output-dir "$OUT/tune" --dtype bfloat16 ${TUNE_FLAGS:-} ${NCCL_MAX_CTAS_FLAG:-}
  [[ ${TUNE_ONLY:-0} == 1 ]] || step bench_tuned "${BENCH_S:-170}" 0 "${bench[@]}" --output-dir "$OUT/tuned" --pipeline auto \
    --compare nanoflow-sequential ${NCCL_MAX_CTAS_FLAG:-}
elif [[ ${TP_CHECK_SECOND:-eager} == ep ]]; then
  # expert parallelism against the tensor-parallel MoE of bench_graphs (TP_MODEL=mixtral-8x7b)
  step bench_ep "${BENCH_S:-170}" 0 "${bench[@]}" --output-dir "$OUT/ep" --enable-expert-parallel
elif [[ ${TP_CHECK_SECOND:-eager} == network ]]; then
  # the network-overlap pipeline (each nano-batch's all-reduces beside the other's ops) vs sequential
  python benchmarks/make_pipeline.py "${NET_KIND:-network}" --tp --split "${NET_SPLIT:-1024}" \
    --decode-ctas "${NET_DECODE_CTAS:-66}" ${NET_MIN_TOKENS:+--min-tokens "$NET_MIN_TOKENS"} \
    ${NET_BOUNDS:+--bounds "$NET_BOUNDS"} --out "$OUT/net.json"
  step bench_network "${BENCH_S:-170}" 0 "${bench[@]}" --output-dir "$OUT/network" --pipeline "$OUT/net.json" \
    --compare nanoflow-sequential ${NCCL_MAX_CTAS_FLAG:-}
else
  # shellcheck disable=SC2086  # EAGER_FLAGS is an argument list
  step bench_eager "${BENCH_S:-170}" 0 "${bench[@]}" --output-dir "$OUT/eager" $EAGER_FLAGS
fi

echo "=== summary ($(( $(date +%s) - START ))s)"
cat "$SUMMARY"
if compgen -G "$OUT/*/bench_*.json" > /dev/null; then
  python -m nanoflow.bench.report "$OUT"/*/bench_*.json 2>&1 | tee "$OUT/bench_table.md"
fi
# PACK=1 (device runs, which bring back only a few files): everything but the summary and the table
# goes into one results.tgz beside them
if [[ ${PACK:-0} == 1 ]]; then
  bash benchmarks/pack_results.sh "$OUT" "$(basename "$SUMMARY")"
fi
! grep -qE "FAILED|TIMED OUT" "$SUMMARY"
