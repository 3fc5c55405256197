#!/usr/bin/env bash
# One script for a lent GPU (an H200: torch 2.11+cu130, triton 3.6, nvcc 13.0, python3, no
# network, nothing to pip install). Run from the repository root of a plain checkout:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh          # the check (≤ GPU_CHECK_BUDGET s)
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh       # preconditions only, no GPU needed
#
# Stages, in order, each time-boxed (the sum of the boxes is checked against the budget):
#   env      interpreter with torch (python3 first), a CUDA device, nvcc
#   build    python3 setup.py build_ext --inplace, timed (CUDA kernels for sm_90 forced); then the
#            in-place sgg_fast._C must load without a JIT fallback and carry CUDA kernels
#   tests    pytest -m cuda tests: a failure, an error, a skip or nothing collected fails it
#   bench    benchmarks.run tables without torch.compile (1B bf16, then 135M fp32+bf16); rows are
#            appended to the report as each finishes; a table without a finite SGGAdamW[cuda] and
#            SGGAdamW[triton] row fails it
#   overlap  benchmarks/overlap_bench.py --interleave on a Llama-shaped model in plain torch (the
#            image has no transformers), bf16 then fp32: AdamW, AdamW in backward, SGGAdamW, SGG
#            statistics in backward, SGG step in backward (issue 16); a run without rows fails it
#   compile  the torch.compile(eager SGG) rows last, each in its own time box
# Results: exactly two files under $OUT: report.md (written as the stages finish) and
# gpu_check_logs.tar.gz (logs, CSVs, PNGs; re-packed after every stage). The exit status is
# non-zero when any stage failed or its backend was unavailable.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
[ "$DRY" = 0 ] && DRY="" || DRY=1
OUT="${OUT:-benchmarks/out/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-565}"
# GPU_CHECK_DEVICE=cpu: a plumbing run of every stage on a machine without a GPU (small
# GPU_CHECK_BIG/SMALL sizes); it always reports failure: it is not a GPU check
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BIG="${GPU_CHECK_BIG:-1B}"
SMALL="${GPU_CHECK_SMALL:-135M}"
OVERLAP_MODEL="${GPU_CHECK_OVERLAP_MODEL:-llama-100m}"   # a preset of benchmarks/overlap_bench.py
T0=$(date +%s)
# time boxes (seconds); their sum must fit in BUDGET with PACK_S spare for packing and summary
# (tests: the whole Triton kernel suite runs on the GPU, compiling every kernel variant once;
# the benchmark stages then find them in triton's cache)
# (overlap: ~6 s of model set-up per dtype, then 13 interleaved steps of 5 variants)
ENV_S=15 BUILD_S=110 TESTS_S=175 BIG_S=90 SMALL_S=50 OVERLAP_S=40 COMPILE_S=70 PACK_S=15
RESULT_FILES=2
FAILED=()
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

if [ -n "$DRY" ]; then
  # -------- dry run: every stage's preconditions, no GPU work --------------------------------
  echo "gpu_check.sh: dry run (GPU_CHECK_DRY_RUN=1): preconditions only, nothing is built or timed"
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
  if [ -n "$PY" ]; then
    n=$(PYTHONPATH="$PWD" "$PY" -m pytest -q --collect-only -m cuda tests -p no:cacheprovider 2>/dev/null \
        | grep -cE '::')
    (( n > 0 )) && echo "tests: pytest -m cuda tests: $n tests selected (box ${TESTS_S}s)" \
      || fail "tests: pytest -m cuda collected nothing"
    if PYTHONPATH="$PWD" "$PY" -c "
import sys
from benchmarks import workloads
for s in sys.argv[1:]:
    sh = workloads.parse_size(s); print(f'table: {s}: {sh.numel/1e6:.0f}M parameters')
" "$BIG" "$SMALL"; then
      echo "tables: $BIG bf16 (box ${BIG_S}s), $SMALL fp32+bf16 (box ${SMALL_S}s), then torch.compile $BIG bf16 momentum (box ${COMPILE_S}s), ema if time is left"
    else
      fail "tables: benchmarks.workloads cannot plan sizes $BIG / $SMALL"
    fi
    if PYTHONPATH="$PWD" "$PY" -c "
import sys, torch
from types import SimpleNamespace
from benchmarks import overlap_bench, torch_llama
with torch.device('meta'):
    m = torch_llama.LlamaLike(SimpleNamespace(**overlap_bench.PRESETS[sys.argv[1]]))
