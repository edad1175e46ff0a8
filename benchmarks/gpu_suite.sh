#!/usr/bin/env bash
# The first real GPU run (issue 14) in one command: build, CUDA tests, operator and model
# benchmarks (with the original kernel beside ours), then the rest of the test suite.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--baseline PATH] [--baseline-wait SECONDS]
#                                        [--steps LIST] [--deadline SECONDS] [--dry-run]
#
# Steps, in this order (the most valuable numbers first); --steps runs a subset (comma list):
#   build        our extension for the visible GPU's arch only (TORCH_CUDA_ARCH_LIST, unless set),
#                MAX_JOBS = all cores; then a check that the cuda op loads
#   cuda_tests   the CUDA op tests and the tests with a cuda variant (fp64 gradcheck, fp32/fp16/bf16
#                against the reference, every grad_value strategy, determinism, the model on cuda)
#   bench_msda   benchmarks/bench_msda.py --device cuda: enc800 B=2 and B=8, dec300, dec900;
#                reference, original (--baseline), ours fp32/bf16/fp16 under each grad_value strategy
#   bench_model  benchmarks/bench_model.py --device cuda: R50, 2 images 800x1199 + 800x1333, fp32
#                and bf16 autocast, ours / original / reference in the same model; then host syncs
#                per step counted on the GPU (small preset), and emulated on the CPU for comparison
#   tests        the rest of the test suite (pytest-xdist workers when it is installed)
# Every step's output goes to OUT_DIR as it runs, so a timeout keeps what was done. Steps go on
# after a failure; the exit status is the first failing step's.
#
# OUT_DIR (8 files at most, what the device tool brings back): summary.txt (date, commit, torch,
# device, clocks and power before and after, one line per step), build.log, cuda_tests.log,
# bench_msda.txt, bench_model.txt, bench_model.json, tests.log. The eighth is the caller's: a
# baseline_build.log when the caller builds the original extension beside this script.
#
# --baseline PATH      an already built original Deformable DETR extension (a .so, or a folder
#                      holding one MultiScaleDeformableAttention*.so). This script never builds it.
# --baseline-wait S    the baseline may still be building (by the caller, in the background): the
#                      benchmark steps wait for it until S seconds after this script started.
# --deadline S         no step runs past S seconds after the start (each gets the time left,
#                      none starts with under 30 s left), so summary.txt is always written. Each
#                      step also has a cap (step_cap below, about twice its expected time on an
#                      H200), so that one hung step cannot take the later steps' time.
# GIT_COMMIT=SHA       (environment) the commit to record where the tree has no .git (the device
#                      machine gets a copy of the files only).
# --dry-run            on a machine without CUDA: every step's CPU path at tiny sizes (the build
#                      command's set-up, test collection, both benchmarks on the CPU with the same
#                      options otherwise), the same output files. tests/benchmarks/test_gpu_suite_dry_run.py
#                      runs it, so that a typo fails CI and not the GPU run.
set -uo pipefail

usage="usage: bash benchmarks/gpu_suite.sh OUT_DIR [--baseline PATH] [--baseline-wait SECONDS] [--steps LIST] [--deadline SECONDS] [--dry-run]"
ALL_STEPS=(build cuda_tests bench_msda bench_model tests)
# Tests that use the GPU (step cuda_tests); step tests runs every other file.
CUDA_TEST_FILES=(tests/ops/test_ms_deform_attn_cuda.py tests/ops/test_ms_deform_attn_api.py tests/models/test_backends.py)
# A tiny model and batch for --dry-run (the published one is minutes on a CPU).
TINY_MODEL=(model.backbone=resnet18 model.hidden_dim=64 model.nheads=4 model.enc_layers=1 model.dec_layers=2
            model.dim_feedforward=64 model.num_queries=12 model.enc_n_points=2 model.dec_n_points=2)

if [[ $# -lt 1 || $1 == -* ]]; then
  echo "$usage" >&2
  exit 2
fi
out=$1
shift
baseline=""
baseline_wait=0
deadline=0
dry_run=0
steps=$(IFS=,; echo "${ALL_STEPS[*]}")
while [[ $# -gt 0 ]]; do
  case $1 in
    --baseline) baseline=${2:?--baseline needs a path}; shift 2 ;;
    --baseline-wait) baseline_wait=${2:?--baseline-wait needs seconds}; shift 2 ;;
    --steps) steps=${2:?--steps needs a list}; shift 2 ;;
    --deadline) deadline=${2:?--deadline needs seconds}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for number in "$baseline_wait" "$deadline"; do
  if ! [[ $number =~ ^[0-9]+$ ]]; then
    echo "--baseline-wait and --deadline take whole seconds, got '$number'" >&2
    exit 2
  fi
