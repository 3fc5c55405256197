"""benchmarks/gpu_check.sh, the script of a lent GPU's one short run, checked without a GPU: its
dry run walks the real run's plan (the test files and pytest command, every time box against its
estimate, the budget) and passes here, fails when a precondition is broken or an estimate does not
fit its box, promises at most 8 result files; a real run on a machine without CUDA reports failure
(exit status != 0) and leaves only its report and its archive. benchmarks/pytest_timebox.py (the
per-test limit of its test stage) fails a test that runs over and goes on with the next."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("benchmarks", "gpu_check.sh")


def _run(cwd, **env):
    e = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def _result_files(out: str) -> int:
    m = re.findall(r"^result files: (\d+)", out, re.M)
    assert len(m) == 1, out
    return int(m[0])


STAGES = ("env", "build", "tests", "bench big", "bench small", "overlap", "compile")


def test_dry_run_passes_here():
    r = _run(ROOT, GPU_CHECK_DRY_RUN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run" in r.stdout
    assert 1 <= _result_files(r.stdout) <= 8
    # the real run's pytest command on its file list, the Triton suites first
    m = re.search(r"^tests: pytest -m cuda .*-p benchmarks\.pytest_timebox.*? (tests/\S+\.py(?: tests/\S+\.py)*): "
                  r"([1-9]\d*) tests selected", r.stdout, re.M)
    assert m, r.stdout
    files = m.group(1).split()
    assert files[:2] == ["tests/test_triton_kernels.py", "tests/test_triton_amsgrad.py"], files
    assert "tests/test_torch_optim_suite.py" not in files and "tests/test_integrations_transformers.py" not in files
    # every stage's box holds its estimate, and the boxes fit the budget
    for stage in STAGES:
        b = re.search(rf"^box {stage}: box (\d+) s, needs (\d+) s", r.stdout, re.M)
        assert b and int(b.group(2)) <= int(b.group(1)), (stage, r.stdout)
    total, budget = map(int, re.search(r"budget: stage boxes sum to (\d+)s ≤ (\d+)s", r.stdout).groups())
    assert total <= budget <= 540, r.stdout  # 15 device minutes include the machine's start
    assert f"(tests: {m.group(2)} passed in <s>s)" in r.stdout


def test_dry_run_fails_when_an_estimate_exceeds_its_box():
    # torch.compile at 1B (146 tensors: two cold Inductor compiles) and a test box too small for the tests
    r = _run(ROOT, GPU_CHECK_DRY_RUN="1", GPU_CHECK_COMPILE_SIZE="1B", GPU_CHECK_TESTS_S="100")
    assert r.returncode != 0, r.stdout
    assert r.stdout.count("FAILED:") == 2, r.stdout
    assert re.search(r"FAILED: box compile: box 70 s, needs \d{3} s", r.stdout), r.stdout
    assert re.search(r"FAILED: box tests: box 100 s, needs \d+ s", r.stdout), r.stdout
    assert "FAILED: box bench" not in r.stdout and "FAILED: box overlap" not in r.stdout


def test_header_states_the_summary_line_of_a_working_gpu():
    text = open(os.path.join(ROOT, SCRIPT)).read()
    header = text.split("set -uo pipefail")[0]
    assert "== gpu_check: all stages passed in <N> s (tests: <n> passed in <s>s)" in header
    assert 'echo "== gpu_check: all stages passed in' in text


@pytest.fixture
def broken_checkout(tmp_path):
    """A copy of the script and the files its dry run reads, without csrc/cuda/kernels.cu."""
    root = tmp_path / "repo"
    for d in ("benchmarks", "tests", "sgg_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, d), root / d, ignore=shutil.ignore_patterns("__pycache__", "out", "*.so"))
    shutil.copy(os.path.join(ROOT, "setup.py"), root / "setup.py")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), root / "pyproject.toml")
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    return root


def test_dry_run_fails_without_sources_or_with_cuda_tests_left_out(broken_checkout):
    # the failures named must be the missing source and the CUDA test file outside TEST_FILES (the
    # other preconditions hold in the copy)
    os.remove(broken_checkout / "csrc" / "cuda" / "kernels.cu")
    (broken_checkout / "tests" / "test_new_cuda_thing.py").write_text(
        "import pytest\n\ncuda = pytest.mark.cuda\n\n\n@cuda\ndef test_it():\n    pass\n")
    r = _run(broken_checkout, GPU_CHECK_DRY_RUN="1")
    assert r.returncode != 0 and "FAILED: build" in r.stdout, r.stdout
    assert "FAILED: tests: tests/test_new_cuda_thing.py holds tests selected by -m cuda but is not in TEST_FILES" \
        in r.stdout, r.stdout
    assert r.stdout.count("FAILED:") == 2, r.stdout


def test_timebox_plugin_fails_a_test_that_runs_over_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\n\n\ndef test_slow():\n    time.sleep(30)\n\n\ndef test_next():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "SGG_TEST_TIMEOUT": "1"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_timebox",
           "-c", os.devnull, str(tmp_path / "test_slow.py")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=25)
    assert "test_slow.py::test_slow FAILED" in r.stdout and "test_slow.py::test_next PASSED" in r.stdout, r.stdout
    assert "ran over its 1 s limit" in r.stdout, r.stdout


def test_dry_run_fails_with_a_python_without_torch(tmp_path):
    fake = tmp_path / "python_without_torch"
    fake.write_text("#!/bin/sh\nexec /usr/bin/env -i /bin/sh -c 'exit 1'\n")
    fake.chmod(0o755)
    r = _run(ROOT, GPU_CHECK_DRY_RUN="1", PYTHON=str(fake))
    assert r.returncode != 0 and "FAILED: interpreter" in r.stdout, r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a real GPU is visible")
def test_run_without_cuda_reports_failure(tmp_path):
    out = tmp_path / "out"
    r = _run(ROOT, OUT=str(out), CUDA_VISIBLE_DEVICES="")
    assert r.returncode != 0, r.stdout + r.stderr
    files = sorted(os.listdir(out))
    assert files == ["gpu_check_logs.tar.gz", "report.md"], files
    report = (out / "report.md").read_text()
    assert "**FAILED**" in report and "torch.cuda.is_available() is False" in report
    assert "all stages passed" not in report
