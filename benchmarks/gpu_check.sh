#!/usr/bin/env bash
# The one script to run on the GPU machine, in one call: kernel tests, the kernel check, and
# `nanoflow bench` on the Splitwise trace and on a fixed workload, every step under `timeout` so the
# whole run ends within GPU_CHECK_TOTAL_S (default 540 s, under the 10-minute limit of one call).
# Everything is logged (tee) into $OUT; the bench JSON is rewritten after each system it finishes,
# so a step cut short by its timeout still leaves the systems it completed.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS=trace NUM_REQUESTS=1000 bash benchmarks/gpu_check.sh   # one bench, more requests
#
# The published runs (docs/performance.md) do not fit one 10-minute call; they were, one call each:
#   GPU_CHECK_STEPS=tests,kernels bash benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS=trace NUM_REQUESTS=1500 COMPARE=nanoflow-fp8,hf,hf-mean TRACE_S=560 \
#       GPU_CHECK_TOTAL_S=585 bash benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS=fixed NUM_REQUESTS=1500 COMPARE=nanoflow-fp8,hf FIXED_S=560 GPU_CHECK_TOTAL_S=585 \
#       bash benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS=fixed NUM_REQUESTS=200 COMPARE=sequential bash benchmarks/gpu_check.sh
#
# Environment (all optional):
#   PACK=1               pack everything but the summary and table into $OUT/results.tgz (device calls
#                        bring back only a few files)
#   OUT                  where logs and results go (default bench-results/gpu_check_<time> in the
#                        repository root, git-ignored; a run to publish is copied into
#                        benchmarks/results/ with a row in benchmarks/results/README.md)
#   GPU_CHECK_STEPS      comma list of: tests, kernels, share, step, launch, stall, power, moe, tune, trace, fixed; "bench" = trace,fixed,
#                        "pipeline" = share,step (issue 12: benchmarks/gemm_share.py, then
#                        benchmarks/pipeline_step.py over the decode kernels and GEMM caps)
#                        (default tests,kernels,bench)
#   GPU_CHECK_TOTAL_S    wall-clock budget of the whole script (default 540)
#   NUM_REQUESTS         requests per bench (default 400; for the trace, its first N rows)
#   BENCH_MODEL          bench model arguments (default "--dummy llama3-8b")
#   TRACE                trace CSV (default benchmarks/data/splitwise_azure_conv_2023.csv)
#   FIXED_WORKLOAD       the fixed workload (default 512x512)
#   COMPARE              systems run in this order after nanoflow (default sequential,hf): any of
#                        nanoflow-fp8, hf, hf-mean, sequential
#   HF_MAX_BATCH, HF_NUM_REQUESTS   bounds of the Hugging Face baseline (default: the largest batch
#                        free memory holds, all requests within --hf-max-seconds)
#   BENCH_EXTRA          more `nanoflow bench` arguments, e.g. "--max-num-seqs 512"
#   KERNEL_CHECK_ARGS    more benchmarks/kernel_check.py arguments, e.g. "--no-sweep"
#   SHARE_ARGS           more benchmarks/gemm_share.py arguments, e.g. "--no-triton --green --decode-ctas 48 --pair-rows 512"
#   STEP_ARGS            benchmarks/pipeline_step.py arguments for the step step (default: both overlap orders
#                        and stream priorities, the gated kernel on 44 and 66 SMs, splits 512, 768, 1024)
#   LAUNCH_ARGS          benchmarks/launch_check.py arguments for the launch step (host ms of each graph launch
#                        with 0-3 queued, sequential and pipelined graphs; reads NANOFLOW_CACHE's pipeline)
#   STALL_ARGS           benchmarks/host_stall_check.py arguments for the stall step (torch.profiler over a
#                        run's first steps: what the host waits for inside a launch; default --pipeline auto)
#   POWER_ARGS           benchmarks/power_step.py arguments (default: its own, 384, 768 and 512+1536-token steps):
#                        power, clocks and energy a step beside its time, sequential and ping-pong
#   MOE_TOKENS           token counts the moe step tunes (default "640 2048": 512x512's decode steps, full steps)
#   TUNE_ARGS            `nanoflow tune` arguments for the tune step (default "--repeats 5": the tune's own
#                        defaults, serving steps, buckets from 256 tokens, decode on a third and half of the SMs)
#   GPU_TESTS            pytest arguments for the tests step instead of every GPU test (they take ~5 minutes),
#                        e.g. "tests/gpu/test_pipeline_gpu.py tests/kernels/test_decode_attention.py -k capped"
#   TESTS_S, KERNELS_S, SHARE_S, STEP_S, LAUNCH_S, STALL_S, POWER_S, MOE_S, TUNE_S, TRACE_S, FIXED_S   per-step caps in seconds
#                        (default 200, 150, 200, 240, 150, 150, 200, 300, 300, 200, 200; the GPU tests take over 90 s)

