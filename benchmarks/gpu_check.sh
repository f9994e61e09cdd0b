#!/usr/bin/env bash
# GPU check (issue 3): build ncutfast._C with its CUDA kernels on the GPU machine, run the GPU tests and the
# GPU benchmarks, and write logs plus $OUT/summary.md (card, per-step status, test counts, benchmark tables).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # from the repository root; OUT defaults to ./gpu_check_out
#   (PYTHON: the interpreter, default `python`; GPU_CHECK_DEADLINE_S: seconds for all steps, default 450)
#
# The machine it is written for: Python 3.12, torch 2.11 (cu130), triton 3.6, cupy-cuda13x, nvcc 13.0, no
# network (hence --no-build-isolation --no-deps), no pycocotools. The whole script stays under 8 minutes: every
# step runs under `timeout`, capped by what is left of an overall deadline. A failed step does not stop the
# script; the exit status is non-zero if any step failed. At most 8 files are left under $OUT:
# summary.md, nvidia_smi.txt, build.log, pytest.log, bench_triton.csv, bench_triton.log, bench_harness.log,
# bench_harness.md.
set -u

OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-python}"
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-450}"  # seconds for all steps: margin under 8 minutes for the summary
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
FAILED=0
FAILED_LOGS=""          # logs of the failed steps, for the summary
STEPS=""                # markdown rows: | step | status | seconds |

# run_step NAME CAP_SECONDS LOGFILE CMD...: run CMD under timeout (CAP or what is left of the deadline).
run_step() {
  local name="$1" cap="$2" log="$3"
  shift 3
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    echo "$name: not run, the overall deadline is reached" >> "$log"
    STEPS+="| $name | not run (deadline) | 0 |"$'\n'
    FAILED=1
    return 1
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc != 0 )); then
    FAILED_LOGS+="$log"$'\n'
  fi
  if (( rc == 0 )); then
    STEPS+="| $name | ok | $dt |"$'\n'
  elif (( rc == 124 || rc == 137 )); then
    STEPS+="| $name | timed out after ${limit} s | $dt |"$'\n'
    FAILED=1
  else
    STEPS+="| $name | failed (exit $rc) | $dt |"$'\n'
    FAILED=1
  fi
  return "$rc"
}

# 1. The card.
run_step "nvidia-smi" 20 "$OUT/nvidia_smi.txt" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
CARD="$(sed -n 2p "$OUT/nvidia_smi.txt" 2>/dev/null | cut -d, -f1)"
CARD="${CARD:-unknown}"

# 2. Build (nvcc compiles csrc/cuda for sm_80 and sm_90 + PTX; a CUDA compile error fails this step).
run_step "build" 180 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
run_step "extension has CUDA and sees the GPU" 60 "$OUT/build.log" "$PY" -c "
from ncutfast import _ext
print('HAS_CPU_EXT', _ext.HAS_CPU_EXT, 'HAS_CUDA_EXT', _ext.HAS_CUDA_EXT, 'cuda_device_count', _ext.C.cuda_device_count())
assert _ext.HAS_CUDA_EXT and _ext.cuda_device_available(), 'ncutfast._C has no usable CUDA kernels'
"

# 3. GPU tests (NCUTFAST_REQUIRE_EXT: a missing extension fails instead of skipping). The interpreter smoke run
#    of bench_triton is left out: step 4 runs the real benchmark.
run_step "pytest (GPU tests)" 180 "$OUT/pytest.log" env NCUTFAST_REQUIRE_EXT=1 "$PY" -m pytest -q -rfEs \
  -p no:cacheprovider -k "not test_benchmark_dry_run" tests/test_cuda_ext.py tests/test_gpu.py tests/test_triton_affinity.py \
  tests/test_triton_lanczos.py tests/test_triton_compile.py tests/test_solver.py tests/test_api.py
TEST_LINE="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$OUT/pytest.log" | tail -n 1 | sed 's/=//g')"
TEST_LINE="${TEST_LINE:-no pytest summary line (see pytest.log)}"

# 4. GPU benchmarks.
run_step "bench_triton" 150 "$OUT/bench_triton.log" "$PY" benchmarks/bench_triton.py --sweep --csv "$OUT/bench_triton.csv"
HARNESS_TMP="$(mktemp -d)"
if "$PY" -c "import ncutfast.bench.cli" >/dev/null 2>&1; then
  run_step "ncutfast.bench --device cuda --quick" 90 "$OUT/bench_harness.log" \
    "$PY" -m ncutfast.bench --device cuda --quick --no-plots --out "$HARNESS_TMP"
  find "$HARNESS_TMP" -name '*.md' -exec cat {} + > "$OUT/bench_harness.md" 2>/dev/null
  [ -s "$OUT/bench_harness.md" ] || rm -f "$OUT/bench_harness.md"
else
  echo "ncutfast.bench is not importable: harness step skipped" > "$OUT/bench_harness.log"
  STEPS+="| ncutfast.bench --device cuda --quick | skipped (harness not present) | 0 |"$'\n'
fi
rm -rf "$HARNESS_TMP"

# 5. Summary.
{
  echo "# ncutfast GPU check"
  echo
  echo "- card: **$CARD** ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s in all)"
  echo "- python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1)"
  echo "- tests: $TEST_LINE"
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | --- |"
  printf '%s' "$STEPS"
  echo
  echo "## bench_triton"
  echo
  grep -E '^\||^N=|^bench_triton' "$OUT/bench_triton.log" 2>/dev/null || echo "(no output)"
  echo
  echo "## ncutfast.bench --device cuda --quick"
  echo
  if [ -s "$OUT/bench_harness.md" ]; then cat "$OUT/bench_harness.md"; else tail -n 40 "$OUT/bench_harness.log"; fi
  printf '%s' "$FAILED_LOGS" | sort -u | while read -r log; do
    [ -n "$log" ] || continue
    echo
    echo "## failed step: last lines of $(basename "$log")"
    echo
    echo '```'
    tail -n 30 "$log" 2>/dev/null
    echo '```'
  done
} > "$OUT/summary.md"

echo "gpu_check: $( (( FAILED )) && echo 'FAILED' || echo 'ok' ); summary in $OUT/summary.md"
exit "$FAILED"