done
for name in ${steps//,/ }; do
  if [[ " ${ALL_STEPS[*]} " != *" $name "* ]]; then
    echo "unknown step '$name' in --steps (known: ${ALL_STEPS[*]})" >&2
    exit 2
  fi
done
wanted() { [[ ",$steps," == *",$1,"* ]]; }

mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
started=$SECONDS
status=0
summary="$out/summary.txt"
: >"$summary"

note() { echo "$*" | tee -a "$summary"; }

time_left() {  # seconds before the deadline (a large number without one)
  if [[ $deadline -eq 0 ]]; then echo 999999; else echo $((deadline - (SECONDS - started))); fi
}

step_cap() {  # the most seconds a step may take (estimates for one H200, 16 cores, times about 2)
  case $1 in
    build) echo 480 ;;
    cuda_tests) echo 300 ;;
    bench_msda) echo 240 ;;
    bench_model) echo 300 ;;
    bench_model-syncs*) echo 120 ;;
    *) echo 999999 ;;
  esac
}

step() {  # step NAME LOG COMMAND...: runs COMMAND (within the deadline), appends its output to LOG
  local name=$1 log=$2
  shift 2
  local left cap
  left=$(time_left)
  if [[ $left -lt 30 ]]; then
    note "$name: skipped, ${left} s left before the deadline"
    [[ $status -eq 0 ]] && status=124
    return 0
  fi
  cap=$(step_cap "$name")
  [[ $cap -lt $left ]] && left=$cap
  local begin=$SECONDS
  echo "\$ $*" >>"$log"
  timeout --kill-after=10 "$left" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local why=""
  [[ $rc -eq 124 || $rc -eq 137 ]] && why=" (stopped after ${left} s: deadline or the step's cap)"
  note "$name: exit $rc$why, $((SECONDS - begin)) s"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
  return 0
}

gpu_state() {
  if [[ $dry_run -eq 1 ]]; then
    echo "(dry run: no GPU)"
  else
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,memory.used \
      --format=csv 2>&1
  fi
}

if [[ $dry_run -eq 0 ]] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "torch sees no GPU: nothing to do here (--dry-run checks this script on a CPU machine)"
  exit 1
fi
{
  echo "date: $(date -u +%FT%TZ)"
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
  else  # the device machine gets a copy of the tree without .git: the caller names the commit
    echo "commit: ${GIT_COMMIT:-unknown (no .git here: set GIT_COMMIT)}"
  fi
  echo "command: bash benchmarks/gpu_suite.sh $out --steps $steps${baseline:+ --baseline $baseline} --deadline $deadline$([[ $dry_run -eq 1 ]] && echo ' --dry-run')"
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  echo "cores: $(nproc)"
  [[ $dry_run -eq 0 ]] && echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
  "$python" -c "
import importlib.util
missing = [m for m in ('pycocotools', 'scipy', 'yaml', 'tensorboard', 'onnx', 'onnxruntime', 'matplotlib', 'xdist')
           if importlib.util.find_spec(m) is None]
print('python packages missing:', ', '.join(missing) or 'none')"
  echo "GPU before:"
  gpu_state
} 2>&1 | tee -a "$summary"

# ------------------------------------------------------------------ steps
# Each step's command line is the GPU run's; --dry-run runs the same line on the CPU with tiny
# sizes appended (a repeated option's last value wins), so that CI parses every GPU option.

if [[ $dry_run -eq 1 ]]; then
  device=cpu
  dry() { printf '%s\n' "$@"; }  # the dry run's extra arguments
else
  device=cuda
  dry() { :; }
  if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
fi
extra=()
with_dry() { mapfile -t extra < <(dry "$@"); }  # with_dry ARGS...: extra=(ARGS) in a dry run, else ()

if wanted build; then
  # Dry: setup.py's set-up and the command's options are checked, the compile is left to CI's build.
  with_dry --help
  step build "$out/build.log" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$python" setup.py build_ext --inplace \
    "${extra[@]}"
  step op-loaded "$out/build.log" "$python" -c \
    "import detr_cuda.ops.functional as f; b = f.available_backends('$device'); print(b); assert '$device' in b, b"
