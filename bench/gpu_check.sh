#!/usr/bin/env bash
# The one script a lent GPU machine runs: build ops._C with CUDA, run EVERY CUDA test
# (`pytest tests -m cuda`) and EVERY CUDA benchmark (`pytest bench -m cuda`: casts, GEMMs against
# torch._scaled_mm and BF16 matmul, the GPU's matmul and copy ceilings, the 1B-class MFU preset
# launch/configs/bench_gpu.toml), render the benchmark report, run the CPU GEMM tests on the
# AVX-512 kernels where the host CPU has AVX-512, and again on the AMX-BF16 kernels where it has
# AMX (neither yet verified elsewhere: this is where they first run), run compute-sanitizer over
# the Hopper GEMM kernels, and write one summary file.
#
#   bash bench/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR defaults to bench/results/gpu-<gpu name>-<date>/. The results file to read and commit
# is OUT_DIR/gpu_check.md (machine, build, test and benchmark outcome, ratio table); beside it:
# report.md + PNGs (python -m bench.report), cuda_bench.json, cuda_tests.xml, cuda_bench.xml,
# cpu_avx512_tests.xml (when the host has AVX-512), cpu_amx_tests.xml (when it has AMX),
# gpu_check.log, build.log.
#
# Made for the device machine's own python3 (3.12) and torch (2.11, CUDA 13) with no installs:
# pytest, pytest-benchmark, pytest-timeout, ninja and pybind11 are there (matplotlib may not be:
# the report then has tables only). Budget: about 6 minutes with the build; each step has a hard
# cap (build 240 s, import 60 s, tests 270 s: the module of FP8 GEMM tests runs again in a child
# process for each Hopper kernel, wgmma and tma, 110 s each; benchmarks 180 s, report 120 s, the
# host CPU's AVX-512 tests 60 s and AMX tests 60 s, then compute-sanitizer over one small call of
# each GEMM op: memcheck on wgmma and tma, racecheck on tma, 90 s each). A normal run fits a
# rerun in a 15-minute lease; give the device call a 600 s timeout (its limit): if the caps add
# up past it, what the script wrote so far (log, junit files) still comes back.
#
# --dry-run skips what needs a GPU (nvidia-smi, the CUDA build, the ops._C CUDA check) and runs
# everything else as is, on the machine's existing build: the CUDA tests and benchmarks are
# collected and skipped, the CPU ceilings are measured so that the report renders, the summary
# is written. It checks the script itself on a CPU machine.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
  gpu="dry-run"
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  gpu=${gpu:-unknown-gpu}
fi
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
out=${1:-bench/results/gpu-$slug-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
summary="$out/gpu_check.md"
status=0
declare -A outcome

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
# run NAME CAP_SECONDS CMD...: runs a step under a hard time cap and records its exit status
run() {
  local name=$1 cap=$2; shift 2
  timeout "$cap" "$@"
  local rc=$?
  outcome[$name]=$rc
  if [ "$rc" -eq 124 ]; then echo "!!! $name: stopped after its ${cap}s cap"; fi
  if [ "$rc" -ne 0 ]; then status=1; fi
  return 0
}
exec > >(tee "$out/gpu_check.log") 2>&1
t0=$(date +%s)

step "machine"
if [ "$dry" = 1 ]; then
  echo "dry run: no GPU steps"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || status=1
fi
$py -c "import setuptools, torch, sys; print('python', sys.version.split()[0], 'setuptools', setuptools.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || status=1

if [ "$dry" = 0 ]; then
  step "build (DSV3_CUDA=1: sm_90a and sm_80 kernels, in place)"
  run build 240 env DSV3_CUDA=1 MAX_JOBS=16 $py setup.py build_ext --inplace -q > "$out/build.log" 2>&1
  if [ "${outcome[build]}" -ne 0 ]; then echo "BUILD FAILED"; tail -40 "$out/build.log"; fi
  run import 60 $py -c "import ops; assert ops.built_with_cuda(), 'ops._C has no CUDA kernels'; print('ops._C with CUDA kernels; CPU path', ops.cpu_isa())"
fi

step "CUDA tests: pytest tests -m cuda (all of them, no -x)"
run tests 270 $py -m pytest tests -m cuda -q -p no:cacheprovider -rs --timeout=120 --junitxml="$out/cuda_tests.xml"

step "CUDA benchmarks: pytest bench -m cuda"
# a dry run adds the CPU ceilings (seconds), so that the report step below runs too
sel=(bench -m cuda)
[ "$dry" = 1 ] && sel=(bench -m "cuda or quick" -k "cuda or (bench_ceilings and not all_to_all)" --quick)
run bench 180 $py -m pytest "${sel[@]}" -q -p no:cacheprovider -rs --timeout=150 --benchmark-only \
  --benchmark-max-time=0.5 --benchmark-json="$out/cuda_bench.json" --ratios-json="$out/cuda_ratios.json" \
  --junitxml="$out/cuda_bench.xml"

step "report"
if [ -s "$out/cuda_bench.json" ] && $py -c "import json,sys; sys.exit(0 if json.load(open('$out/cuda_bench.json'))['benchmarks'] else 1)"; then
  # --timelines "$out": the repository's PNG timelines are CPU runs, not this GPU's
  run report 120 $py -m bench.report "$out/cuda_bench.json" --junit "$out/cuda_bench.xml" --out "$out" --timelines "$out"
else
  echo "no benchmark ran: no report"
fi

step "host CPU: the AVX-512 and AMX GEMM kernels (opt-in until verified on such a CPU)"
# ops.cpu_isa() stops at AVX2 by default (kHighestVerifiedIsa, csrc/common/cpu_features.cpp): the
# AVX-512 kernels were written on an AVX2-only machine. Where this host has AVX-512, the CPU GEMM
# tests run with DSV3_CPU_ISA=avx512 (every GEMM then uses them, also after a test restores "auto");
# where it has AMX, the same tests run again with DSV3_CPU_ISA=amx (the packed GEMMs, M > 16, then
# run on AMX-BF16 tiles; GEMVs and pre-packed weights stay on AVX-512).
cpu_model=$(lscpu 2>/dev/null | sed -nE 's/^Model name:[[:space:]]*//p' | head -1)
cpu_flags=$(lscpu 2>/dev/null | sed -nE 's/^Flags:[[:space:]]*//p' | tr ' ' '\n' | grep -E '^(avx512|amx)' | tr '\n' ' ')
cpu_isa=$(timeout 30 $py -c "import ops; print(ops.detected_cpu_isa())" 2>/dev/null | tail -1)
echo "CPU: ${cpu_model:-unknown}"
echo "AVX-512/AMX flags: ${cpu_flags:-none}"
echo "ops.detected_cpu_isa(): ${cpu_isa:-unknown}"
cpu_tests=(tests/ops -k "(gemm or cpu_isa) and not emulated" -m "not slow and not cuda" -q -p no:cacheprovider -rs
  --timeout=50)
case "$cpu_isa" in
  avx512 | amx)
    run cpu_avx512 60 env DSV3_CPU_ISA=avx512 $py -m pytest "${cpu_tests[@]}" --junitxml="$out/cpu_avx512_tests.xml"
    ;;
  *)
    cpu_avx512_note="skipped: ops.detected_cpu_isa() is '${cpu_isa:-unknown}', not avx512 or amx (no AVX-512 on this CPU)"
    echo "$cpu_avx512_note"
    ;;
