#!/usr/bin/env bash
# Everything issue 5 needs from one GPU machine, in one command:
# build the extension with CUDA, run the CUDA tests (and the whole suite when
# pycocotools is importable), then the operator and model benchmarks.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--baseline PATH/MultiScaleDeformableAttention*.so]
#                                        [--steps build,tests,bench_msda,bench_model]
#
# OUT_DIR receives up to 7 files: gpu.txt (device, commit, clocks and power
# before and after), build.log, tests.log, bench_msda.txt,
# bench_model.txt/.json and summary.txt (one line per step). Steps go on after
# a failure; the exit status is the first failing step's. --steps runs a
# subset, in the order above (e.g. `build,tests` in one call and
# `bench_msda,bench_model` in the next, when one call has a time limit; the
# build stays in place in between). TORCH_CUDA_ARCH_LIST defaults to the
# visible GPU's arch only (a faster build); set it to build for more.
set -uo pipefail

usage="usage: bash benchmarks/gpu_suite.sh OUT_DIR [--baseline PATH] [--steps build,tests,bench_msda,bench_model]"
out=${1:?$usage}
shift
baseline=()
steps=build,tests,bench_msda,bench_model
while [[ $# -gt 0 ]]; do
  case $1 in
    --baseline) baseline=(--baseline "${2:?--baseline needs a path}"); shift 2 ;;
    --steps) steps=${2:?--steps needs a list}; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for name in ${steps//,/ }; do
  case $name in
    build | tests | bench_msda | bench_model) ;;
    *) echo "unknown step '$name' in --steps (known: build, tests, bench_msda, bench_model)" >&2; exit 2 ;;
  esac
done
wanted() { [[ ",$steps," == *",$1,"* ]]; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
summary="$out/summary.txt"
: >"$summary"

step() {  # step NAME LOG COMMAND...: runs COMMAND, appends its output to LOG, records the result
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$summary"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
  return 0
}

gpu_state() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv 2>&1
}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "torch sees no GPU: nothing to do here" | tee -a "$summary"
  exit 1
fi
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "before:"
  gpu_state
} >"$out/gpu.txt"

if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
if wanted build; then
  step build "$out/build.log" env MAX_JOBS="${MAX_JOBS:-16}" "$python" setup.py build_ext --inplace
fi
step cuda-op-loaded "$out/build.log" "$python" -c \
  "import detr_cuda.ops.functional as f; b = f.available_backends('cuda'); print(b); assert 'cuda' in b, b"

if ! wanted tests; then
  :
elif "$python" -c "import pycocotools, scipy, yaml, tensorboard" 2>/dev/null; then
  step tests "$out/tests.log" "$python" -m pytest -q -rs tests
else
  echo "pycocotools/scipy/yaml/tensorboard missing: only the operator and model tests run" | tee -a "$summary"
  step tests "$out/tests.log" "$python" -m pytest -q -rs tests/ops/test_ms_deform_attn_cuda.py \
    tests/ops/test_ms_deform_attn_cpu.py tests/ops/test_ms_deform_attn_api.py tests/models/test_backends.py
fi

if wanted bench_msda; then
  step bench_msda "$out/bench_msda.txt" "$python" benchmarks/bench_msda.py --device cuda "${baseline[@]}"
fi
if wanted bench_model; then
  step bench_model "$out/bench_model.txt" "$python" benchmarks/bench_model.py --device cuda \
    --json "$out/bench_model.json"
fi

{
  echo "after:"
  gpu_state
} >>"$out/gpu.txt"
echo "exit status $status" | tee -a "$summary"
exit "$status"
