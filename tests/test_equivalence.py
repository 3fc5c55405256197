"""DESIGN §1.7: equivalences to established systems (torch's AdamW, clip_grad_norm_, PCGrad)."""

from __future__ import annotations

import pytest
import torch

from sgg_fast import SGGAdamW

SHAPES = [(), (1,), (97,), (4097,), (7, 11), (0,), (2, 3, 4)]


def _pairs(dtype=torch.float32):
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    return ps, qs


@pytest.mark.parametrize("torch_impl", ["foreach", "fused", "single"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "global"])
def test_all_lambdas_zero_is_adamw(backend, torch_impl, granularity):
    ps, qs = _pairs()
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    opt = SGGAdamW(ps, lambda_dir=0, lambda_mag=0, lambda_align=0, granularity=granularity,
                   backend=backend, **kw)
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True), "single": dict(foreach=False)}[torch_impl]
    ref = torch.optim.AdamW(qs, **kw, **flags)
    for step in range(6):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape) * (1 + step)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-6)


def test_all_lambdas_zero_is_adamw_bf16(backend):
    """bf16 parameters: torch's fused AdamW also does fp32 math in registers."""
    ps, qs = _pairs(torch.bfloat16)
    kw = dict(lr=1e-2, weight_decay=0.01)
    opt = SGGAdamW(ps, lambda_dir=0, lambda_mag=0, lambda_align=0, backend=backend, **kw)
    ref = torch.optim.AdamW(qs, fused=True, **kw)
    for _ in range(4):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape).bfloat16()
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-2)


def test_hard_clip_is_clip_grad_norm_then_adamw(backend):
    """λ2=1, absolute, global ≡ clip_grad_norm_(max_norm) + AdamW.

    AdamW is nearly invariant to a constant gradient scale, so the gradient norm is made to cross
    max_norm from step to step and eps is large: a wrong clip factor changes the result.
    """
    ps, qs = _pairs()
    max_norm = 30.0
    kw = dict(lr=1e-2, eps=1e-2, weight_decay=0.0)
    opt = SGGAdamW(ps, lambda_dir=0, lambda_mag=1.0, lambda_align=0, mag_mode="absolute",
                   max_norm=max_norm, granularity="global", backend=backend, **kw)
    ref = torch.optim.AdamW(qs, **kw)
    clipped_any = unclipped_any = False
    for step in range(8):
        scale = [0.1, 1.0, 0.3, 2.0][step % 4]
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape) * scale
            p.grad, q.grad = g.clone(), g.clone()
        total = torch.nn.utils.clip_grad_norm_(qs, max_norm)
        clipped_any |= bool(total > max_norm)
        unclipped_any |= bool(total < max_norm)
        opt.step()
        ref.step()
        st = opt.last_stats()
        torch.testing.assert_close(st["grad_norm"][0], total, rtol=1e-5, atol=0)
        torch.testing.assert_close(st["guided_norm"][0], torch.clamp(total, max=max_norm), rtol=1e-5, atol=0)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert clipped_any and unclipped_any


def test_align_one_is_pcgrad_projection(backend):
    """λ3=1, reference=source, global ≡ AdamW on g - min(0, g·r)/‖r‖² · r."""
    ps, qs = _pairs()
    src = [torch.randn(p.shape) for p in ps]
    kw = dict(lr=1e-2, weight_decay=0.01)
    opt = SGGAdamW(ps, lambda_dir=0, lambda_mag=0, lambda_align=1.0, reference="source",
                   granularity="global", backend=backend, **kw)
    opt.set_reference(src)
    ref = torch.optim.AdamW(qs, **kw)
    r = torch.cat([s.reshape(-1) for s in src]).double()
    conflicts = 0
    for step in range(6):
        grads = [torch.randn(p.shape) - (1.5 * s if step % 2 == 0 else 0) for p, s in zip(ps, src)]
        g = torch.cat([x.reshape(-1) for x in grads]).double()
        dot = float(g @ r)
        conflicts += dot < 0
        proj = g - min(0.0, dot) / float(r @ r) * r
        off = 0
        for p, q, x in zip(ps, qs, grads):
            p.grad = x.clone()
            q.grad = proj[off:off + x.numel()].reshape(x.shape).float()
            off += x.numel()
        opt.step()
        ref.step()
        assert bool(opt.last_stats()["conflict"][0]) == (dot < 0)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert conflicts >= 3