esac
if [ "$cpu_isa" = amx ]; then
  run cpu_amx 60 env DSV3_CPU_ISA=amx $py -m pytest "${cpu_tests[@]}" --junitxml="$out/cpu_amx_tests.xml"
else
  cpu_amx_note="skipped: ops.detected_cpu_isa() is '${cpu_isa:-unknown}', not amx (no AMX, or the OS refused it)"
  echo "$cpu_amx_note"
fi

step "compute-sanitizer on the Hopper kernels (memcheck: wgmma, tma; racecheck: tma)"
# Last, so that it cannot crowd out the steps above: one small call of each GEMM op per run.
if [ "$dry" = 1 ]; then
  echo "dry run: no sanitizer"
elif command -v compute-sanitizer > /dev/null; then
  # Only within the device call's 600 s, so that the summary below is still written. memcheck
  # ignores CUDA API error codes (torch's probes return some; ours raise through C10_CUDA_CHECK).
  # A racecheck hazard on TMA/mbarrier/wgmma traffic may be a false report: read its log.
  deadline=$((t0 + 540))
  for check in memcheck:wgmma memcheck:tma racecheck:tma; do
    tool=${check%%:*} kernel=${check##*:}
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 40 ]; then echo "[sanitize $tool $kernel] skipped: out of time"; continue; fi
    api=(); [ "$tool" = memcheck ] && api=(--report-api-errors no)
    echo "[sanitize $tool $kernel]"
    run "sanitize_${tool}_${kernel}" $((left < 90 ? left : 90)) env DSV3_FP8_GEMM_KERNEL="$kernel" \
      compute-sanitizer --tool "$tool" "${api[@]}" --error-exitcode 3 --target-processes all $py -m bench.gpu_sanitize
  done
