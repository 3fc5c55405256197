#!/usr/bin/env bash
# One script for a lent GPU (an H200: torch 2.11+cu130, triton 3.6, nvcc 13.0, Python 3.12, no
# network, nothing to pip install). Run from the repository root of a plain checkout:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# 1. builds the C++/CUDA extension in place (python setup.py build_ext --inplace) when the
#    checkout has csrc sources; a missing or failing build is reported, not fatal;
# 2. pytest -m cuda tests   (the triton/cuda/cpu backends' GPU tests);
# 3. the benchmark table: a >= 1B-parameter bf16 list (Llama-3.2-1B shapes) with the compiled
#    eager SGG row, then a smaller one (SmolLM2-135M shapes, fp32 + bf16);
# 4. if time is left and transformers is installed: profile_finetune.py on a Llama-1B config;
# and writes $OUT/report.md (+ the CSVs, PNGs, logs), printing a short summary table last.
# Every stage is time-boxed so the whole run stays under GPU_CHECK_BUDGET seconds (default 570).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET:-570}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
# overridable for a dry run of the script's plumbing on a CPU machine:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIG=1M GPU_CHECK_SMALL=1M OUT=/tmp/g bash benchmarks/gpu_check.sh
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BIG="${GPU_CHECK_BIG:-1B}"
SMALL="${GPU_CHECK_SMALL:-135M}"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# stage_timeout WANT RESERVE: WANT seconds, or what is left minus RESERVE for the later stages
stage_timeout() { local l; l=$(( $(left) - $2 )); (( l < $1 )) && echo $(( l > 10 ? l : 10 )) || echo "$1"; }
REPORT="$OUT/report.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KINETO_LOG_LEVEL=5 PYTHONUNBUFFERED=1

{
  echo "# sgg_fast GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
v = lambda d: (md.version(d) if __import__("importlib").util.find_spec(d.replace("-", "_")) else "not installed")
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"triton {v('triton')}  transformers {v('transformers')}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo '```'
  echo
} > "$REPORT"

