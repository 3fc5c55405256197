"""amsgrad in the compiled CPU apply kernel: SGGAdamW(backend="cpu", amsgrad=True) with every
λ = 0 is torch.optim.AdamW(amsgrad=True), state max_exp_avg_sq under torch's name, and the cpu
backend runs it itself (no fallback to backend="torch")."""

from __future__ import annotations

import copy

import pytest
import torch

from sgg_fast import SGGAdamW, _ext

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.error()}", allow_module_level=True)

SHAPES = [(257, 129), (70001,), (3,)]
STEPS = 6
LR, WD = 1e-2, 0.1
BETAS = (0.9, 0.5)  # a short second-moment memory: v falls far below its running maximum
U = 2.0 ** -24  # fp32 unit roundoff
# Per step the fp32 kernel rounds ~10 operations per element (m, v, max, √, ÷, +eps, decay,
# p update), each error ≤ u relative, and carries the previous steps' errors forward: ≤ 16·u
# per step relative to |p| plus the same relative to the update (≤ lr·~3 for these gradients).
RTOL = 16 * STEPS * U
ATOL = 16 * STEPS * U * LR * 3


def _grads(k: int, gen: torch.Generator):
    # large gradients first, then small ones: v decays below its running maximum, so amsgrad's
    # denominator differs from AdamW's
    scale = 10.0 if k < 2 else 0.1
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]


def _run(make, dtype):
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    opt = make(ps)
    for k in range(STEPS):
        for p, g in zip(ps, _grads(k, gen)):
            p.grad = g.to(dtype)
        opt.step()
    return ps, opt


def _sgg(amsgrad):
    def make(ps):
        return SGGAdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, lambda_dir=0.0, lambda_mag=0.0,
                        lambda_align=0.0, backend="cpu")
    return make


def _adamw(amsgrad):
    return lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, weight_decay=WD, amsgrad=amsgrad, foreach=False)


def test_amsgrad_matches_torch_adamw():
    got, opt = _run(_sgg(True), torch.float32)
    assert opt._engine._resolved.name == "cpu"
    ref, ref_opt = _run(_adamw(True), torch.float64)
    plain, _ = _run(_adamw(False), torch.float64)
    for g, r, q in zip(got, ref, plain):
        torch.testing.assert_close(g.detach().double(), r.detach(), rtol=RTOL, atol=ATOL)
        # premise: amsgrad changes the result by far more than the tolerance
        assert (q - r).abs().max() > 100 * (ATOL + RTOL * r.abs().max())
    for g, r in zip(got, ref):
        st, rst = opt.state[g], ref_opt.state[r]
        torch.testing.assert_close(st["max_exp_avg_sq"].double(), rst["max_exp_avg_sq"], rtol=RTOL, atol=0.0)
        assert bool((st["max_exp_avg_sq"] > st["exp_avg_sq"]).any())


def test_amsgrad_per_group_and_loaded_from_adamw():
    """One group with amsgrad, one without (the kernel's per-tensor switch); then a torch
    AdamW(amsgrad=True) checkpoint continues in SGGAdamW[cpu] like AdamW."""
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    b = [t.detach().clone().requires_grad_() for t in a]
    opt = SGGAdamW([{"params": a[:2], "amsgrad": True}, {"params": a[2:]}], lr=LR, lambda_dir=0.0,
                   lambda_mag=0.0, lambda_align=0.0, backend="cpu")
    ref = torch.optim.AdamW([{"params": b[:2], "amsgrad": True}, {"params": b[2:]}], lr=LR, foreach=False)
    for k in range(4):
        for x, y, g in zip(a, b, _grads(k, gen)):
            x.grad, y.grad = g.float(), g.float()
        opt.step()
        ref.step()
    assert opt._engine._resolved.name == "cpu"
    assert "max_exp_avg_sq" not in opt.state[a[2]]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)

    c = [t.detach().clone().requires_grad_() for t in b]
    resumed = SGGAdamW([{"params": c[:2], "amsgrad": True}, {"params": c[2:]}], lr=LR, lambda_dir=0.0,
                       lambda_mag=0.0, lambda_align=0.0, backend="cpu")
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from disk: no shared tensors
    for k in range(2):
        for x, y, g in zip(c, b, _grads(k + 4, gen)):
            x.grad, y.grad = g.float(), g.float()
        resumed.step()
        ref.step()
    for x, y in zip(c, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(resumed.state[x]["max_exp_avg_sq"] if "max_exp_avg_sq" in resumed.state[x]
                                   else torch.zeros(()), ref.state[y].get("max_exp_avg_sq", torch.zeros(())),
                                   rtol=RTOL, atol=0.0)


def test_amsgrad_bad_state_is_rejected_before_any_write():
    ops = torch.ops.sgg_fast
    from sgg_fast.guidance import OUT_COLS

    p, g, m, v = torch.randn(10), torch.randn(10), torch.zeros(10), torch.zeros(10)
    step = torch.zeros(())
    out = torch.zeros(1, len(OUT_COLS))
    out[0, OUT_COLS.index("alpha")] = 1.0
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs\[0\] has shape"):
        ops.sgg_adamw_apply([p], [g], [m], [v], [step], [torch.empty(0)], out, [0], [LR], [0.9], [0.999],
                            [1e-8], [0.0], [0.9], [0], [], [torch.zeros(9)])
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs must be empty or have one entry per parameter"):
        ops.sgg_adamw_apply([p], [g], [m], [v], [step], [torch.empty(0)], out, [0], [LR], [0.9], [0.999],
                            [1e-8], [0.0], [0.9], [0], [], [torch.zeros(10), torch.zeros(10)])
    assert torch.equal(p, before) and float(step) == 0.0
