"""The build of the compiled extension: the lazy import (no extension loaded until a step needs
it), the JIT build when no prebuilt sgg_fast._C exists, and the fallback to the torch backend with
a clear report when the build fails. Numerics of the ops are tests/test_csrc.py."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from sgg_fast import SGGAdamW

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=full, timeout=timeout)


# ---- lazy import and the JIT fallback ----------------------------------------------------------
def test_import_and_listing_do_not_load_the_extension():
    code = ("import sys, sgg_fast, torch; print(sgg_fast.available_backends())\n"
            "assert 'sgg_fast._C' not in sys.modules\n"
            "try:\n    torch._C._dispatch_find_schema_or_throw('sgg_fast::sgg_stats', ''); sys.exit('ops registered')\n"
            "except RuntimeError:\n    pass\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "'cpu'" in res.stdout


def test_auto_picks_cpu_for_cpu_tensors():
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    opt = SGGAdamW([p])
    opt.step()
    assert opt._engine._resolved.name == "cpu"


def test_failed_build_falls_back_to_torch_and_info_shows_it():
    env = {"SGG_FAST_NO_PREBUILT": "1", "CXX": "/nonexistent/c++",
           "SGG_FAST_JIT_DIR": os.path.join(REPO, "build", "jit-fail")}
    code = ("import warnings, torch, sgg_fast\n"
            "p = torch.randn(4, requires_grad=True); p.grad = torch.randn(4)\n"
            "opt = sgg_fast.SGGAdamW([p])\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); opt.step()\n"
            "assert opt._engine._resolved.name == 'torch', opt._engine._resolved.name\n"
            "assert any('C++ extension unavailable' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "from sgg_fast import info; info.main()\n")
    res = _run(code, env)
    assert res.returncode == 0, res.stdout + res.stderr
    cpu_line = [ln for ln in res.stdout.splitlines() if ln.startswith("cpu ")]
    assert cpu_line and "unavailable" in cpu_line[0] and "JIT build failed" in cpu_line[0], res.stdout
    with_forced = _run("import torch, sgg_fast\np = torch.randn(4, requires_grad=True); p.grad = torch.randn(4)\n"
                       "sgg_fast.SGGAdamW([p], backend='cpu').step()", env)
    assert with_forced.returncode != 0 and "backend='cpu' cannot run this step" in with_forced.stderr


def test_jit_build_fallback(tmp_path):
    """Without the prebuilt sgg_fast._C the first step JIT-builds csrc/ (cached build dir)."""
    env = {"SGG_FAST_NO_PREBUILT": "1", "SGG_FAST_SKIP_CUDA": "1",
           "SGG_FAST_JIT_DIR": os.path.join(REPO, "build", "jit-test")}
    code = ("import torch, sgg_fast, sys\nfrom sgg_fast import _ext\n"
            "p = torch.randn(70, requires_grad=True); q = p.detach().clone().requires_grad_()\n"
            "a = sgg_fast.SGGAdamW([p], lr=0.1, backend='cpu'); b = sgg_fast.SGGAdamW([q], lr=0.1, backend='torch')\n"
            "for _ in range(3):\n"
            "    g = torch.randn(70); p.grad = g.clone(); q.grad = g.clone(); a.step(); b.step()\n"
            "assert _ext.how() == 'jit', _ext.how()\nassert 'sgg_fast._C' not in sys.modules\n"
            "torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)\nprint('ok')")
    res = _run(code, env, timeout=1800)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr[-4000:]
