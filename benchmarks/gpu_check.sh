#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with torch, triton and nvcc already installed and
# no network. It builds the extension, runs the whole test suite on CUDA, benchmarks the ops and
# writes everything to benchmarks/results/<gpu>-<date>/ (and to $OUT when set). Under 8 minutes.
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

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $dir/NAME.log, record time and result
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name ==="
  timeout "$limit" "$@" 2>&1 | tee "$dir/$name.log"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-10s %-6s %4d s' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - start)))")
  [ "$rc" = 0 ] || status=1
}

step env 120 $PY -m fastcnn.collect_env
step build 240 $PY -m fastcnn.build
step tests 240 $PY -m pytest -q -p no:cacheprovider tests
step add_relu 120 $PY benchmarks/bench_add_relu.py --out "$dir/add_relu.json"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$(basename "$dir")" && cp "$dir"/* "$OUT/$(basename "$dir")/"
fi
echo
echo "=== gpu_check summary ($dir, commit ${FASTCNN_COMMIT:0:12}) ==="
printf '%s\n' "${summary[@]}"
[ -f "$dir/add_relu.md" ] && tail -n +5 "$dir/add_relu.md"
exit $status
