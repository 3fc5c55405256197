"""sgg_fast.losses.guidance_penalty (DESIGN §1.8): the paper's regularised loss by double backward.

Independent references: the penalty value from a central finite-difference gradient of the loss
(float64, written from the formula), and torch.autograd.gradcheck of the penalty's gradient (the
double backward) against finite differences of its value.
"""

from __future__ import annotations

import math

import pytest
import torch

from sgg_fast.losses import guidance_penalty

F64 = torch.float64


def _problem(seed=0, dtype=F64, scale=1.0):
    """A small two-layer net: params (w1, b1, w2, b2), data (x, y), and a reference per param."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (5,), (3, 5), (3,)]
    params = [(torch.randn(s, generator=g, dtype=F64) * scale).to(dtype).requires_grad_() for s in shapes]
    x = torch.randn(7, 4, generator=g, dtype=F64).to(dtype)
    y = torch.randn(7, 3, generator=g, dtype=F64).to(dtype)
    refs = [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in shapes]
    return params, x, y, refs


def _loss(params, x, y):
    w1, b1, w2, b2 = params
    h = torch.tanh(x @ w1.T + b1)
    return ((h @ w2.T + b2 - y) ** 2).mean()


def _fd_grad(params, x, y, h=1e-6):
    """Central differences of the loss, float64, one coordinate at a time."""
    flat = torch.cat([p.detach().reshape(-1) for p in params]).to(F64)
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def f(v):
        ps = [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)]
        return float(_loss(ps, x.to(F64), y.to(F64)))

    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        out[i] = (f(flat + e) - f(flat - e)) / (2 * h)
    return out


def _formula(g: torch.Tensor, r: torch.Tensor, l1: float, l2: float, tau: float) -> float:
    """The penalty written from DESIGN §1.8 with plain Python floats."""
    gg = float((g * g).sum())
    rr = float((r * r).sum())
    gr = float((g * r).sum())
    n = math.sqrt(gg)
    cos = gr / (n * math.sqrt(rr)) if n > 0 and rr > 0 else 0.0
    return l1 * (1 - cos) + l2 * 0.5 * max(0.0, n - tau) ** 2


@pytest.mark.parametrize("l1,l2,tau", [(0.7, 0.0, 1.0), (0.0, 0.9, 0.05), (0.3, 2.0, 0.1), (0.5, 1.0, 0.0)])
def test_value_matches_finite_difference_gradient(l1, l2, tau):
    params, x, y, refs = _problem()
    loss = _loss(params, x, y)
    pen = guidance_penalty(loss, params, refs, l1, l2, tau)
    g_fd = _fd_grad(params, x, y)
    r = torch.cat([t.reshape(-1) for t in refs])
    want = _formula(g_fd, r, l1, l2, tau)
    assert pen.dtype == F64 and pen.dim() == 0
    assert float(pen.detach()) == pytest.approx(want, rel=1e-7, abs=1e-9)
    # the magnitude term is active in the cases that ask for it (the test is not vacuous)
    if l2 > 0:
        assert float(g_fd.norm()) > tau


@pytest.mark.parametrize("l1,l2,tau", [(0.7, 0.0, 1.0), (0.0, 0.9, 0.05), (0.3, 2.0, 0.1)])
def test_gradcheck_double_backward(l1, l2, tau):
    """The gradient of the penalty (a double backward through ∇L) against finite differences."""
    params, x, y, refs = _problem(seed=1)

    def f(*ps):
        return guidance_penalty(_loss(ps, x, y), ps, refs, l1, l2, tau)

    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-6, rtol=1e-5)

    def total(*ps):  # what (loss + penalty).backward() differentiates
        loss = _loss(ps, x, y)
        return loss + guidance_penalty(loss, ps, refs, l1, l2, tau)

    assert torch.autograd.gradcheck(total, tuple(params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_trains_regularised_loss():
    """``(loss + P).backward()`` leaves ∇L + ∇P in .grad; ∇P is not zero (the graph was kept)."""
    params, x, y, refs = _problem(seed=2)
    loss = _loss(params, x, y)
    (loss + guidance_penalty(loss, params, refs, 0.5, 1.0, 0.01)).backward()
    got = [p.grad.clone() for p in params]
    ps2 = [p.detach().clone().requires_grad_() for p in params]
    g_loss = torch.autograd.grad(_loss(ps2, x, y), ps2)
    loss2 = _loss(ps2, x, y)
    g_pen = torch.autograd.grad(guidance_penalty(loss2, ps2, refs, 0.5, 1.0, 0.01), ps2)
    for a, b, c in zip(got, g_loss, g_pen):
        torch.testing.assert_close(a, b + c, rtol=1e-10, atol=1e-12)
    assert sum(float(c.abs().sum()) for c in g_pen) > 1e-3


def test_zero_reference():
    """r = 0: cos is taken as 0, the direction term is the constant λ1 with no gradient."""
    params, x, y, _ = _problem(seed=3)
    zero = [None, torch.zeros(5, dtype=F64), None, torch.zeros(3, dtype=F64)]
    pen = guidance_penalty(_loss(params, x, y), params, zero, 0.4, 1.0, 0.05)
    only_mag = guidance_penalty(_loss(params, x, y), params, None, 0.0, 1.0, 0.05)
    assert float(pen) == pytest.approx(0.4 + float(only_mag), rel=1e-12)
    g1 = torch.autograd.grad(pen, params)
    g2 = torch.autograd.grad(only_mag, params)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_norm_below_threshold_is_inactive():
    """‖∇L‖ ≤ τ: the magnitude term is exactly 0 with a zero gradient."""
    params, x, y, refs = _problem(seed=4)
    loss = _loss(params, x, y)
    n = float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]).norm())
    pen = guidance_penalty(loss, params, None, 0.0, 3.0, n * 1.01)
    assert float(pen) == 0.0
    for gp in torch.autograd.grad(pen, params, allow_unused=True):
        assert gp is None or torch.equal(gp, torch.zeros_like(gp))
    # just above the threshold it is active again (the test above is not vacuous)
    pen = guidance_penalty(_loss(params, x, y), params, None, 0.0, 3.0, n * 0.99)
    assert float(pen) == pytest.approx(3.0 * 0.5 * (0.01 * n) ** 2, rel=1e-6)


def test_zero_gradient_gives_no_nan():
    """∇L = 0 (loss at a stationary point): penalty λ1, finite zero gradients."""
    p = torch.zeros(4, dtype=F64, requires_grad=True)
    q = torch.randn(3, dtype=F64, requires_grad=True)
    loss = (p ** 2).sum() + 0.0 * q.sum()  # ∂/∂p = 2p = 0 at p = 0, ∂/∂q = 0
    pen = guidance_penalty(loss, [p, q], [torch.ones(4, dtype=F64), torch.ones(3, dtype=F64)], 0.3, 1.0, 0.0)
    assert float(pen) == pytest.approx(0.3)
    (loss + pen).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert torch.equal(p.grad, torch.zeros(4, dtype=F64))


def test_unused_parameter_and_dict_reference():
    params, x, y, refs = _problem(seed=5)
    unused = torch.randn(6, dtype=F64, requires_grad=True)
    loss = _loss(params, x, y)
    a = guidance_penalty(loss, params + [unused], {p: r for p, r in zip(params, refs)}, 0.6, 0.5, 0.02)
    b = guidance_penalty(_loss(params, x, y), params, refs, 0.6, 0.5, 0.02)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_float32_model_agrees_with_float64():
    params, x, y, refs = _problem(seed=6)
    p32 = [p.detach().float().requires_grad_() for p in params]
    a = guidance_penalty(_loss(p32, x.float(), y.float()), p32, [r.float() for r in refs], 0.3, 1.0, 0.05)
    b = guidance_penalty(_loss(params, x, y), params, refs, 0.3, 1.0, 0.05)
    assert a.dtype == torch.float32
    assert float(a) == pytest.approx(float(b), rel=1e-4)


def test_both_weights_zero_is_zero():
    params, x, y, refs = _problem()
    pen = guidance_penalty(_loss(params, x, y), params, refs, 0.0, 0.0, 1.0)
    assert float(pen) == 0.0


def test_bad_input():
    params, x, y, refs = _problem()
    loss = _loss(params, x, y)
    with pytest.raises(ValueError, match="scalar"):
        guidance_penalty(torch.ones(2, requires_grad=True), params, refs, 0.1, 0.1, 1.0)
    with pytest.raises(ValueError, match="does not require grad"):
        guidance_penalty(loss.detach(), params, refs, 0.1, 0.1, 1.0)
    with pytest.raises(ValueError, match="lambda_dir"):
        guidance_penalty(loss, params, refs, -0.1, 0.1, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        guidance_penalty(loss, params, refs, 0.1, 0.1, float("nan"))
    with pytest.raises(ValueError, match="reference"):
        guidance_penalty(loss, params, None, 0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match="2 references for 4"):
        guidance_penalty(loss, params, refs[:2], 0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        guidance_penalty(loss, params, [refs[1]] + refs[1:], 0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        guidance_penalty(loss, [], refs, 0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        guidance_penalty(loss, [params[0], torch.zeros(3)], None, 0.0, 0.1, 1.0)
