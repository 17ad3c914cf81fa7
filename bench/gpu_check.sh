#!/usr/bin/env bash
# The one script a lent GPU machine runs: build ops._C with CUDA, run every CUDA test and the
# CUDA benchmarks, and write the results into the directory given as the argument.
#
#   bash bench/gpu_check.sh RESULTS_DIR
#
# Made for the device machine's own python3 (3.12) and torch (2.11, CUDA 13) with no installs:
# pytest, pytest-benchmark, pytest-timeout, ninja and pybind11 are already there. It budgets
# about 5 minutes with the build, so a rerun fits a 15-minute lease.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh RESULTS_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
summary="$out/gpu_check.md"
status=0

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
exec > >(tee "$out/gpu_check.log") 2>&1

{
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || status=1
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || status=1

  step "build (DSV3_CUDA=1)"
  # Hopper (sm_90a) and sm_80 code, as setup.py sets; the in-place .so replaces any CPU-only one.
  if ! DSV3_CUDA=1 MAX_JOBS=16 timeout 240 $py setup.py build_ext --inplace -q > "$out/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -40 "$out/build.log"; status=1
  fi
  $py -c "import ops; assert ops.built_with_cuda(); print('ops._C with CUDA kernels, CPU path', ops.cpu_isa())" || status=1

  step "CUDA tests (-m cuda)"
  timeout 150 $py -m pytest tests -m cuda -q -p no:cacheprovider -x --timeout=120 \
    --junitxml="$out/cuda_tests.xml" || status=1

  step "CUDA benchmarks (-m cuda)"
  timeout 120 $py -m pytest bench -m cuda -q -p no:cacheprovider --benchmark-only \
    --benchmark-max-time=0.5 --benchmark-json="$out/cuda_bench.json" --ratios-json="$out/cuda_ratios.json" || status=1
}

{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo '```'
  grep -E "passed|failed|error|BUILD FAILED|ratio" "$out/gpu_check.log" | tail -60
  echo '```'
} > "$summary"
echo "results in $out (summary: $summary)"
exit $status
