#!/usr/bin/env bash
# One script for a lent GPU (an H100 or H200: torch 2.11+cu130, triton 3.6.0, nvcc 13.0, python3,
# no network, nothing to pip install). Run from the repository root of a plain checkout:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh          # the check (≤ GPU_CHECK_BUDGET s)
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh       # the same plan, walked without a GPU
#
# On a working GPU the run ends with this line on stdout (and "all stages passed" in report.md):
#
#     == gpu_check: all stages passed in <N> s (tests: <n> passed in <s>s)
#
# where <n> is the count the dry run prints ("tests: ... <n> tests selected"; pytest may add
# ", <w> warnings" before " in") and <N> ≤ 510.
# What each stage's success looks like, in report.md:
#   env      the GPU's name, python, torch 2.11, CUDA 13.0, triton 3.6.0; then "ok"
#   build    "built in <s> s" and "sgg_fast._C loads (prebuilt, CUDA kernels present)"
#   tests    "exit 0: ==== <n> passed ... in <s>s ====" and no FAILED/ERROR/SKIPPED line, then the
#            slowest tests (--durations)
#   bench    1B bf16 (AdamW, SGGAdamW[cuda|triton|torch], eager SGG, both references), then 135M
#            fp32: every row timed, finite SGGAdamW[cuda] and SGGAdamW[triton] rows
#   overlap  the llama-100m bf16 table of variants a-e (AdamW, AdamW in backward, SGGAdamW, SGG
#            statistics in backward, SGG step in backward)
#   compile  64M bf16: fused AdamW, SGGAdamW[cuda|triton] momentum and the torch.compile(eager SGG)
#            momentum row, timed ("first step (compile) <s> s" in its note)
#   summary  one line per SGG row: ms, % copy, × AdamW(fused), vs eager, vs compiled; then the
#            seconds each stage took against its box and estimate
#
# Stages, in order, each time-boxed. Every box has an estimate below (what the stage is expected
# to take on the GPU machine: 16 CPU cores, the GPU); the dry run fails when an estimate does not
# fit its box or the boxes do not fit the budget, so a plan that cannot finish is caught without a
# GPU. The report records each stage's real seconds beside its box and estimate: correct the
# estimates from the first run's report.
#   env      interpreter with torch (python3 first), a CUDA device, nvcc
#   build    python3 setup.py build_ext --inplace, timed (CUDA kernels for sm_90 forced); then the
#            in-place sgg_fast._C must load without a JIT fallback and carry CUDA kernels
#   tests    pytest -m cuda on TEST_FILES (the files holding CUDA tests, Triton ones first), -v with
#            durations, each test bounded (benchmarks/pytest_timebox.py), the 2-rank test's group
#            by SGG_DIST_TIMEOUT: a failure, an error, a skip or nothing collected fails it
#   bench    benchmarks.run tables without torch.compile (1B bf16, then 135M fp32); rows are
#            appended to the report as each finishes; a table without a finite SGGAdamW[cuda] and
#            SGGAdamW[triton] row fails it
#   overlap  benchmarks/overlap_bench.py --interleave on a Llama-shaped model in plain torch (the
#            image has no transformers), bf16: AdamW, AdamW in backward, SGGAdamW, SGG statistics
#            in backward, SGG step in backward (issue 16); a run without rows fails it
#   compile  the torch.compile(eager SGG) momentum row last, at COMPILE_SIZE (a cold Inductor
#            compile per param group: its time grows with the number of tensors, 38 at 64M
#            against 146 at 1B), beside the SGG rows of the same size
# Results: exactly two files under $OUT: report.md (written as the stages finish) and
# gpu_check_logs.tar.gz (logs, CSVs, PNGs, junit XML; re-packed after every stage). The exit
# status is non-zero when any stage failed or its backend was unavailable.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
[ "$DRY" = 0 ] && DRY="" || DRY=1
OUT="${OUT:-benchmarks/out/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-510}"
# GPU_CHECK_DEVICE=cpu: a plumbing run of every stage on a machine without a GPU (small
# GPU_CHECK_BIG/SMALL sizes); it always reports failure: it is not a GPU check
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BIG="${GPU_CHECK_BIG:-1B}"
SMALL="${GPU_CHECK_SMALL:-135M}"
COMPILE_SIZE="${GPU_CHECK_COMPILE_SIZE:-64M}"
OVERLAP_MODEL="${GPU_CHECK_OVERLAP_MODEL:-llama-100m}"   # a preset of benchmarks/overlap_bench.py
T0=$(date +%s)
# -- the test stage: these files, in this order (the Triton suites first: they compile every kernel
# variant the later stages reuse from triton's cache), with -m cuda. Only the files that hold CUDA
# tests: a module-level importorskip of another file (no expecttest, no MiniLM package on the
# image) would count as "skipped" even though -m cuda deselects all of its tests. The dry run
# collects -m cuda over all of tests/ and fails unless these are exactly the files it selects from.
TEST_FILES="${GPU_CHECK_TEST_FILES:-tests/test_triton_kernels.py tests/test_triton_amsgrad.py tests/test_triton_tables.py tests/test_launches_cuda.py tests/test_csrc.py tests/test_metrics.py tests/test_distributed.py}"
TEST_LIMIT_S=60      # per test (benchmarks/pytest_timebox.py: SIGALRM, then a hard exit 20 s later)
DIST_TIMEOUT_S=50    # SGG_DIST_TIMEOUT of tests/test_distributed.py's 2-rank group (default 420)
DIST_LIMIT_S=$(( DIST_TIMEOUT_S + 15 ))   # its per-test limit: its own timeout fires first
PYTEST_ARGS="-m cuda -v --durations=15 -p no:cacheprovider -p benchmarks.pytest_timebox -rfEs"
# -- time boxes (seconds; GPU_CHECK_<NAME>_S overrides one); their sum must fit in BUDGET, PACK_S
# of it kept for packing and the summary
ENV_S=${GPU_CHECK_ENV_S:-10} BUILD_S=${GPU_CHECK_BUILD_S:-80} TESTS_S=${GPU_CHECK_TESTS_S:-180}
BIG_S=${GPU_CHECK_BIG_S:-55} SMALL_S=${GPU_CHECK_SMALL_S:-45} OVERLAP_S=${GPU_CHECK_OVERLAP_S:-55}
COMPILE_S=${GPU_CHECK_COMPILE_S:-70} PACK_S=15
# -- the estimates the boxes are checked against (GPU machine; tenths of a second where noted)
EST_ENV=5            # nvidia-smi, import torch
EST_BUILD=60         # the slowest translation units (ops.cpp, cuda/kernels.cu; ~45 s each on one
                     # core) in parallel (MAX_JOBS=nproc), then the link
