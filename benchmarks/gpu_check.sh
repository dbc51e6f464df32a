#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with torch, triton and nvcc already installed and
# no network. It builds the extension, tests every CUDA path, benchmarks whole models and then
# single layers and blocks, and writes everything to benchmarks/results/<gpu>-<date>/.
#
#   FASTCNN_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --rehearse    # on a CPU: the same steps and file handling at
#                                              # tiny sizes (Triton's interpreter, no GPU)
#
# It never loses what it measured, whatever stops it:
# - the log is written to $OUT/gpu_check.log as it is produced (when OUT is set: the device
#   tool brings $OUT back even from a command killed at its limit);
# - after every step, $OUT/summary.md (step table + every result table so far) and
#   $OUT/results.tgz (the whole result folder) are rewritten, each atomically. These three are
#   all of $OUT: the device tool returns at most 8 files, at most 2 folders deep;
# - every benchmark rewrites its JSON and Markdown after each row (fastcnn.bench.results
#   .ResultFile), so a step killed by its limit leaves a valid partial file;
# - each step runs under `timeout` with the limit below, and no step starts past the budget
#   (GPU_CHECK_BUDGET_S, default 480 s, well inside the device tool's 540-600 s): a step that
#   would overrun is cut to what is left, and steps with less than MIN_STEP_S left are skipped.
#
# Steps run in the order of the value of their evidence: tests of every CUDA path; model-level
# fp16 and bf16 against eager and torch.compile; per-layer and per-block sweeps; the ops; the
# rest of the test suite.
#
# Step limits (seconds) are cold-cache estimates for an H100/H200 machine with 16 cores (the
# device machine: nothing cached, nothing compiled), with about 30% margin:
#   build     80  nvcc for one arch: each .cu file takes ~35 s of CPU here (epilogue.cu, sm_90
#                 only: 34 s user on a loaded Xeon); the files compile in parallel
#                 (MAX_JOBS=nproc), so ~45 s plus the link
#   env       20  collect_env: imports, nvidia-smi, loading the built extension
#   cuda-tests 110 pytest -m cuda -n 8: ~220 Triton specializations (heuristic configs) at
#                 ~2 s each (the conv kernel compiles for sm_90 in 2.5-3 s on this Xeon)
#                 spread over 8 workers (~55 s); the autotuned tests (~25 configs in one
#                 worker, ~50 s) run beside them; cuDNN/cuBLAS start-up per worker; the CUDA
#                 graph tests (ResNet-18 at 64x64, one torch.compile of a 2-conv block, ~20 s)
#   models-fp16 110  resnet50 + googlenet at batch 256 against eager (NCHW, channels_last) and
#                 torch.compile (Inductor, freezing, dynamic=False), both fastcnn backends:
#                 ~14 + 13 Triton kernels with heuristic configs (counted with
#                 benchmarks/host_overhead.py --count) compiled 16-way first (--precompile,
#                 ~10 s); torch.compile of each model, ~25 s each cold; eager, cuDNN and
#                 timing ~20 s
#   models-bf16 100  the same in bf16
#   models-b1  90  the same at batch 1, fp16: latency, where host overhead shows; ~31 kernels
#   models-b1-graphs 60  batch 1 again, every provider replayed from a CUDA graph (kernels
#                 compiled by the step before: ~10 s of capture and warm-up, torch.compile's
#                 ~25 s a model again, its cache being per process)
#   conv      45  every distinct ResNet-50/GoogLeNet conv at batch 256 fp16, autotuned; the
#                 next 8 layers' configs (~70 kernels) precompiled 16-way at a time (~10 s),
#                 tuning ~2 s a layer; stops adding layers at 30 s
#   inception 40  9 Inception blocks at batch 128, fastcnn and torch.compile per block; stops
#                 at 25 s
#   ops       30  fastcnn-bench --op all, fp16, batch 1 and 256
#   tests     60  the rest of the suite (CPU backends, optimize, bench), -n 8
# Sum 745 s: more than the budget on purpose. The estimates are guesses until a GPU run times
# them (the summary records each step's seconds); the budget cuts the last steps when the
# early ones run long, and says so in the summary.
#
# Environment: OUT (where the device tool collects files), GPU_CHECK_BUDGET_S (whole-run
# budget), GPU_CHECK_STEPS (comma list: run only these steps), GPU_CHECK_LIMITS (comma list of
# step=seconds overrides, e.g. "conv=1"), GPU_CHECK_RESULTS (the results root, default
# benchmarks/results), GPU_CHECK_REHEARSE=1 (same as --rehearse).
# Nothing is pip-installed: the checkout is put on PYTHONPATH and the extension compiles just in
# time against the torch that is there.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=${GPU_CHECK_REHEARSE:-0}
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
MIN_STEP_S=10   # a step with less time left than this is skipped
RESERVE_S=5     # kept for the final summary and copies
start_s=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTCNN_COMMIT=${FASTCNN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

if [ "$REHEARSE" = 1 ]; then
  # CPU tensors through Triton's interpreter; the extension build is whatever the caller uses
  # (FASTCNN_BUILD_DIR or the default cache), so a rehearsal does not rebuild it.
  export TRITON_INTERPRET=1
  gpu=rehearsal-cpu
  DEV=cpu
else
  export FASTCNN_BUILD_DIR=${FASTCNN_BUILD_DIR:-/tmp/fastcnn-build}
  # Compile for this GPU only (saves minutes); the default list is for distributable builds.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
    echo "gpu_check: no CUDA GPU visible to torch (--rehearse runs the steps on a CPU)" >&2
    exit 1
  }
  DEV=cuda