fi

if wanted cuda_tests; then
  # -s: the determinism test prints each grad_value strategy's run-to-run difference.
  with_dry --collect-only
  step cuda_tests "$out/cuda_tests.log" "$python" -m pytest -q -s -rs -p no:cacheprovider "${CUDA_TEST_FILES[@]}" \
    "${extra[@]}"
fi

# The baseline for the benchmark steps: a .so, or the one in a folder; waited for if asked.
baseline_args=()
resolve_baseline() {
  [[ -z $baseline || ${#baseline_args[@]} -gt 0 ]] && return 0
  local found=""
  while :; do
    if [[ -f $baseline ]]; then
      found=$baseline
    elif [[ -d $baseline ]]; then
      found=$(ls "$baseline"/MultiScaleDeformableAttention*.so 2>/dev/null | head -n 1)
    fi
    [[ -n $found || $((SECONDS - started)) -ge $baseline_wait ]] && break
    sleep 5
  done
  if [[ -n $found ]]; then
    baseline_args=(--baseline "$found")
    note "baseline: $found"
  else
    note "baseline: nothing at $baseline after ${baseline_wait} s: no 'original' rows (exit status 3 at the end)"
    baseline=""
    [[ $status -eq 0 ]] && status=3
  fi
}
# Dry runs name the original among the backends (on a CPU it runs only when named: a stand-in).
dry_backends() { echo --backends "$@"; [[ ${#baseline_args[@]} -gt 0 ]] && echo original; }

if wanted bench_msda; then
  resolve_baseline
  # Dry: no peak-memory column (the CPU measures it in subprocesses, a GPU in-process).
  with_dry --shapes tiny --dtypes float32 --reps 1 --warmup 0 --no-memory $(dry_backends cpu reference)
  step bench_msda "$out/bench_msda.txt" "$python" benchmarks/bench_msda.py --device "$device" \
    --shapes enc800 enc800b8 dec300 dec900 --dtypes float32 bfloat16 float16 "${baseline_args[@]}" "${extra[@]}"
fi

if wanted bench_model; then
  resolve_baseline
  # Dry: one of our backends (they differ only in a name) beside the original, a tiny model.
  with_dry $(dry_backends reference) --set "${TINY_MODEL[@]}" --sizes 64x64 48x96 --iterations 1 --warmup 0 \
    --threads 1
  step bench_model "$out/bench_model.txt" "$python" benchmarks/bench_model.py --device "$device" --preset published \
    --amp none bf16 --iterations 10 --warmup 3 "${baseline_args[@]}" --json "$out/bench_model.json" "${extra[@]}"
  # Host syncs counted on the GPU (real devices), then the CPU's emulated count of the same model.
  with_dry --set "${TINY_MODEL[@]}" --sizes 64x64 48x96 --variants deformable --threads 1
  step bench_model-syncs "$out/bench_model.txt" "$python" benchmarks/bench_model.py --mode syncs \
    --device "$device" --preset small --variants deformable two_stage dn "${extra[@]}"
  if [[ $dry_run -eq 0 ]]; then
    step bench_model-syncs-emulated "$out/bench_model.txt" "$python" benchmarks/bench_model.py --mode syncs \
      --device cpu --preset small --variants deformable
  fi
fi

if wanted tests; then
  ignore=()
  for file in "${CUDA_TEST_FILES[@]}"; do ignore+=(--ignore="$file"); done
  parallel=()
  if "$python" -c "import xdist" 2>/dev/null; then  # pytest-xdist: half the cores, 2 threads each
    workers=$(( $(nproc) / 2 ))
    [[ $workers -gt 8 ]] && workers=8
    [[ $workers -lt 1 ]] && workers=1
    parallel=(-n "$workers")
  fi
  with_dry --collect-only
  step tests "$out/tests.log" env OMP_NUM_THREADS=2 "$python" -m pytest -q -rs -p no:cacheprovider \
    "${parallel[@]}" tests "${ignore[@]}" "${extra[@]}"
fi

{
  echo "GPU after:"
  gpu_state
} 2>&1 | tee -a "$summary"
note "total: $((SECONDS - started)) s, exit status $status"
exit "$status"