EST_START=8          # a benchmark process: import torch + sgg_fast, CUDA context, parameters
EST_TRITON=2         # one cold Triton compile on the GPU machine's CPU (benchmarks/aot_check.py: ~1.2 s
                     # per variant on a CI core)
EST_TEST_COMPILES=40 # distinct Triton variants the CUDA tests compile (review of 2026-12-07)
EST_TEST_TENTHS=3    # one CUDA test body, tenths of a second
EST_ROWS=11          # rows of a --no-compile table per dtype: 3 AdamW + 2 references x (3 SGGAdamW backends + eager)
MIN_TIME=0.5         # benchmarks.run --min-time: seconds of timed repeats per row
EST_ROW_TENTHS=5     # per row besides --min-time (warm-ups, the peak-memory step), tenths; + 1 s per 1e9 elements
EST_INDUCTOR_TENTHS=12 # cold Inductor compiles (one per param group), per tensor: the review saw 2 x 30-90 s at 146, tenths
BENCH_TAIL_S=15      # --deadline is the box minus this: the last row started by then, then the tables
EST_OVERLAP_COMPILES=15  # Triton variants of the per-tensor chunk sizes (modes stats/step) not in the cache yet
RESULT_FILES=2
FAILED=()
STAGES=()            # "name seconds box estimate" of each stage that ran
fail() { FAILED+=("$1"); echo "== FAILED: $1"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# box WANT: WANT seconds, or what is left minus PACK_S when less (never under 5)
box() { local l=$(( $(left) - PACK_S )); (( l < $1 )) && echo $(( l > 5 ? l : 5 )) || echo "$1"; }

# -- interpreter: $PYTHON, else python3, else python, else the checkout's .venv (make); it must import torch
PY=""
for cand in ${PYTHON:-} python3 python .venv/bin/python; do
  c=$(command -v "$cand" 2>/dev/null) || continue
  if "$c" -c "import torch" >/dev/null 2>&1; then PY="$c"; break; fi
  [ -n "${PYTHON:-}" ] && [ "$cand" = "$PYTHON" ] && break  # an explicit PYTHON is not replaced
done

export ENV_S BUILD_S TESTS_S BIG_S SMALL_S OVERLAP_S COMPILE_S BIG SMALL COMPILE_SIZE DIST_TIMEOUT_S \
  EST_ENV EST_BUILD EST_START EST_TRITON EST_TEST_COMPILES EST_TEST_TENTHS EST_ROWS MIN_TIME EST_ROW_TENTHS \
  EST_INDUCTOR_TENTHS BENCH_TAIL_S EST_OVERLAP_COMPILES
# estimates N_TESTS: one line per stage, "ok|FAIL <stage>: box <B> s, needs <E> s (<how>)": what the
# stage needs of its box by the estimates above (a benchmark stage also needs its last row started
# before its --deadline, a compile row before half of it), for N_TESTS CUDA tests
estimates() {
  PYTHONPATH="$PWD" "$PY" - "$1" <<'PYEOF'
import os, sys
from benchmarks import workloads
e = lambda k: float(os.environ[k])
n_tests, T, start, tail = int(sys.argv[1]), e("EST_TRITON"), e("EST_START"), e("BENCH_TAIL_S")
def size(name):
    sh = workloads.parse_size(name)
    return sh.numel, len(sh.tensor_shapes())
def row(numel):
    return e("MIN_TIME") + e("EST_ROW_TENTHS") / 10 + numel / 1e9
out = [("env", "ENV_S", e("EST_ENV"), "nvidia-smi, import torch"),
       ("build", "BUILD_S", e("EST_BUILD"), "the slowest translation units in parallel, then the link")]
t = start + n_tests * e("EST_TEST_TENTHS") / 10 + e("EST_TEST_COMPILES") * T + e("DIST_TIMEOUT_S")
out.append(("tests", "TESTS_S", t, f"{start:.0f} s start + {n_tests} tests x {e('EST_TEST_TENTHS') / 10} s + "
            f"{e('EST_TEST_COMPILES'):.0f} Triton compiles x {T:.0f} s + the 2-rank group's "
            f"{e('DIST_TIMEOUT_S'):.0f} s timeout"))
for stage, box, name in (("bench big", "BIG_S", os.environ["BIG"]), ("bench small", "SMALL_S", os.environ["SMALL"])):
    numel, _ = size(name)
    r = row(numel)
    est = start + 3 * T + e("EST_ROWS") * r
    need = max(est + 5, est - r + tail)  # written 5 s after the last row; the last row starts by --deadline
    out.append((stage, box, need, f"{name}, one dtype: {start:.0f} s start + 3 Triton compiles x {T:.0f} s + "
                f"{e('EST_ROWS'):.0f} rows x {r:.2f} s = {est:.0f} s, the last row started "
                f"{tail:.0f} s before the end"))
ovl = start + 5 + e("EST_OVERLAP_COMPILES") * T + 13 * 5 * 0.06
out.append(("overlap", "OVERLAP_S", ovl + 5, f"{start:.0f} s start + 5 model copies x 1 s + "
            f"{e('EST_OVERLAP_COMPILES'):.0f} Triton compiles x {T:.0f} s + 13 steps x 5 variants x 0.06 s "
            "+ 5 s report"))
numel, tensors = size(os.environ["COMPILE_SIZE"])
r = row(numel)
ind = tensors * e("EST_INDUCTOR_TENTHS") / 10
before = start + 3 * T + 3 * r  # fused AdamW, SGGAdamW[cuda], SGGAdamW[triton] momentum rows
est = before + ind + r
need = max(est + 5, 2 * before + tail)  # the compile row starts before half of --deadline
out.append(("compile", "COMPILE_S", need, f"{os.environ['COMPILE_SIZE']}, {tensors} tensors: {before:.0f} s to "
            f"the compile row + cold Inductor compiles {tensors} tensors x {e('EST_INDUCTOR_TENTHS') / 10} s + "
            f"{r:.1f} s timing = {est:.0f} s"))
for stage, box, need, how in out:
    b = float(os.environ[box])
    print(f"{'ok' if need <= b else 'FAIL'} {stage}: box {b:.0f} s, needs {need:.0f} s ({how})")
PYEOF
}

if [ -n "$DRY" ]; then
  # -------- dry run: the real run's plan (test files, time boxes), walked without a GPU ----------
  echo "gpu_check.sh: dry run (GPU_CHECK_DRY_RUN=1): the real run's plan, nothing is built or timed"
  [ -n "$PY" ] && echo "interpreter: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))" \
    || fail "interpreter: none of ${PYTHON:-} python3 python imports torch"
  srcs=$(ls csrc/cuda/*.cu csrc/cuda/*.cpp csrc/*.cpp 2>/dev/null | wc -l)
  if [ -f setup.py ] && [ -f csrc/cuda/kernels.cu ] && (( srcs >= 3 )); then
    echo "build: $srcs csrc sources; command: SGG_FAST_FORCE_CUDA=1 SGG_FAST_CUDA_ARCHS=90 $PY setup.py build_ext --inplace (box ${BUILD_S}s)"
  else
    fail "build: setup.py or csrc/cuda/kernels.cu missing ($srcs csrc sources)"
  fi
  command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] && echo "nvcc: $(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")" \
    || echo "nvcc: not found here (the GPU machine has it; the build stage fails without it)"
  n=0
  if [ -n "$PY" ]; then
    # the real run's pytest command, collecting only, over all of tests/: the files it selects from
    # must be TEST_FILES exactly (a new file of CUDA tests is added to the list, in its place)
    for f in $TEST_FILES; do [ -f "$f" ] || fail "tests: $f (TEST_FILES) does not exist"; done
    col="${TMPDIR:-/tmp}/gpu_check_collect.$$"
    # shellcheck disable=SC2086
    PYTHONPATH="$PWD" "$PY" -m pytest $PYTEST_ARGS --collect-only -q -q tests > "$col" 2>&1
    selected=$(grep -oE '^tests/[^:]+\.py::' "$col" | sed 's/::$//' | sort -u)
    for f in $selected; do
      grep -qw -- "$f" <<< "$TEST_FILES" \
        || fail "tests: $f holds tests selected by -m cuda but is not in TEST_FILES (the test stage would not run them)"
    done
    n=0
    for f in $TEST_FILES; do
      k=$(grep -c "^$f::" "$col")
      (( k > 0 )) || fail "tests: $f (TEST_FILES) has no test selected by -m cuda"
      n=$(( n + k ))
    done
    if grep -qE '^ERROR|[0-9]+ errors? ' "$col"; then
      fail "tests: collection errors: $(grep -E '^ERROR|[0-9]+ errors? ' "$col" | head -3 | tr '\n' ' ')"
    fi
    rm -f "$col"
    if (( n > 0 )); then
      echo "tests: pytest $PYTEST_ARGS $TEST_FILES: $n tests selected (box ${TESTS_S}s; ${TEST_LIMIT_S} s per test, the 2-rank group ${DIST_TIMEOUT_S} s)"
    else
      fail "tests: pytest -m cuda collected nothing from $TEST_FILES"
    fi
    if PYTHONPATH="$PWD" "$PY" -c "
import sys
from benchmarks import workloads
for s in sys.argv[1:]:
    sh = workloads.parse_size(s); print(f'table: {s}: {sh.numel/1e6:.0f}M parameters in {len(sh.tensor_shapes())} tensors')
" "$BIG" "$SMALL" "$COMPILE_SIZE"; then
      echo "tables: $BIG bf16 (box ${BIG_S}s), $SMALL fp32 (box ${SMALL_S}s), then torch.compile $COMPILE_SIZE bf16 momentum (box ${COMPILE_S}s)"
    else
      fail "tables: benchmarks.workloads cannot plan sizes $BIG / $SMALL / $COMPILE_SIZE"
    fi
    if PYTHONPATH="$PWD" "$PY" -c "
import sys, torch
from types import SimpleNamespace
from benchmarks import overlap_bench, torch_llama
with torch.device('meta'):
    m = torch_llama.LlamaLike(SimpleNamespace(**overlap_bench.PRESETS[sys.argv[1]]))
print(f'overlap: {sys.argv[1]} in plain torch: {sum(p.numel() for p in m.parameters())/1e6:.0f}M parameters')
" "$OVERLAP_MODEL"; then
      echo "overlap: bf16, variants a,b,c,d,e interleaved (box ${OVERLAP_S}s)"
    else
      fail "overlap: benchmarks/overlap_bench.py cannot build preset $OVERLAP_MODEL in plain torch"
    fi
    # every box against its estimate
    if est=$(estimates "$n" 2>&1); then
      while read -r verdict rest; do
        case "$verdict" in
          ok) echo "box $rest" ;;
          FAIL) fail "box $rest: the estimate does not fit the box" ;;
        esac
      done <<< "$est"
    else
      fail "estimates: $est"
    fi
  fi
  total=$(( ENV_S + BUILD_S + TESTS_S + BIG_S + SMALL_S + OVERLAP_S + COMPILE_S + PACK_S ))
  (( total <= BUDGET )) && echo "budget: stage boxes sum to ${total}s ≤ ${BUDGET}s" \
    || fail "budget: stage boxes sum to ${total}s > ${BUDGET}s"
  echo "result files: $RESULT_FILES (report.md, gpu_check_logs.tar.gz under \$OUT=$OUT)"
  if (( ${#FAILED[@]} )); then echo "dry run: ${#FAILED[@]} precondition(s) failed"; exit 1; fi
  echo "dry run: all preconditions hold; on a working GPU the run ends with:"
  echo "    == gpu_check: all stages passed in <N> s (tests: $n passed in <s>s)"
  exit 0
fi

# -------- the real run --------------------------------------------------------------------------
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")   # logs live here, packed into one archive
REPORT="$OUT/report.md"
ARCHIVE="$OUT/gpu_check_logs.tar.gz"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KINETO_LOG_LEVEL=5 PYTHONUNBUFFERED=1
pack() { tar -czf "$ARCHIVE.tmp" -C "$WORK" . 2>/dev/null && mv -f "$ARCHIVE.tmp" "$ARCHIVE"; }
section() { printf '\n## %s\n\n' "$1" >> "$REPORT"; }
# stage_done NAME START BOX: record the seconds a stage took (the summary sets them beside the estimates)
stage_done() { STAGES+=("$1 $(( $(date +%s) - $2 )) $3"); }

s0=$(date +%s)
echo "# sgg_fast GPU check — $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$REPORT"
section "env"
HAVE_CUDA=0
if [ -z "$PY" ]; then
  fail "env: none of ${PYTHON:-} python3 python imports torch"
else
  { echo '```'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
    timeout "$(box $ENV_S)" "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, importlib.util, platform, torch
v = lambda d: md.version(d) if importlib.util.find_spec(d) else "not installed"
print(f"{platform.python_version()=} {torch.__version__=} {torch.version.cuda=} triton {v('triton')}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
    echo '```'; } >> "$REPORT"
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_CUDA=1
  elif [ "$DEVICE" = cpu ]; then
    HAVE_CUDA=1  # run the stages anyway
    fail "env: GPU_CHECK_DEVICE=cpu: a plumbing run on the CPU, not a GPU check"
  else
    fail "env: torch.cuda.is_available() is False ($PY)"
  fi
fi
echo "${FAILED[*]:-ok}" >> "$REPORT"
stage_done env "$s0" "$ENV_S"

if (( HAVE_CUDA )); then
  # -- build --------------------------------------------------------------------------------------
  section "build"
  t=$(box $BUILD_S); b0=$(date +%s)
  echo "== build_ext --inplace (box ${t}s)"
  if SGG_FAST_FORCE_CUDA=1 SGG_FAST_CUDA_ARCHS="${SGG_FAST_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      timeout "$t" "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1; then
    echo "built in $(( $(date +%s) - b0 )) s" >> "$REPORT"
  else
    fail "build: setup.py build_ext --inplace exited $? after $(( $(date +%s) - b0 )) s (build.log)"
    tail -15 "$WORK/build.log" | sed 's/^/    /' >> "$REPORT"
  fi
  # the in-place build must be what loads: no JIT fallback
  if SGG_FAST_NO_JIT=1 "$PY" -c "
from sgg_fast import _ext
import sys
ok = _ext.load() and _ext.how() == 'prebuilt' and _ext.has_cuda_kernels()
print(_ext.status_line() if hasattr(_ext, 'status_line') else _ext.info())
sys.exit(0 if ok else 1)" >> "$WORK/build.log" 2>&1; then
    echo "sgg_fast._C loads (prebuilt, CUDA kernels present)" >> "$REPORT"
  else
    fail "build: sgg_fast._C does not load with CUDA kernels (SGG_FAST_NO_JIT=1)"
  fi
  stage_done build "$b0" "$t"
  pack

  # -- tests --------------------------------------------------------------------------------------
  section "pytest -m cuda"
  t=$(box $TESTS_S); s0=$(date +%s)
  echo "== pytest -m cuda $TEST_FILES (box ${t}s)"
  # shellcheck disable=SC2086
  SGG_FAST_NO_JIT=1 SGG_DIST_TIMEOUT=$DIST_TIMEOUT_S SGG_TEST_TIMEOUT=$TEST_LIMIT_S \
    SGG_TEST_TIMEOUTS="tests/test_distributed.py=$DIST_LIMIT_S" \
    timeout "$t" "$PY" -m pytest $PYTEST_ARGS --junitxml="$WORK/pytest_cuda.xml" $TEST_FILES \
    > "$WORK/pytest_cuda.log" 2>&1
  rc=$?
  line=$(grep -E '[0-9]+ (passed|failed|error|skipped)|no tests ran' "$WORK/pytest_cuda.log" | tail -1)
  { echo "exit $rc: $line"; echo '```'; grep -E '^(FAILED|ERROR|SKIPPED)' "$WORK/pytest_cuda.log" | head -30
    if (( rc == 124 )); then echo "timed out; the last lines (-v names the test that was running):"
      tail -5 "$WORK/pytest_cuda.log"; fi
    sed -n '/slowest [0-9]* durations/,/^$/p' "$WORK/pytest_cuda.log" | head -18; echo '```'; } >> "$REPORT"
  # judged on the selected CUDA tests only: TEST_FILES are the files that hold them, so a skip here
  # is one of them (or a whole file of them) not running
  if (( rc != 0 )); then fail "tests: pytest -m cuda exit $rc ($line)"
  elif grep -qE '[0-9]+ skipped' <<< "$line"; then fail "tests: cuda tests skipped ($line)"
  elif ! grep -qE '[0-9]+ passed' <<< "$line"; then fail "tests: no test passed ($line)"; fi
  TESTS_LINE=$(grep -oE '[0-9]+ passed.* in [0-9.]+s' <<< "$line" | sed -E 's/ *=+ *$//')
  N_TESTS=$(grep -oE '[0-9]+ (passed|failed|errors?|skipped)' <<< "$line" | awk '{s += $1} END {print s + 0}')
  stage_done tests "$s0" "$t"
  pack

  # -- benchmark tables, then compile rows, each in its own box --------------------------------------
  bench() {  # tag box need_sgg args...
    local tag=$1 want=$2 need=$3; shift 3
    local t s0; t=$(box "$want"); s0=$(date +%s)
    section "benchmark $tag"
    if (( $(left) - PACK_S < 20 )); then fail "bench $tag: no time left"; return; fi
    echo "== benchmarks.run $* (box ${t}s)"
    SGG_FAST_NO_JIT=1 timeout "$t" "$PY" -m benchmarks.run --device "$DEVICE" --out "$WORK" --tag "$tag" \
        --deadline $(( t - BENCH_TAIL_S )) --min-time "$MIN_TIME" --progress "$WORK/$tag.rows.md" "$@" \
        > "$WORK/$tag.stdout" 2> "$WORK/$tag.log"
    local rc=$?
    if [ -s "$WORK/$tag.md" ]; then cat "$WORK/$tag.md" >> "$REPORT"
    else { echo "rows that finished before exit $rc:"; echo; cat "$WORK/$tag.rows.md" 2>/dev/null;
           echo '```'; tail -15 "$WORK/$tag.log"; echo '```'; } >> "$REPORT"; fi
    (( rc == 0 )) || fail "bench $tag: exit $rc"
    if [ "$need" = sgg ]; then
      for b in cuda triton; do
        grep -qE "^\| SGGAdamW\[$b\] [a-z]+ \| [0-9]" "$WORK/$tag.rows.md" 2>/dev/null \
          || fail "bench $tag: no timed SGGAdamW[$b] row (backend unavailable or failed; $tag.log)"
      done
    else
      grep -qE '^\| torch.compile\(eager SGG\) [a-z]+ \| [0-9]' "$WORK/$tag.rows.md" 2>/dev/null \
        || fail "bench $tag: the torch.compile row did not finish ($tag.log)"
    fi
    stage_done "$tag" "$s0" "$t"
    pack
  }
  bench "big_bf16" $BIG_S sgg --size "$BIG" --dtype bf16 --no-compile
  bench "small" $SMALL_S sgg --size "$SMALL" --dtype fp32 --no-compile

  # -- the step inside backward (issue 16) ------------------------------------------------------------
  section "overlap_backward ($OVERLAP_MODEL, plain torch)"
  t=$(box $OVERLAP_S); s0=$(date +%s)
  if (( $(left) - PACK_S < 20 )); then
    fail "overlap: no time left"
  else
    echo "== overlap_bench $OVERLAP_MODEL bf16 (box ${t}s)"
    SGG_FAST_NO_JIT=1 timeout $(( t - 5 )) "$PY" benchmarks/overlap_bench.py --device "$DEVICE" \
        --config "$OVERLAP_MODEL" --impl torch --dtype bf16 --batch 4 --seq 256 --steps 10 --warmup 3 \
        --interleave --stat median --variants a,b,c,d,e --json "$WORK/overlap.jsonl" \
        > "$WORK/overlap_bf16.log" 2>&1 || fail "overlap bf16: exit $? (overlap_bf16.log)"
    if [ -s "$WORK/overlap.jsonl" ]; then
      "$PY" benchmarks/overlap_bench.py --report --json "$WORK/overlap.jsonl" >> "$REPORT" 2>&1
    else
      fail "overlap: no rows (overlap_bf16.log)"
    fi
  fi
  stage_done overlap "$s0" "$t"
  pack
  # at COMPILE_SIZE (38 tensors at 64M: two cold compiles fit the box; 1B's 146 did not), with the
  # SGGAdamW momentum rows of the same size beside it ("vs compiled" in the summary)
  bench "compile_momentum" $COMPILE_S compiled --size "$COMPILE_SIZE" --dtype bf16 --compile --compile-refs momentum \
      --rows '^(torch\.compile|SGGAdamW\[(cuda|triton)\] momentum)'

  # -- summary: SGG rows against fused AdamW and the compiled rows of the other runs ------------------
  section "summary"
  "$PY" - "$WORK" >> "$REPORT" 2>&1 <<'EOF'
import csv, glob, math, os, sys
rows = [r for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.csv"))) for r in csv.DictReader(open(p))]
ms = lambda r: float(r["ms"]) if r["ms"] not in ("", "nan") else math.nan
comp = {(r["size"], r["dtype"], r["reference"]): ms(r) for r in rows if r["kind"] == "compiled"}
print("| size | dtype | step | ms | % copy | × AdamW(fused) | vs eager | vs compiled (other run) |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    if r["kind"] != "sgg":
        continue
    c = comp.get((r["size"], r["dtype"], r["reference"]), math.nan)
    print(f"| {r['size']} | {r['dtype']} | {r['row']} | {ms(r):.3f} | {float(r['pct_copy']):.0f} | "
          f"{float(r['x_fused_adamw']):.2f} | {float(r['speedup_vs_eager']):.2f} | {c / ms(r):.2f} |")
EOF
  # each stage's seconds against its box and its estimate (correct the estimates from these)
  { echo; echo "| stage | seconds | box | estimate (needs) |"; echo "|---|---:|---:|---|"
    est=$(estimates "${N_TESTS:-0}" 2>/dev/null)
    for st in "${STAGES[@]}"; do
      read -r name secs bx <<< "$st"
      key=$name; case $name in big_bf16) key="bench big";; small) key="bench small";; compile_momentum) key=compile;; esac
      e=$(grep -E "^(ok|FAIL) $key:" <<< "$est" | sed -E 's/.*needs ([0-9]+) s.*/\1/')
      echo "| $name | $secs | $bx | ${e:-?} |"
    done; } >> "$REPORT"
fi

if (( ! HAVE_CUDA )); then
  section "build, tests, benchmarks"; echo "not run: no CUDA device (every one of them needs it)" >> "$REPORT"
fi
section "result"
if (( ${#FAILED[@]} )); then
  { echo "**FAILED** (${#FAILED[@]}):"; printf -- '- %s\n' "${FAILED[@]}"; } >> "$REPORT"
else
  echo "all stages passed" >> "$REPORT"
fi
echo "done in $(( $(date +%s) - T0 )) s" >> "$REPORT"
cp "$REPORT" "$WORK/report.md"; pack; rm -rf "$WORK"
echo "== report: $REPORT; archive: $ARCHIVE; $(( $(date +%s) - T0 )) s"
if (( ${#FAILED[@]} )); then printf '== FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
echo "== gpu_check: all stages passed in $(( $(date +%s) - T0 )) s (tests: ${TESTS_LINE:-?})"
exit 0
