"""torch.compile(opt.step) with the default compiler (inductor) on the cpu backend: the compiled
step equals the eager step bitwise, whether an eager step loaded the extension first or the
compiled step is the first thing that touches it (a fresh process; issue #12 item 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sgg_fast import _ext

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.error()}", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the same code runs here (eager first) and in a fresh process (compile first)
_CASE = r"""
import torch
from sgg_fast import SGGAdamW, _ext

SHAPES = [(100, 10), (37,), (50,)]


def make():
    torch.manual_seed(0)
    ps = [torch.randn(s, requires_grad=True) for s in SHAPES]
    groups = [{"params": ps[:1]}, {"params": ps[1:2], "reference": "ema", "mag_mode": "param"},
              {"params": ps[2:], "amsgrad": True}]
    return ps, SGGAdamW(groups, lr=1e-2, lambda_dir=0.3, lambda_mag=0.8, lambda_align=1.0, backend="cpu")


def grads(k):
    gen = torch.Generator().manual_seed(k)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def run(eager_first):
    pe, oe = make()
    pc, oc = make()
    step = torch.compile(oc.step, backend="inductor")
    for k in range(3):
        for a, b, g in zip(pe, pc, grads(k)):
            a.grad, b.grad = g.clone(), g.clone()
        oe.step()
        if eager_first and k == 0:
            oc.step()
        else:
            step()
    assert oc._engine._resolved.name == "cpu"
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # premise: inductor compiled graphs of the step
    for a, b in zip(pe, pc):
        assert torch.equal(a, b), (a - b).abs().max()
        for k, v in oe.state[a].items():
            assert torch.equal(v, oc.state[b][k]), k
    for k, v in oe.last_stats().items():
        assert torch.equal(v, oc.last_stats()[k]), k
"""


def test_inductor_step_eager_first():
    ns: dict = {}
    exec(compile(_CASE, "<case>", "exec"), ns)
    ns["run"](True)


def test_inductor_step_compile_first():
    code = _CASE + "\nassert not _ext.loaded()\nrun(False)\nassert _ext.loaded()\nprint('compiled ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
                          timeout=900)
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stderr[-4000:]
