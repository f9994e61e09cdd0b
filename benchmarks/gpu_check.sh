#!/usr/bin/env bash
# GPU check (issue 3): build ncutfast._C with its CUDA kernels on the GPU machine, run the GPU benchmarks, the
# static model of benchmarks/gpu_model.py beside them, and the GPU tests; write logs plus $OUT/summary.md
# (card, per-step status, test counts, benchmark tables, measured vs predicted).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # from the repository root; OUT defaults to ./gpu_check_out
#   (PYTHON: the interpreter, default the first of python3, python; GPU_CHECK_DEADLINE_S: seconds for all
#   steps, default 450)
#
# The machine it is written for: Python 3.12 as `python3`, torch 2.11 (cu130), triton 3.6, cupy-cuda13x,
# nvcc 13.0, no network (hence --no-build-isolation --no-deps), no pycocotools. The whole script stays under
# 8 minutes: every step runs under `timeout`, capped by what is left of an overall deadline; the model's
# compilation (CPU only) runs in the background from the start. Every step's output is printed as it comes
# and appended to its log, and the benchmark writes each row to its CSV as soon as it is measured, so a
# timeout keeps the rows before it. A failed step does not stop the script; the exit status is non-zero if
# any step failed. Left under $OUT: summary.md, nvidia_smi.txt, build.log, pytest.log, bench_triton.csv,
# bench_triton.log, bench_harness.log, bench_harness.md, and model/ (gpu_model.log, gpu_model.md,
# gpu_model.csv, gpu_model_solve.csv, gpu_model_compare.md).
set -u

OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 or python on PATH (set PYTHON)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1  # rows reach the terminal and the logs as they are printed
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
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
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
CARD="$(grep -v '^==\|^name' "$OUT/nvidia_smi.txt" 2>/dev/null | head -n 1 | cut -d, -f1)"
CARD="${CARD:-unknown}"

# The static model needs no GPU: compile its kernels (CPU) in the background while the rest runs; the
# comparison in step 4 then finds them in Triton's cache.
mkdir -p "$OUT/model"
# (PYTHONPATH: the model imports only ncutfast's Triton kernels, not the extension that step 2 is building.)
( env -u TRITON_INTERPRET PYTHONPATH="$PWD" timeout --kill-after=10 240 "$PY" benchmarks/gpu_model.py --out "$OUT/model" \
    > "$OUT/model/gpu_model.log" 2>&1 ) &
MODEL_PID=$!

# 2. Build (nvcc compiles csrc/cuda for sm_80 and sm_90 + PTX; a CUDA compile error fails this step).
run_step "build" 180 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
run_step "extension has CUDA and sees the GPU" 60 "$OUT/build.log" "$PY" -c "
from ncutfast import _ext
print('HAS_CPU_EXT', _ext.HAS_CPU_EXT, 'HAS_CUDA_EXT', _ext.HAS_CUDA_EXT, 'cuda_device_count', _ext.C.cuda_device_count())
assert _ext.HAS_CUDA_EXT and _ext.cuda_device_available(), 'ncutfast._C has no usable CUDA kernels'
"

# 3. GPU benchmarks (each row printed and written to the CSV once measured).
run_step "bench_triton" 150 "$OUT/bench_triton.log" "$PY" benchmarks/bench_triton.py --sweep --csv "$OUT/bench_triton.csv"

# 4. Measured vs predicted: the model's lower bound beside each benchmark row (calibrates the model).
wait "$MODEL_PID"
MODEL_RC=$?
if (( MODEL_RC == 0 )); then
  STEPS+="| gpu_model.py (background) | ok | - |"$'\n'
else
  STEPS+="| gpu_model.py (background) | failed (exit $MODEL_RC) | - |"$'\n'
  FAILED=1
  FAILED_LOGS+="$OUT/model/gpu_model.log"$'\n'
fi
if [ -s "$OUT/bench_triton.csv" ]; then
  run_step "gpu_model.py --compare" 90 "$OUT/model/gpu_model.log" env -u TRITON_INTERPRET PYTHONPATH="$PWD" \
    "$PY" benchmarks/gpu_model.py \
    --compare "$OUT/bench_triton.csv" --out "$OUT/model"
else
  STEPS+="| gpu_model.py --compare | skipped (no benchmark rows) | 0 |"$'\n'
fi

# 5. GPU tests (NCUTFAST_REQUIRE_EXT: a missing extension fails instead of skipping). The interpreter smoke run
#    of bench_triton is left out: step 3 runs the real benchmark.
run_step "pytest (GPU tests)" 150 "$OUT/pytest.log" env NCUTFAST_REQUIRE_EXT=1 "$PY" -m pytest -q -rfEs \
  -p no:cacheprovider -k "not test_benchmark_dry_run" tests/test_cuda_ext.py tests/test_gpu.py tests/test_triton_affinity.py \
  tests/test_triton_lanczos.py tests/test_triton_compile.py tests/test_solver.py tests/test_api.py
TEST_LINE="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$OUT/pytest.log" | tail -n 1 | sed 's/=//g')"
TEST_LINE="${TEST_LINE:-no pytest summary line (see pytest.log)}"

# 6. The benchmark harness.
HARNESS_TMP="$(mktemp -d)"
if "$PY" -c "import ncutfast.bench.cli" >/dev/null 2>&1; then
  run_step "ncutfast.bench --device cuda --quick" 60 "$OUT/bench_harness.log" \
    "$PY" -m ncutfast.bench --device cuda --quick --no-plots --out "$HARNESS_TMP"
  find "$HARNESS_TMP" -name '*.md' -exec cat {} + > "$OUT/bench_harness.md" 2>/dev/null
  [ -s "$OUT/bench_harness.md" ] || rm -f "$OUT/bench_harness.md"
else
  echo "ncutfast.bench is not importable: harness step skipped" > "$OUT/bench_harness.log"
  STEPS+="| ncutfast.bench --device cuda --quick | skipped (harness not present) | 0 |"$'\n'
fi
rm -rf "$HARNESS_TMP"

# 7. Summary.
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
  echo "## measured vs predicted (benchmarks/gpu_model.py: lower bounds from the SASS and datasheet rates)"
  echo
  if [ -s "$OUT/model/gpu_model_compare.md" ]; then cat "$OUT/model/gpu_model_compare.md"; else echo "(none)"; fi
  grep -h '^predicted images/s' "$OUT/model/gpu_model.log" 2>/dev/null
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
