#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with torch, triton and nvcc already installed and
# no network. It builds the extension, runs the whole test suite on CUDA, benchmarks the ops and
# writes everything to benchmarks/results/<gpu>-<date>/ (and to $OUT when set). Each step has a
# time limit; together they stay under 10 minutes (570 s), typically about 6-7.
#
#   FASTCNN_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
#
# Nothing is pip-installed: the checkout is put on PYTHONPATH and the extension compiles just in
# time against the torch that is there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTCNN_BUILD_DIR=${FASTCNN_BUILD_DIR:-/tmp/fastcnn-build}
export FASTCNN_COMMIT=${FASTCNN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# Compile for this GPU only (saves minutes); the default list is for distributable builds.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "gpu_check: no CUDA GPU visible to torch" >&2
  exit 1
}
dir="benchmarks/results/${gpu}-$(date -u +%Y-%m-%d)"
mkdir -p "$dir"
status=0
summary=()

log="$dir/gpu_check.log"  # one log for all steps (the device tool returns at most 8 files)
: >"$log"
step() {  # step NAME TIMEOUT_S COMMAND...: run, append to the log, record time and result
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name ===" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-10s %-6s %4d s' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - start)))")
  [ "$rc" = 0 ] || status=1
}

step build 100 $PY -m fastcnn.build
step env 20 $PY -m fastcnn.collect_env
# Autotuning every test shape would cost minutes; the tests check the heuristic configs, one
# test and the conv benchmark (which checks each output before timing it) the tuned ones.
# pytest-xdist (in the GPU image) spreads the suite over the machine's cores; one GPU serves all.
parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || true)
step tests 150 env FASTCNN_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider $parallel tests
# Ops and whole models through fastcnn-bench at batch 1, 32 and 256, fp16 and bf16: both CUDA
# backends (Triton, the extension) against eager channels_last (ops) and eager NCHW and
# channels_last (models). The heuristic Triton configs keep it inside the budget;
# bench_conv.py reports the autotuned per-layer speeds.
for dt in float16 bfloat16; do
  step "ops-$dt" 35 env FASTCNN_TRITON_AUTOTUNE=0 $PY -m fastcnn.bench --device cuda \
    --op all --batch 1,32,256 --dtype "$dt" --providers eager-cl,fastcnn-triton,fastcnn-cuda \
    --iters 20 --out "$dir/ops-$dt"
done
step conv 45 $PY benchmarks/bench_conv.py --max-seconds 30 --out "$dir/conv.json"
for dt in float16 bfloat16; do
  step "models-$dt" 70 env FASTCNN_TRITON_AUTOTUNE=0 $PY -m fastcnn.bench --device cuda \
    --model resnet50,googlenet --batch 1,32,256 --dtype "$dt" \
    --providers eager,eager-cl,fastcnn-triton,fastcnn-cuda --iters 10 --out "$dir/models-$dt"
done
step inception 45 $PY benchmarks/bench_inception.py --max-seconds 30 --out "$dir/inception.json"

echo
echo "=== gpu_check summary ($dir, commit ${FASTCNN_COMMIT:0:12}) ===" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
# One summary.md of every table (the device tool returns at most 8 files: the log, the JSON
# files and this summary).
for table in "$dir"/ops-*/results.md "$dir"/{conv,inception}.md "$dir"/models-*/results.md; do
  [ -f "$table" ] && { cat "$table"; echo; }
done >"$dir/summary.md"
cat "$dir/summary.md"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$(basename "$dir")"
  cp "$log" "$dir/summary.md" "$dir"/*.json "$OUT/$(basename "$dir")/"
  for sub in "$dir"/ops-* "$dir"/models-*; do
    [ -d "$sub" ] && mkdir -p "$OUT/$(basename "$dir")/$(basename "$sub")" &&
      cp "$sub/results.json" "$OUT/$(basename "$dir")/$(basename "$sub")/"
  done
fi
exit $status
