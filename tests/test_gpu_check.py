"""benchmarks/gpu_check.sh, the script of a lent GPU's one short run, checked without a GPU: its
dry run walks every stage's preconditions and passes here, fails when one is broken, promises at
most 8 result files; a real run on a machine without CUDA reports failure (exit status != 0)
and leaves only its report and its archive."""

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


def test_dry_run_passes_here():
    r = _run(ROOT, GPU_CHECK_DRY_RUN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run" in r.stdout
    assert 1 <= _result_files(r.stdout) <= 8
    assert re.search(r"tests: pytest -m cuda tests: [1-9]\d* tests selected", r.stdout), r.stdout
    assert "budget: stage boxes sum to" in r.stdout and "≤" in r.stdout


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


def test_dry_run_fails_without_sources(broken_checkout):
    # the failure named must be the missing source (the other preconditions hold in the copy)
    os.remove(broken_checkout / "csrc" / "cuda" / "kernels.cu")
    r = _run(broken_checkout, GPU_CHECK_DRY_RUN="1")
    assert r.returncode != 0 and "FAILED: build" in r.stdout, r.stdout


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