# -- 1. extension ------------------------------------------------------------------------------
BUILD="not attempted"
if ls csrc/*/*.cu csrc/*.cu csrc/*/*.cpp csrc/*.cpp >/dev/null 2>&1; then
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    # nvcc may be a wrapper script (exec /usr/local/cuda-X/bin/nvcc): take the real folder
    real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1)
    CUDA_HOME=$(dirname "$(dirname "${real:-$(readlink -f "$(command -v nvcc)")}")")
    export CUDA_HOME
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  t=$(stage_timeout 200 330)
  echo "== build_ext --inplace (CUDA_HOME=${CUDA_HOME:-unset}, timeout ${t}s)"
  if timeout "$t" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    BUILD="built in place"
  else
    BUILD="FAILED or timed out (exit $?) — see build.log; the other backends still run"
  fi
else
  BUILD="no csrc sources in this checkout: skipped"
fi
echo "== extension: $BUILD"
{ echo "## 1. C++/CUDA extension"; echo; echo "$BUILD"; echo;
  echo '```'; "$PY" -m sgg_fast.info 2>&1 | tail -20; echo '```'; echo; } >> "$REPORT"

# -- 2. GPU tests ------------------------------------------------------------------------------
t=$(stage_timeout 150 280)
echo "== pytest -m cuda tests (timeout ${t}s)"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  timeout "$t" "$PY" -m pytest -q -m cuda tests -p no:cacheprovider -rfEs > "$OUT/pytest_cuda.log" 2>&1
  rc=$?
else
  echo "pytest is not installed for $PY" > "$OUT/pytest_cuda.log"
  rc=127
fi
case $rc in
  0) TESTS="passed" ;;
  5) TESTS="no test marked cuda was collected (no GPU backend merged yet?)" ;;
  124) TESTS="TIMED OUT after ${t}s" ;;
  127) TESTS="NOT RUN: pytest is not installed on this machine" ;;
  *) TESTS="FAILED (exit $rc)" ;;
esac
TESTLINE=$(grep -E '(passed|failed|error|no tests ran)' "$OUT/pytest_cuda.log" | tail -1)
echo "== tests: $TESTS — $TESTLINE"
{ echo "## 2. pytest -m cuda tests: $TESTS"; echo; echo '```'; tail -40 "$OUT/pytest_cuda.log"; echo '```'; echo; } >> "$REPORT"

# -- 3. benchmark tables -----------------------------------------------------------------------
run_bench() {  # tag want_seconds reserve args...
  local tag=$1 want=$2 reserve=$3; shift 3
  local t; t=$(stage_timeout "$want" "$reserve")
  echo "== benchmarks.run $* (deadline $((t - 40))s, timeout ${t}s)"
  timeout "$t" "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUT" --tag "$tag" --deadline $((t - 40)) "$@" \
      > "$OUT/$tag.stdout" 2> "$OUT/$tag.log"
  local rc=$?
  { echo "## 3. benchmark $tag (exit $rc)"; echo;
    if [ -s "$OUT/$tag.md" ]; then cat "$OUT/$tag.md"; else echo '```'; tail -30 "$OUT/$tag.log"; echo '```'; fi
    echo; } >> "$REPORT"
}
run_bench bench_big_bf16 230 110 --size "$BIG" --dtype bf16 --compile --compile-refs momentum
run_bench bench_small 120 20 --size "$SMALL" --dtype fp32,bf16 --no-compile

# -- 4. optional: fine-tuning profile on a Llama-1B config -------------------------------------
if [ "$DEVICE" = cuda ] && (( $(left) > 100 )) && "$PY" -c "import transformers" >/dev/null 2>&1; then
  t=$(stage_timeout 90 10)
  echo "== profile_finetune --config llama-1b (timeout ${t}s)"
  timeout "$t" "$PY" benchmarks/profile_finetune.py --config llama-1b --dtype bf16 --batch 4 --seq 512 \
      --steps 3 --out "$OUT/profile" > "$OUT/profile.stdout" 2> "$OUT/profile.log"
  { echo "## 4. fine-tuning profile (exit $?)"; echo; cat "$OUT/profile/summary.md" 2>/dev/null \
      || tail -20 "$OUT/profile.log"; echo; } >> "$REPORT"
else
  echo "== profile_finetune skipped ($(left)s left or transformers missing)"
  echo "## 4. fine-tuning profile: skipped ($(left) s left, or transformers not installed)" >> "$REPORT"
fi

# -- summary (last) ----------------------------------------------------------------------------
echo "== done in $(( $(date +%s) - T0 ))s; report: $REPORT"
"$PY" - "$OUT" "$BUILD" "$TESTS" "$TESTLINE" <<'EOF'
import csv, glob, math, os, sys
out, build, tests, testline = sys.argv[1:5]
print(f"\nextension: {build}\ntests (-m cuda): {tests} {testline}\n")
hdr = f"{'size':>5} {'dtype':>5} {'step':<40} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'xAdamW':>7} {'vsEager':>8} {'vsComp':>7}"
print(hdr); print("-" * len(hdr))
f = lambda v, p: "—" if v in ("", "nan") or not math.isfinite(float(v)) else f"{float(v):.{p}f}"
for path in sorted(glob.glob(os.path.join(out, "bench_*.csv"))):
    for r in csv.DictReader(open(path)):
        print(f"{r['size']:>5} {r['dtype']:>5} {r['row'][:40]:<40} {f(r['ms'],2):>9} {f(r['gbs'],0):>7} "
              f"{f(r['pct_copy'],0):>6} {f(r['x_fused_adamw'],2):>7} {f(r['speedup_vs_eager'],2):>8} "
              f"{f(r['speedup_vs_compiled'],2):>7}" + (f"  {r['note'][:50]}" if r['note'] else ""))
EOF