set -u -o pipefail
export PYTHONUNBUFFERED=1

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
START=$(date +%s)
export OUT=${OUT:-bench-results/gpu_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
STEPS=${GPU_CHECK_STEPS:-tests,kernels,bench}
STEPS=${STEPS//bench/trace,fixed}
STEPS=${STEPS//pipeline/share,step}
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
NUM_REQUESTS=${NUM_REQUESTS:-400}
BENCH_MODEL=${BENCH_MODEL:---dummy llama3-8b}
TRACE=${TRACE:-benchmarks/data/splitwise_azure_conv_2023.csv}
FIXED_WORKLOAD=${FIXED_WORKLOAD:-512x512}
# sequential before hf: if a step runs out of time, the same-run comparison with our own eager
# mode is the one to keep (gpu-facts.md already has HF figures).
COMPARE=${COMPARE-sequential,hf}  # set and empty: nanoflow alone
HF_MAX_BATCH=${HF_MAX_BATCH:-}
HF_NUM_REQUESTS=${HF_NUM_REQUESTS:-}
BENCH_EXTRA=${BENCH_EXTRA:-}
KERNEL_CHECK_ARGS=${KERNEL_CHECK_ARGS:-}
declare -A CAP=([tests]=${TESTS_S:-200} [kernels]=${KERNELS_S:-150} [share]=${SHARE_S:-200} [step]=${STEP_S:-240}
               [power]=${POWER_S:-200} [launch]=${LAUNCH_S:-150} [stall]=${STALL_S:-150}
               [moe]=${MOE_S:-300} [tune]=${TUNE_S:-300} [trace]=${TRACE_S:-200} [fixed]=${FIXED_S:-200})
# Time kept back for each later step, so an early step cannot eat the whole budget.
declare -A RESERVE=([tests]=30 [kernels]=60 [share]=60 [step]=90 [power]=60 [launch]=60 [stall]=60 [moe]=90 [tune]=120 [trace]=120 [fixed]=120)
ORDER=(tests kernels share step launch stall power moe tune trace fixed)
SUMMARY="$OUT/gpu_check_summary.txt"

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# run_step NAME LOG CMD...: runs CMD under the time left for it, appends the outcome to the summary.
run_step() {
  local name=$1 log=$2; shift 2
  local now left reserve=0 later=0 limit rc t0
  now=$(date +%s)
  for s in "${ORDER[@]}"; do
    if [[ $s == "$name" ]]; then later=1; continue; fi
    if (( later )) && wanted "$s"; then reserve=$(( reserve + RESERVE[$s] )); fi
  done
  left=$(( START + TOTAL_S - now - reserve ))
  if (( left < 20 )); then
    echo "$name: SKIPPED (only ${left}s left of the ${TOTAL_S}s budget)" | tee -a "$SUMMARY"
    return 0
  fi
  limit=$(( CAP[$name] < left ? CAP[$name] : left ))
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$log"
  t0=$(date +%s)
  # `timeout` runs programs, not shell functions: a step re-enters this script as `__run FUNC ARGS`.
  timeout -k 15 "$limit" bash "$SELF" __run "$@" 2>&1 | tee -a "$OUT/$log"
  rc=$?
  local verdict=ok
  if (( rc == 124 || rc == 137 )); then verdict="TIMED OUT"; elif (( rc != 0 )); then verdict="FAILED rc=$rc"; fi
  (( rc != 0 )) && echo  # a killed step may leave its last line unfinished
  echo "$name: $verdict after $(( $(date +%s) - t0 ))s (log $log)" | tee -a "$SUMMARY"
}

pytest_gpu() {
  # Kernel tests (GPU cases included), tests/gpu if the lead added it, and tests marked gpu elsewhere;
  # GPU_TESTS (pytest arguments) runs just those instead.
  if [[ -n ${GPU_TESTS:-} ]]; then
    # eval: GPU_TESTS is a shell argument list, quotes included (-k 'a or b')
    eval "python -m pytest $GPU_TESTS -q --no-header -p no:cacheprovider"
    return
  fi
  local dirs=(tests/kernels) rc=0
  [[ -d tests/gpu ]] && dirs+=(tests/gpu)
  python -m pytest "${dirs[@]}" -q --no-header -p no:cacheprovider || rc=$?
  local marked
  marked=$(grep -rlE "pytest\.mark\.gpu|mark\.gpu" tests --include='test_*.py' 2>/dev/null \
           | grep -vE '^tests/(kernels|gpu)/' || true)
  if [[ -n $marked ]]; then
    # shellcheck disable=SC2086  # one path per word
    python -m pytest $marked -q -m gpu --no-header -p no:cacheprovider || rc=$?
  fi
  return $rc
}

bench() {
  local hf=()
  [[ -n $HF_MAX_BATCH ]] && hf+=(--hf-max-batch "$HF_MAX_BATCH")
  [[ -n $HF_NUM_REQUESTS ]] && hf+=(--hf-num-requests "$HF_NUM_REQUESTS")
  # shellcheck disable=SC2086  # BENCH_MODEL and BENCH_EXTRA are argument lists
  python -m nanoflow.cli bench $BENCH_MODEL "$@" --num-requests "$NUM_REQUESTS" --compare "$COMPARE" \
    ${hf[@]+"${hf[@]}"} --output-dir "$OUT" --no-tqdm $BENCH_EXTRA
}

if [[ ${1:-} == __run ]]; then
  shift
  "$@"
  exit $?
fi

{
  echo "gpu_check $(date -Is) on $(hostname)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" 2>&1
  python -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  echo "steps: $STEPS; budget ${TOTAL_S}s; NUM_REQUESTS=$NUM_REQUESTS; BENCH_MODEL=$BENCH_MODEL"
} 2>&1 | tee "$OUT/env.log"

: > "$SUMMARY"
wanted tests && run_step tests tests.log pytest_gpu
# shellcheck disable=SC2086  # KERNEL_CHECK_ARGS is an argument list
wanted kernels && run_step kernels kernel_check.log python benchmarks/kernel_check.py --out "$OUT" $KERNEL_CHECK_ARGS
# shellcheck disable=SC2086  # SHARE_ARGS is an argument list
wanted share && run_step share gemm_share.log python benchmarks/gemm_share.py --out "$OUT" ${SHARE_ARGS:-}
# shellcheck disable=SC2086  # STEP_ARGS is an argument list
wanted step && run_step step pipeline_step.log env PYTHONPATH=. python benchmarks/pipeline_step.py \
  ${STEP_ARGS:---splits 512,768,1024 --ctas 44,66 --kernels gated --gemm-ctas none --beside qkv,mlp --priority high,normal} \
  --out "$OUT"
# shellcheck disable=SC2086  # LAUNCH_ARGS is an argument list
wanted launch && run_step launch launch_check.log env PYTHONPATH=. python benchmarks/launch_check.py ${LAUNCH_ARGS:-} --out "$OUT"
# shellcheck disable=SC2086  # STALL_ARGS is an argument list
wanted stall && run_step stall host_stall_check.log env PYTHONPATH=. python benchmarks/host_stall_check.py ${STALL_ARGS:-} --out "$OUT"
# shellcheck disable=SC2086  # POWER_ARGS is an argument list
wanted power && run_step power power_step.log env PYTHONPATH=. python benchmarks/power_step.py ${POWER_ARGS:-} --out "$OUT"
# the grouped GEMMs' tiles re-tuned (per projection) at MOE_TOKENS; the benches after it use them, and
# the tuned file comes back in $OUT
# shellcheck disable=SC2086  # MOE_TOKENS is a list
wanted moe && run_step moe moe_check.log python benchmarks/moe_check.py --sweep --write-config --out "$OUT" \
  --tokens ${MOE_TOKENS:-640 2048} && cp nanoflow/kernels/fused_moe_configs.json "$OUT/"
# `nanoflow tune` for BENCH_MODEL (profile, search, the chosen pipeline measured), cached in $OUT/cache,
# where the benches after it find it (--pipeline auto, the default): with COMPARE=nanoflow-sequential
# they measure the tuned pipeline against the same engine with it off
if wanted tune; then
  export NANOFLOW_CACHE="$OUT/cache"
  # shellcheck disable=SC2086  # BENCH_MODEL and TUNE_ARGS are argument lists
  run_step tune tune.log python -m nanoflow.cli tune $BENCH_MODEL --no-tqdm --output-dir "$OUT/tune" --dtype bfloat16 ${TUNE_ARGS:---repeats 5}
fi
wanted trace && run_step trace bench_trace.log bench --workload "trace:$TRACE"
wanted fixed && run_step fixed bench_fixed.log bench --workload "$FIXED_WORKLOAD"

echo "=== summary ($(( $(date +%s) - START ))s)"
cat "$SUMMARY"
if compgen -G "$OUT/bench_*.json" > /dev/null; then
  python -m nanoflow.bench.report "$OUT"/bench_*.json 2>&1 | tee "$OUT/bench_table.md"
fi
# PACK=1 (device runs, which bring back only a few files): everything but the summary and the table
# goes into one results.tgz beside them
if [[ ${PACK:-0} == 1 ]]; then
  bash benchmarks/pack_results.sh "$OUT" "$(basename "$SUMMARY")"
fi
! grep -qE "FAILED|TIMED OUT" "$SUMMARY"
