"""Run the three mirrors of the finalize math on the same hand-built inputs.

* ``torch``:  ``sgg_fast.guidance.finalize`` (the torch backend's, and the Python home);
* ``cpu``:    the compiled op ``torch.ops.sgg_fast.sgg_finalize`` (``finalize_row`` in
  ``csrc/sgg_common.h``), with one float32 [2] ``(ν, initialised)`` tensor per segment;
* ``triton``: ``kernels/stats.py``'s ``_finalize_kernel`` through Triton's interpreter. Triton
  reads ``TRITON_INTERPRET`` once, at import: when this process was not started with it, the
  kernel runs in a child process that was (inputs and outputs through a file).

:func:`run` returns ``(out, nu_after)``: the ``[S, len(OUT_COLS)]`` output and the ``[S, 2]``
ν state after the call (the compiled and Triton mirrors write it in place; for ``torch`` it is
what a caller stores: the ``norm_ema``/``norm_ema_init`` columns).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

from sgg_fast import guidance as G

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRRORS = ("torch", "cpu", "triton")


def _cpu_reason() -> str | None:
    from sgg_fast import _ext

    return None if _ext.load() else f"compiled extension unavailable: {_ext.error()}"


def unavailable(name: str) -> str | None:
    """Why mirror ``name`` cannot run here (None: it can)."""
    if name == "cpu":
        return _cpu_reason()
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _run_triton_here(stats, hyper, nu, max_seg_block=None):
    from sgg_fast.kernels import stats as kstats

    kw = {} if max_seg_block is None else dict(max_seg_block=max_seg_block)

    S = stats.shape[0]
    nus = [nu[s].clone().contiguous() for s in range(S)]
    segs = torch.tensor([[s, s + 1, nus[s].data_ptr()] for s in range(S)], dtype=torch.int64).reshape(S, 3)
    red = torch.empty(S, 4)
    out = torch.empty(S, len(G.OUT_COLS))
    kstats.launch_finalize(stats.contiguous(), segs, hyper.contiguous(), stats, red, out, nu_mode=2, **kw)
    # the same through the [S, 2] input (nu_mode 1), which must give the same columns
    out1 = torch.empty_like(out)
    kstats.launch_finalize(stats.contiguous(), segs, hyper.contiguous(), nu.contiguous(), red, out1, nu_mode=1, **kw)
    assert torch.equal(out.nan_to_num(7.0), out1.nan_to_num(7.0)), "triton nu_mode 1 and 2 disagree"
    return out, torch.stack(nus) if S else torch.zeros(0, 2)


_CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import _finalize_mirrors as M
stats, hyper, nu, sb = torch.load({inp!r})
torch.save(M._run_triton_here(stats, hyper, nu, sb), {outp!r})
"""


def _run_triton(stats, hyper, nu, max_seg_block=None):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _run_triton_here(stats, hyper, nu, max_seg_block)
    with tempfile.TemporaryDirectory() as d:
        inp, outp = os.path.join(d, "in.pt"), os.path.join(d, "out.pt")
        torch.save((stats, hyper, nu, max_seg_block), inp)
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        code = _CHILD.format(tests=os.path.join(REPO, "tests"), inp=inp, outp=outp)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return torch.load(outp)


def run(name: str, stats: torch.Tensor, hyper: torch.Tensor, nu: torch.Tensor, max_seg_block=None):
    """``(out, nu_after)`` of mirror ``name`` on float32 CPU inputs (stats [S,4], hyper [S,H],
    nu [S,2]). ``max_seg_block``: the Triton kernel's tile of segments (default: the
    launcher's); a large one makes the interpreter much faster on many segments."""
    stats, hyper, nu = (x.to(torch.float32).contiguous() for x in (stats, hyper, nu.reshape(-1, 2)))
    if name == "torch":
        out = G.finalize(stats, hyper, nu)
        return out, out[:, [G.O_NU, G.O_NUINIT]].clone()
    if name == "cpu":
        S = stats.shape[0]
        nus = [nu[s].clone() for s in range(S)]
        out = torch.ops.sgg_fast.sgg_finalize(stats, torch.arange(S + 1, dtype=torch.int64), hyper, nus)
        return out, torch.stack(nus) if S else torch.zeros(0, 2)
    if name == "triton":
        return _run_triton(stats, hyper, nu, max_seg_block)
    raise ValueError(name)


def hyper(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0, mag_mode="absolute", max_norm=1e30,
          mag_ratio=2.0, mag_beta=0.9, maximize=False, reference="momentum", rewrite_grad=False):
    """One HYPER_COLS row."""
    return G.hyper_row(dict(lambda_dir=lambda_dir, lambda_mag=lambda_mag, lambda_align=lambda_align,
                            mag_mode=mag_mode, max_norm=max_norm, mag_ratio=mag_ratio, mag_beta=mag_beta,
                            maximize=maximize, reference=reference), rewrite_grad=rewrite_grad)
