"""amsgrad in the Triton apply kernel: SGGAdamW(backend="triton", amsgrad=True) with every λ = 0
is torch.optim.AdamW(amsgrad=True) (state ``max_exp_avg_sq`` under torch's name), with default
λs it is SGGAdamW(backend="torch", amsgrad=True), and amsgrad is a per-tensor switch (meta column
VM) so one launch serves groups with and without it.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` and on CUDA tensors when a GPU is present."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")  # noqa: E402

from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.backends import triton_backend as TB  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERP else "cuda"
if not INTERP and not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")

SHAPES = [(65, 33), (5000,), (3,)]  # 5000 elements span three chunks of 2048 (fixture below)
STEPS = 6
LR, WD = 1e-2, 0.1
BETAS = (0.9, 0.5)  # a short second-moment memory: v falls far below its running maximum
U = 2.0**-24  # fp32 unit roundoff
# Per step the fp32 kernel rounds ~10 operations per element (m, v, max, √, ÷, +eps, decay,
# p update), each error ≤ u relative, and carries the previous steps' errors forward: ≤ 16·u
# per step relative to |p| plus the same relative to the update (≤ lr·~3 for these gradients).
# The compiled kernel's √ and ÷ are within 2 ulp: twice that.
RTOL = (16 if INTERP else 32) * STEPS * U
ATOL = RTOL * LR * 3
ZERO = dict(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 2 blocks (2048 elements), so that a tensor spans several chunks."""
    from sgg_fast.kernels import stats as kstats

    monkeypatch.setattr(TB, "CHUNK_OVERRIDE", 2 * kstats.BLOCK)


def _grads(k: int, gen: torch.Generator):
    # large gradients first, then small ones: v decays below its running maximum, so amsgrad's
    # denominator differs from AdamW's
    scale = 10.0 if k < 2 else 0.1
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]


def _run(make, dtype, steps=STEPS):
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_() for s in SHAPES]
    opt = make(ps)
    for k in range(steps):
        for p, g in zip(ps, _grads(k, gen)):
            p.grad = g.to(DEVICE, dtype)
        opt.step()
    return ps, opt


def _sgg(amsgrad, backend="triton", **lambdas):
    def make(ps):
        return SGGAdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, backend=backend, **lambdas)

    return make


def _adamw(amsgrad):
    return lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, foreach=False)


def test_amsgrad_matches_torch_adamw():
    got, opt = _run(_sgg(True, **ZERO), torch.float32)
    assert opt._engine._resolved.name == "triton"
    ref, ref_opt = _run(_adamw(True), torch.float64)
    plain, _ = _run(_adamw(False), torch.float64)
    for g, r, q in zip(got, ref, plain):
        torch.testing.assert_close(g.detach().double(), r.detach(), rtol=RTOL, atol=ATOL)
        # premise: amsgrad changes the result by far more than the tolerance
        assert (q - r).abs().max() > 100 * (ATOL + RTOL * r.abs().max())
    for g, r in zip(got, ref):
        st, rst = opt.state[g], ref_opt.state[r]
        torch.testing.assert_close(st["max_exp_avg_sq"].double(), rst["max_exp_avg_sq"], rtol=RTOL, atol=0.0)
        torch.testing.assert_close(st["exp_avg_sq"].double(), rst["exp_avg_sq"], rtol=RTOL, atol=0.0)
        assert bool((st["max_exp_avg_sq"] > st["exp_avg_sq"]).any())


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
    """One group with amsgrad, one without (the kernel's per-tensor switch); then a torch
    AdamW(amsgrad=True) checkpoint continues in SGGAdamW[triton] like AdamW."""
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in SHAPES]
    b = [t.detach().clone().requires_grad_() for t in a]
    groups = lambda ps: [{"params": ps[:2], "amsgrad": True}, {"params": ps[2:]}]  # noqa: E731
    opt = SGGAdamW(groups(a), lr=LR, betas=BETAS, backend="triton", **ZERO)
    ref = torch.optim.AdamW(groups(b), lr=LR, betas=BETAS, foreach=False)
    for k in range(4):
        for x, y, g in zip(a, b, _grads(k, gen)):
            x.grad, y.grad = g.float().to(DEVICE), g.float().to(DEVICE)
        opt.step()
        ref.step()
    assert opt._engine._resolved.name == "triton"
    assert opt._engine.cache.triton.amsgrad is True  # one launch: VM = 0 for the last tensor
    assert "max_exp_avg_sq" not in opt.state[a[2]]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)

    c = [t.detach().clone().requires_grad_() for t in b]
    resumed = SGGAdamW(groups(c), lr=LR, betas=BETAS, backend="triton", **ZERO)
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from disk: no shared tensors
    for k in range(2):
        for x, y, g in zip(c, b, _grads(k + 4, gen)):
            x.grad, y.grad = g.float().to(DEVICE), g.float().to(DEVICE)
        resumed.step()
        ref.step()
    assert resumed._engine._resolved.name == "triton"
    for x, y in zip(c, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)
        if "max_exp_avg_sq" in ref.state[y]:
            torch.testing.assert_close(resumed.state[x]["max_exp_avg_sq"], ref.state[y]["max_exp_avg_sq"],
                                       rtol=RTOL, atol=0.0)
        else:
            assert "max_exp_avg_sq" not in resumed.state[x]


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