else
  echo "compute-sanitizer not found: skipped"
fi

# the one results file: outcome of every step, the tests' and benchmarks' summaries, the ratios
tally() {  # tests / failures / errors / skipped of a junit file
  [ -s "$1" ] && $py - "$1" <<'PY' || echo "no result file"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests']} collected, {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, "
      f"{n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
PY
}
{
  echo "# GPU check, $(date -u +%Y-%m-%d) $([ "$dry" = 1 ] && echo '(DRY RUN: no GPU steps)')"
  echo
  echo "GPU: $gpu; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)'); $(( $(date +%s) - t0 )) s in all."
  echo
  echo "| step | exit status |"
  echo "|---|---|"
  for k in build import tests bench report cpu_avx512 cpu_amx sanitize_memcheck_wgmma sanitize_memcheck_tma \
    sanitize_racecheck_tma; do
    [ -n "${outcome[$k]+x}" ] && echo "| $k | ${outcome[$k]}$([ "${outcome[$k]}" = 124 ] && echo ' (time cap)') |"
  done
  echo
  echo "CUDA tests: $(tally "$out/cuda_tests.xml")"
  echo
  echo "CUDA benchmarks: $(tally "$out/cuda_bench.xml")"
  echo
  echo "Host CPU: ${cpu_model:-unknown}; AVX-512/AMX flags: ${cpu_flags:-none}; ops.detected_cpu_isa(): ${cpu_isa:-unknown}"
  echo
  if [ -n "${outcome[cpu_avx512]+x}" ]; then
    echo "CPU GEMM tests on the AVX-512 kernels (DSV3_CPU_ISA=avx512): $(tally "$out/cpu_avx512_tests.xml")"
  else
    echo "CPU GEMM tests on the AVX-512 kernels: $cpu_avx512_note"
  fi
  echo
  if [ -n "${outcome[cpu_amx]+x}" ]; then
    echo "CPU GEMM tests on the AMX-BF16 kernels (DSV3_CPU_ISA=amx): $(tally "$out/cpu_amx_tests.xml")"
  else
    echo "CPU GEMM tests on the AMX-BF16 kernels: $cpu_amx_note"
  fi
  echo
  [ -s "$out/report.md" ] && echo "Benchmark report: [report.md](report.md)" && echo
  echo '```'
  grep -E "^(FAILED|ERROR|SKIPPED)|BUILD FAILED|time cap|passed|failed|^\[|^  (ours|peer|ceiling) |MFU |ERROR SUMMARY|RACECHECK SUMMARY|^launches:" \
    "$out/gpu_check.log" | tail -80
  echo '```'
} > "$summary"
echo "results: $summary"
exit $status