fi
# run_name, not name: the step functions below have a local `name` that would shadow it
run_name="${gpu}-$(date -u +%Y-%m-%d)"
dir="${GPU_CHECK_RESULTS:-benchmarks/results}/$run_name"
mkdir -p "$dir"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  log="$OUT/gpu_check.log"  # streamed where the device tool collects it
else
  log="$dir/gpu_check.log"
fi
: >"$log"
status=0
steps=()  # one line per step: name, result, seconds

limit_for() {  # limit_for NAME DEFAULT: GPU_CHECK_LIMITS' override for NAME, else DEFAULT
  local pair
  local limits=${GPU_CHECK_LIMITS:-}
  for pair in ${limits//,/ }; do
    [ "${pair%%=*}" = "$1" ] && { echo "${pair#*=}"; return; }
  done
  echo "$2"
}

selected() {  # selected NAME: is NAME in GPU_CHECK_STEPS (or is that unset)?
  [ -z "${GPU_CHECK_STEPS:-}" ] && return 0
  [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]
}

publish() {  # the log, summary.md and results.tgz into $OUT, each replaced atomically
  local table
  {
    echo "# GPU check $run_name (commit ${FASTCNN_COMMIT:0:12}, $((SECONDS - start_s)) s of ${BUDGET_S} s)"
    echo
    echo '```'
    printf '%s\n' "${steps[@]}"
    echo '```'
    echo
    for table in "$dir"/*.md "$dir"/*/*.md; do
      case $table in */summary.md) continue ;; esac
      if [ -f "$table" ]; then cat "$table"; echo; fi
    done
  } >"$dir/.summary.md.tmp"
  mv "$dir/.summary.md.tmp" "$dir/summary.md"
  [ -n "${OUT:-}" ] || return 0
  cp "$log" "$dir/gpu_check.log"
  cp "$dir/summary.md" "$OUT/.summary.md.tmp" && mv "$OUT/.summary.md.tmp" "$OUT/summary.md"
  tar -czf "$OUT/.results.tgz.tmp" -C "$(dirname "$dir")" "$run_name" &&
    mv "$OUT/.results.tgz.tmp" "$OUT/results.tgz"
}

step() {  # step NAME LIMIT_S COMMAND...: run under its limit (cut to the budget), log, publish
  local name=$1 limit left begin rc result
  limit=$(limit_for "$1" "$2")
  shift 2
  selected "$name" || return 0
  left=$((BUDGET_S - (SECONDS - start_s) - RESERVE_S))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    steps+=("$(printf '%-16s %-28s %4s s' "$name" "skipped: budget spent" 0)")
    echo "=== $name: skipped, ${left} s of the budget left ===" | tee -a "$log"
    publish
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $* ===" | tee -a "$log"
  begin=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) result=ok ;;
    124 | 137) result="killed at its ${limit} s limit" ;;
    *) result="failed (rc=$rc)" ;;
  esac
  [ "$rc" = 0 ] || status=1
  steps+=("$(printf '%-16s %-28s %4d s' "$name" "$result" $((SECONDS - begin)))")
  echo "=== $name: $result after $((SECONDS - begin)) s ===" | tee -a "$log"
  publish
}

