"""amsgrad in the Triton apply kernel: SGGAdamW(backend="triton", amsgrad=True) with every λ = 0
is torch.optim.AdamW(amsgrad=True) (state ``max_exp_avg_sq`` under torch's name), with default
λs it is SGGAdamW(backend="torch", amsgrad=True), and amsgrad is a per-tensor switch (meta column
VM) so one launch serves groups with and without it.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` and on CUDA tensors when a GPU is present."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")  # noqa: E402

import _amsgrad_common as A  # noqa: E402
from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.backends import triton_backend as TB  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERP else "cuda"
if not INTERP:
    # on CUDA tensors: every test of this file is a GPU test (benchmarks/gpu_check.sh runs -m cuda)
    _why = "needs TRITON_INTERPRET=1 (CPU) or a CUDA device"
    pytestmark = [pytest.mark.cuda] + ([] if torch.cuda.is_available() else [pytest.mark.skip(reason=_why)])

SHAPES = [(65, 33), (5000,), (3,)]  # 5000 elements span three chunks of 2048 (fixture below)
# the compiled kernel's √ and ÷ are within 2 ulp: twice the interpreter's (IEEE) bound
RTOL, ATOL = A.tolerances(A.ULPS_PER_STEP if INTERP else 2 * A.ULPS_PER_STEP)
LR, BETAS, WD = A.LR, A.BETAS, A.WD


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 2 blocks (2048 elements), so that a tensor spans several chunks."""
    from sgg_fast.kernels import stats as kstats

    monkeypatch.setattr(TB, "CHUNK_OVERRIDE", 2 * kstats.BLOCK)


def _grads(k: int, gen: torch.Generator):
    return A.grads(SHAPES, k, gen)


def _run(make, dtype, steps=A.STEPS):
    return A.run(make, SHAPES, dtype, DEVICE, steps)


def _sgg(amsgrad, backend="triton", **lambdas):
    return A.sgg(amsgrad, backend, **lambdas)


def test_amsgrad_matches_torch_adamw():
    A.check_matches_torch_adamw("triton", SHAPES, DEVICE, RTOL, ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_with_guidance_matches_torch_backend(dtype):
    got, opt = _run(_sgg(True), dtype)
    assert opt._engine._resolved.name == "triton"
    ref, ref_opt = _run(_sgg(True, backend="torch"), dtype)
    plain, _ = _run(_sgg(False, backend="torch"), dtype)
    # the tolerances of test_triton_kernels.test_step_matches_torch_backend
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for g, r, q in zip(got, ref, plain):
        torch.testing.assert_close(g.detach(), r.detach(), **tol)
        # premise: without amsgrad the result is outside the tolerance (fp32: far outside; the
        # bf16 tolerance is wide, 6 steps of lr 1e-2 move p by a few of its ulps)
        diff = (q.detach().float() - r.detach().float()).abs()
        far = 10 if dtype == torch.float32 else 1
        assert bool((diff > far * (tol["atol"] + tol["rtol"] * r.detach().float().abs())).any())
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[g][k], ref_opt.state[r][k], **tol)
        assert opt.state[g]["max_exp_avg_sq"].dtype == dtype


def test_without_amsgrad_the_plain_kernel_runs():
    _, opt = _run(_sgg(False), torch.float32, steps=1)
    assert opt._engine._resolved.name == "triton"
    assert opt._engine.cache.triton.amsgrad is False  # the kernel compiled with AMS=False
    assert all("max_exp_avg_sq" not in opt.state[p] for g in opt.param_groups for p in g["params"])


def test_amsgrad_per_group_and_loaded_from_adamw():
    opt = A.check_per_group_and_loaded_from_adamw("triton", SHAPES, DEVICE, RTOL, ATOL)
    assert opt._engine.cache.triton.amsgrad is True  # one launch: VM = 0 for the last tensor


def test_amsgrad_mixed_dtypes_in_one_launch_match_torch_backend():
    """fp32 and bf16 tensors of one amsgrad group in one launch (the kernel's per-tensor dtype
    dispatch, DT = -1, with AMS): each as SGGAdamW(backend="torch")."""
    res = {}
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(5)
        ps = [torch.randn(s, generator=gen).to(DEVICE, dt).requires_grad_()
              for s, dt in zip(SHAPES, (torch.float32, torch.bfloat16, torch.float32))]
        opt = SGGAdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=True, backend=backend)
        for k in range(4):
            for p, g in zip(ps, _grads(k, gen)):
                p.grad = g.to(DEVICE, p.dtype)
            opt.step()
        assert opt._engine._resolved.name == backend
        res[backend] = [(p.detach(), opt.state[p]["max_exp_avg_sq"]) for p in ps]
    for (x, vx), (y, vy) in zip(res["triton"], res["torch"]):
        tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(x, y, **tol)
        torch.testing.assert_close(vx, vy, **tol)
        assert vx.dtype == x.dtype