print(f'overlap: {sys.argv[1]} in plain torch: {sum(p.numel() for p in m.parameters())/1e6:.0f}M parameters')
" "$OVERLAP_MODEL"; then
      echo "overlap: bf16 + fp32, variants a,b,c,d,e interleaved (box ${OVERLAP_S}s)"
    else
      fail "overlap: benchmarks/overlap_bench.py cannot build preset $OVERLAP_MODEL in plain torch"
    fi
  fi
  total=$(( ENV_S + BUILD_S + TESTS_S + BIG_S + SMALL_S + OVERLAP_S + COMPILE_S + PACK_S ))
  (( total <= BUDGET )) && echo "budget: stage boxes sum to ${total}s ≤ ${BUDGET}s" \
    || fail "budget: stage boxes sum to ${total}s > ${BUDGET}s"
  echo "result files: $RESULT_FILES (report.md, gpu_check_logs.tar.gz under \$OUT=$OUT)"
  if (( ${#FAILED[@]} )); then echo "dry run: ${#FAILED[@]} precondition(s) failed"; exit 1; fi
  echo "dry run: all preconditions hold"; exit 0
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
  pack

  # -- tests --------------------------------------------------------------------------------------
  section "pytest -m cuda"
  t=$(box $TESTS_S)
  echo "== pytest -m cuda tests (box ${t}s)"
  SGG_FAST_NO_JIT=1 timeout "$t" "$PY" -m pytest -q -m cuda tests -p no:cacheprovider -rfEs \
    > "$WORK/pytest_cuda.log" 2>&1
  rc=$?
  line=$(grep -E '[0-9]+ (passed|failed|error|skipped)|no tests ran' "$WORK/pytest_cuda.log" | tail -1)
  { echo "exit $rc: $line"; echo '```'; grep -E '^(FAILED|ERROR|SKIPPED)' "$WORK/pytest_cuda.log" | head -30; echo '```'; } >> "$REPORT"
  if (( rc != 0 )); then fail "tests: pytest -m cuda exit $rc ($line)"
  elif grep -qE '[0-9]+ skipped' <<< "$line"; then fail "tests: cuda tests skipped ($line)"; fi
  pack

  # -- benchmark tables, then compile rows, each in its own box --------------------------------------
  bench() {  # tag box need_sgg args...
    local tag=$1 want=$2 need=$3; shift 3
    local t; t=$(box "$want")
    section "benchmark $tag"
    if (( $(left) - PACK_S < 20 )); then fail "bench $tag: no time left"; return; fi
    echo "== benchmarks.run $* (box ${t}s)"
    SGG_FAST_NO_JIT=1 timeout "$t" "$PY" -m benchmarks.run --device "$DEVICE" --out "$WORK" --tag "$tag" \
        --deadline $(( t - 25 )) --progress "$WORK/$tag.rows.md" "$@" > "$WORK/$tag.stdout" 2> "$WORK/$tag.log"
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
    pack
  }
  bench "big_bf16" $BIG_S sgg --size "$BIG" --dtype bf16 --no-compile
  bench "small" $SMALL_S sgg --size "$SMALL" --dtype fp32,bf16 --no-compile

  # -- the step inside backward (issue 16) ------------------------------------------------------------
  section "overlap_backward ($OVERLAP_MODEL, plain torch)"
  t=$(box $OVERLAP_S)
  if (( $(left) - PACK_S < 20 )); then
    fail "overlap: no time left"
  else
    echo "== overlap_bench $OVERLAP_MODEL (box ${t}s)"
    for dt in bf16 fp32; do
      SGG_FAST_NO_JIT=1 timeout $(( t / 2 )) "$PY" benchmarks/overlap_bench.py --device "$DEVICE" \
          --config "$OVERLAP_MODEL" --impl torch --dtype "$dt" --batch 4 --seq 256 --steps 10 --warmup 3 \
          --interleave --stat median --variants a,b,c,d,e --json "$WORK/overlap.jsonl" \
          > "$WORK/overlap_$dt.log" 2>&1 || fail "overlap $dt: exit $? (overlap_$dt.log)"
    done
    if [ -s "$WORK/overlap.jsonl" ]; then
      "$PY" benchmarks/overlap_bench.py --report --json "$WORK/overlap.jsonl" >> "$REPORT" 2>&1
    else
      fail "overlap: no rows (overlap_bf16.log, overlap_fp32.log)"
    fi
  fi
  pack
  bench "compile_momentum" $COMPILE_S compiled --size "$BIG" --dtype bf16 --compile --compile-refs momentum \
      --rows '^torch\.compile'
  if (( $(left) - PACK_S > COMPILE_S )); then
    bench "compile_ema" $COMPILE_S compiled --size "$BIG" --dtype bf16 --compile --compile-refs ema --rows '^torch\.compile'
  else
    section "benchmark compile_ema"; echo "not run: $(left) s left" >> "$REPORT"
  fi

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
exit 0
