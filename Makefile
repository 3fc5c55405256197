# Quick start: `make bench` (the benchmark table) and `make test` (the test suite).
# Both create .venv when missing and install everything into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sgg_fast_installed
DEPS    := torch==2.14.1 triton transformers pytest pytest-benchmark ninja numpy tqdm matplotlib setuptools wheel

.PHONY: install test bench info clean

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

# the compiled extension (csrc/, sgg_fast._C) is built by the editable install above: rebuild it
# when its sources change
$(STAMP): $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu sgg_fast/_build.py)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

info: $(STAMP)
	$(BIN)/python -m sgg_fast.info

clean:
	rm -rf build *.egg-info .pytest_cache
