"""GradientGuidance: guidance in front of any torch optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from oracle import Oracle
from sgg_fast import GradientGuidance, SGGAdamW

SHAPES = [(), (1,), (97,), (4097,), (3, 5)]
SETTINGS = [
    dict(reference="momentum", mag_mode="relative", granularity="group"),
    dict(reference="ema", mag_mode="absolute", granularity="tensor", max_norm=2.0),
    dict(reference="source", mag_mode="param", granularity="global", mag_ratio=0.3),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wrapped_adamw_equals_sggadamw(backend, cfg, dtype):
    """GradientGuidance(AdamW) and SGGAdamW compute the same step (same math, two paths)."""
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    lam = dict(lambda_dir=0.5, lambda_mag=0.8, lambda_align=0.9)
    sgg = SGGAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2, backend=backend, **lam, **cfg)
    wrapped = GradientGuidance(
        torch.optim.AdamW([{"params": qs[:2]}, {"params": qs[2:], "lr": 3e-3}], lr=1e-2, fused=True),
        backend=backend, **lam, **cfg)
    if cfg["reference"] == "source":
        src = [torch.randn(p.shape) for p in ps]
        sgg.set_reference(src)
        wrapped.set_reference({q: s for q, s in zip(qs, src)})
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for step in range(5):
        for p, q in zip(ps, qs):
            g = (torch.randn(p.shape) * (1 + 2 * (step % 2))).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        sgg.step()
        wrapped.step()
        for k in ("grad_norm", "cos", "guided_norm", "mag_scale"):
            torch.testing.assert_close(wrapped.last_stats()[k], sgg.last_stats()[k], **tol)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q.float(), p.float(), **tol)


def test_wrapped_sgd_momentum_matches_oracle_guidance(backend):
    """SGD(momentum) fed the guided gradient: u from the oracle's formulas, r = momentum_buffer."""
    ps = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    opt = GradientGuidance(torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda_dir=0.3, lambda_mag=1.0,
                           lambda_align=1.0, mag_mode="absolute", max_norm=5.0, backend=backend) \
        if backend == "torch" else None
    if opt is None:
        pytest.skip("float64 parameters: only the torch backend serves them")
    bufs = [torch.zeros(p.shape, dtype=torch.float64) for p in ps]
    want = [p.detach().clone() for p in ps]
    for step in range(4):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in ps]
        # oracle for this step's guided gradient, with r = the current momentum buffer
        o = Oracle([dict(params=ps, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lambda_dir=0.3,
                         lambda_mag=1.0, lambda_align=1.0, mag_mode="absolute", max_norm=5.0, mag_ratio=2.0,
                         mag_beta=0.9, reference="source", ref_beta=0.9, granularity="group")],
                   sources=[b.clone() for b in bufs])
        u, _, _, _ = o.guide(grads)
        for k, p in enumerate(ps):
            p.grad = grads[k].clone()
            bufs[k] = u[k].clone() if step == 0 else 0.9 * bufs[k] + u[k]
            want[k] = want[k] - 0.1 * bufs[k]
        opt.step()
        for p, w in zip(ps, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)  # fp64 parameters: fp64 statistics


def test_wrapper_skips_nonfinite_and_keeps_grads(backend):
    p = torch.randn(10, requires_grad=True)
    inner = torch.optim.AdamW([p], lr=0.1)
    g = GradientGuidance(inner, backend=backend)
    p.grad = torch.randn(10)
    g.step()
    before = (p.detach().clone(), inner.state[p]["exp_avg"].clone(), float(inner.state[p]["step"]))
    bad = torch.randn(10)
    bad[3] = float("inf")
    p.grad = bad.clone()
    g.step()
    assert bool(g.last_stats()["skipped"][0])
    assert torch.equal(p.detach(), before[0]) and torch.equal(inner.state[p]["exp_avg"], before[1])
    assert float(inner.state[p]["step"]) == before[2]
    assert torch.equal(p.grad, bad)  # not rewritten


def test_wrapper_state_dict_and_scheduler(backend):
    p = torch.randn(20, requires_grad=True)
    g = GradientGuidance(torch.optim.AdamW([p], lr=0.1), reference="ema", backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(g, step_size=1, gamma=0.1)
    for _ in range(2):
        p.grad = torch.randn(20)
        g.step()
        sched.step()
    assert g.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    sd = copy.deepcopy(g.state_dict())  # as from disk: no aliasing
    q = p.detach().clone().requires_grad_()
    g2 = GradientGuidance(torch.optim.AdamW([q], lr=0.1), reference="ema", backend=backend)
    g2.load_state_dict(sd)
    assert torch.equal(g2.guide_state[q]["ref"], g.guide_state[p]["ref"])
    # one running norm per segment ([ν, initialised]; granularity="group": keyed by the group)
    assert torch.equal(g2.segment_state["group:0"], g.segment_state["group:0"])
    assert float(g.segment_state["group:0"][0]) > 0 and float(g.segment_state["group:0"][1]) == 1
    grad = torch.randn(20)
    p.grad, q.grad = grad.clone(), grad.clone()
    g.step()
    g2.step()
    assert torch.equal(p.detach(), q.detach())