if [ "$REHEARSE" = 1 ]; then  # tiny sizes, the CPU's backends, interpreter tests
  # fp32 for every step: CPU fp16/bf16 convolutions are slow or absent (no oneDNN support)
  MODELS=resnet18 BATCH_MODELS=1 BATCH_B1=1 BATCH_OPS=1 SIZE=(--size 32) ITERS=1
  FP16=float32 BF16=float32
  CONV=(--device cpu --dtype float32 --batch 1 --iters 1 --limit 2 --models resnet50)
  INCEPTION=(--device cpu --dtype float32 --batch 1 --iters 1 --limit 1 --no-compile)
  PROVIDERS_MODELS=eager,eager-cl,fastcnn-cpu OPS_PROVIDERS=eager-cl,fastcnn-cpu
  TESTS_CUDA=(tests/ops/test_add_relu.py -k "cpu-triton and float32")
  TESTS_REST=(tests/test_bench.py -k bad_arguments)
  PARALLEL=()
  GRAPHS=()  # CUDA graphs need a GPU: the rehearsal times the plain calls
  BUILD=()  # a machine without nvcc may rehearse too
else
  GRAPHS=(--cuda-graphs)
  BUILD=(--require-cuda)  # a build without its CUDA sources would leave Triton alone to measure
  MODELS=resnet50,googlenet BATCH_MODELS=256 BATCH_B1=1 BATCH_OPS=1,256 SIZE=() ITERS=10
  FP16=float16 BF16=bfloat16
  CONV=(--max-seconds 30 --precompile 8)
  INCEPTION=(--max-seconds 25)
  PROVIDERS_MODELS=eager,eager-cl,fastcnn-triton,fastcnn-cuda,compile
  OPS_PROVIDERS=eager-cl,fastcnn-triton,fastcnn-cuda
  TESTS_CUDA=(-m cuda tests)
  TESTS_REST=(-m "not cuda" tests)
  # pytest-xdist (in the GPU image) spreads the tests over the cores; one GPU serves all.
  PARALLEL=()
  $PY -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
fi
# Models run fastcnn with its heuristic Triton configs (tuning ~70 GEMM shapes would take
# minutes); the conv sweep reports the tuned per-layer speeds.
models_step() {  # models_step NAME LIMIT DTYPE BATCHES [FASTCNN-BENCH-ARGS...]
  local name=$1 limit=$2 dtype=$3 batches=$4
  shift 4
  step "$name" "$limit" env FASTCNN_TRITON_AUTOTUNE=0 $PY -m fastcnn.bench --device $DEV \
    --model "$MODELS" --batch "$batches" --dtype "$dtype" --providers "$PROVIDERS_MODELS" \
    --iters "$ITERS" --precompile "${SIZE[@]}" "$@" --out "$dir/$name"
}

step build 80 $PY -m fastcnn.build "${BUILD[@]}"
step env 20 $PY -m fastcnn.collect_env
# Every CUDA path: the Triton kernels with their heuristic configs (two tests cover the tuned
# ones; the conv sweep checks each tuned output before timing it), the extension's paths.
tests_step() {  # tests_step NAME LIMIT VAR=VALUE PYTEST-ARGS...: outcomes go to $dir/NAME.md
  local name=$1 limit=$2 var=$3
  shift 3
  step "$name" "$limit" env "$var" FASTCNN_TEST_PROGRESS="$dir/$name.md" $PY -m pytest -q \
    -p no:cacheprovider -p benchmarks.pytest_progress -rfEs "${PARALLEL[@]}" "$@"
}
tests_step cuda-tests 110 FASTCNN_TRITON_AUTOTUNE=0 "${TESTS_CUDA[@]}"
models_step models-fp16 110 "$FP16" "$BATCH_MODELS"
models_step models-bf16 100 "$BF16" "$BATCH_MODELS"
models_step models-b1 90 "$FP16" "$BATCH_B1"
models_step models-b1-graphs 60 "$FP16" "$BATCH_B1" "${GRAPHS[@]}"
step conv 45 $PY benchmarks/bench_conv.py "${CONV[@]}" --out "$dir/conv.json"
step inception 40 $PY benchmarks/bench_inception.py "${INCEPTION[@]}" --out "$dir/inception.json"
step ops 30 env FASTCNN_TRITON_AUTOTUNE=0 $PY -m fastcnn.bench --device $DEV --op all \
  --batch "$BATCH_OPS" --dtype "$FP16" --providers "$OPS_PROVIDERS" --iters "$ITERS" \
  --out "$dir/ops"
tests_step tests 60 FASTCNN_TRITON_AUTOTUNE=0 "${TESTS_REST[@]}"

echo "=== gpu_check: $((SECONDS - start_s)) s, results in $dir ===" | tee -a "$log"
printf '%s\n' "${steps[@]}" | tee -a "$log"
publish
exit $status
