"""The amsgrad checks shared by the compiled backends (tests/test_cpu_amsgrad.py,
tests/test_triton_amsgrad.py): SGGAdamW(amsgrad=True) with every λ = 0 is
torch.optim.AdamW(amsgrad=True), state ``max_exp_avg_sq`` under torch's name, per group, and
resumed from an AdamW checkpoint."""

from __future__ import annotations

import copy

import torch

from sgg_fast import SGGAdamW

STEPS = 6
LR, WD = 1e-2, 0.1
BETAS = (0.9, 0.5)  # a short second-moment memory: v falls far below its running maximum
U = 2.0**-24  # fp32 unit roundoff
# Per step the fp32 kernel rounds ~10 operations per element (m, v, max, √, ÷, +eps, decay,
# p update), each error ≤ u relative, and carries the previous steps' errors forward: ≤ 16·u
# per step relative to |p| plus the same relative to the update (≤ lr·~3 for these gradients).
ULPS_PER_STEP = 16
ZERO = dict(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0)


def tolerances(ulps_per_step: int = ULPS_PER_STEP) -> tuple[float, float]:
    """(rtol, atol) of STEPS fp32 steps at ``ulps_per_step`` rounding errors each."""
    rtol = ulps_per_step * STEPS * U
    return rtol, rtol * LR * 3


def grads(shapes, k: int, gen: torch.Generator):
    # large gradients first, then small ones: v decays below its running maximum, so amsgrad's
    # denominator differs from AdamW's
    scale = 10.0 if k < 2 else 0.1
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]


def run(make, shapes, dtype, device, steps=STEPS):
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]
    opt = make(ps)
    for k in range(steps):
        for p, g in zip(ps, grads(shapes, k, gen)):
            p.grad = g.to(device, dtype)
        opt.step()
    return ps, opt


def sgg(amsgrad, backend, **lambdas):
    def make(ps):
        return SGGAdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, backend=backend, **lambdas)

    return make


def adamw(amsgrad):
    return lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, foreach=False)


def check_matches_torch_adamw(backend, shapes, device, rtol, atol):
    got, opt = run(sgg(True, backend, **ZERO), shapes, torch.float32, device)
    assert opt._engine._resolved.name == backend
    ref, ref_opt = run(adamw(True), shapes, torch.float64, device)
    plain, _ = run(adamw(False), shapes, torch.float64, device)
    for g, r, q in zip(got, ref, plain):
        torch.testing.assert_close(g.detach().double(), r.detach(), rtol=rtol, atol=atol)
        # premise: amsgrad changes the result by far more than the tolerance
        assert (q - r).abs().max() > 100 * (atol + rtol * r.abs().max())
    for g, r in zip(got, ref):
        st, rst = opt.state[g], ref_opt.state[r]
        torch.testing.assert_close(st["max_exp_avg_sq"].double(), rst["max_exp_avg_sq"], rtol=rtol, atol=0.0)
        torch.testing.assert_close(st["exp_avg_sq"].double(), rst["exp_avg_sq"], rtol=rtol, atol=0.0)
        assert bool((st["max_exp_avg_sq"] > st["exp_avg_sq"]).any())
    return opt


def check_per_group_and_loaded_from_adamw(backend, shapes, device, rtol, atol):
    """One group with amsgrad, one without (the kernel's per-tensor switch); then a torch
    AdamW(amsgrad=True) checkpoint continues in SGGAdamW like AdamW. Returns the optimizer."""
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    b = [t.detach().clone().requires_grad_() for t in a]

    def groups(ps):
        return [{"params": ps[:2], "amsgrad": True}, {"params": ps[2:]}]

    opt = SGGAdamW(groups(a), lr=LR, betas=BETAS, backend=backend, **ZERO)
    ref = torch.optim.AdamW(groups(b), lr=LR, betas=BETAS, foreach=False)
    for k in range(4):
        for x, y, g in zip(a, b, grads(shapes, k, gen)):
            x.grad, y.grad = g.float().to(device), g.float().to(device)
        opt.step()
        ref.step()
    assert opt._engine._resolved.name == backend
    assert "max_exp_avg_sq" not in opt.state[a[2]]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)

    c = [t.detach().clone().requires_grad_() for t in b]
    resumed = SGGAdamW(groups(c), lr=LR, betas=BETAS, backend=backend, **ZERO)
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from disk: no shared tensors
    for k in range(2):
        for x, y, g in zip(c, b, grads(shapes, k + 4, gen)):
            x.grad, y.grad = g.float().to(device), g.float().to(device)
        resumed.step()
        ref.step()
    assert resumed._engine._resolved.name == backend
    for x, y in zip(c, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
        if "max_exp_avg_sq" in ref.state[y]:
            torch.testing.assert_close(resumed.state[x]["max_exp_avg_sq"], ref.state[y]["max_exp_avg_sq"],
                                       rtol=rtol, atol=0.0)
        else:
            assert "max_exp_avg_sq" not in resumed.state[x]
    return opt
