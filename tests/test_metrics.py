"""sgg_fast.metrics.GuidanceMetrics: hand-computed values, a real optimizer, no host sync."""

from __future__ import annotations

import math

import pytest
import torch

from sgg_fast import GradientGuidance, SGGAdamW
from sgg_fast.metrics import GuidanceMetrics


def _stats(grad_norm, ref_norm, cos, guided_norm, mag_scale, skipped=False):
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    S = len(grad_norm)
    return {"grad_norm": t(grad_norm), "ref_norm": t(ref_norm), "cos": t(cos), "guided_norm": t(guided_norm),
            "mag_scale": t(mag_scale), "conflict": torch.zeros(S), "dir_penalty": 1 - t(cos),
            "mag_penalty": torch.zeros(S), "skipped": torch.full((S,), skipped)}


def test_hand_computed():
    m = GuidanceMetrics()
    assert math.isnan(m.report()["stability"])
    m.update({})  # before the first step: ignored
    r2 = 1 / math.sqrt(2)
    # step 1: ‖g‖ = √(3²+4²) = 5, no reference yet, ‖u‖ = 5
    m.update(_stats([3, 4], [0, 0], [0, 0], [3, 4], [1, 1]))
    # step 2: ‖g‖ = 1, ‖r‖ = 2, g·r = 0.5·1·2 = 1 → cos 0.5; ‖u‖ = 1; segment 0 was clipped
    m.update(_stats([1, 0], [2, 0], [0.5, 0], [0.6, 0.8], [0.5, 1]))
    # a skipped step with non-finite numbers: ignored except for the count
    m.update(_stats([float("inf"), 1], [1, 1], [float("nan"), 0], [float("nan"), 1], [1, 1], skipped=True))
    # step 3: ‖g‖ = 2, ‖r‖ = √2, g·r = -r2·2·1 = -√2 → cos -0.5; ‖u‖ = 3
    m.update(_stats([0, 2], [1, 1], [0, -r2], [0, 3], [1, 1]))
    rep = m.report()
    U, G, C = [5.0, 1.0, 3.0], [5.0, 1.0, 2.0], [0.5, -0.5]

    def inv_1p_cv(x):
        mean = sum(x) / len(x)
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / len(x))
        return 1 / (1 + std / mean)

    assert rep["steps"] == 3 and rep["skipped_steps"] == 1 and rep["align_steps"] == 2
    assert rep["stability"] == pytest.approx(inv_1p_cv(U), rel=1e-6)
    assert rep["stability"] == pytest.approx(1 / (1 + math.sqrt(8 / 3) / 3), rel=1e-6)
    assert rep["raw_stability"] == pytest.approx(inv_1p_cv(G), rel=1e-6)
    assert rep["alignment"] == pytest.approx(sum(C) / len(C), abs=1e-7)  # = 0
    assert rep["alignment_std"] == pytest.approx(0.5, rel=1e-6)
    assert rep["conflict_rate"] == 0.5
    assert rep["clip_rate"] == pytest.approx(1 / 3)
    assert rep["mean_grad_norm"] == pytest.approx(8 / 3)
    assert rep["mean_guided_norm"] == pytest.approx(3.0)
    m.reset()
    assert m.report()["steps"] == 0


@pytest.mark.parametrize("granularity", ["tensor", "group", "global"])
def test_against_real_optimizer(backend, granularity):
    """Feed a real SGGAdamW (momentum reference, per-segment clip) and recompute independently."""
    shapes = [(13, 7), (97,), (5,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    tau = 2.0
    groups = [{"params": ps[:2]}, {"params": ps[2:]}]
    opt = SGGAdamW(groups, lr=1e-2, lambda_dir=0, lambda_align=0, lambda_mag=1.0, mag_mode="absolute",
                   max_norm=tau, granularity=granularity, backend=backend)
    seg_of = {"tensor": [[0], [1], [2]], "group": [[0, 1], [2]], "global": [[0, 1, 2]]}[granularity]
    tracker = GuidanceMetrics()
    U, G, C = [], [], []
    for step in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape) * (0.5 + step) + 0.3
        g = torch.cat([p.grad.reshape(-1) for p in ps]).double()
        if step:
            r = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in ps]).double()
            C.append(float(g @ r / (g.norm() * r.norm())))
        # per segment clip to τ
        u2 = 0.0
        for seg in seg_of:
            n = math.sqrt(sum(float(ps[i].grad.double().square().sum()) for i in seg))
            u2 += min(n, tau) ** 2
        U.append(math.sqrt(u2))
        G.append(float(g.norm()))
        opt.step()
        tracker.update(opt)
    rep = tracker.report()
    mean = lambda x: sum(x) / len(x)
    cv = lambda x: math.sqrt(mean([v * v for v in x]) - mean(x) ** 2) / mean(x)
    assert rep["steps"] == 5 and rep["align_steps"] == 4
    assert rep["alignment"] == pytest.approx(mean(C), rel=1e-4, abs=1e-6)
    assert rep["stability"] == pytest.approx(1 / (1 + cv(U)), rel=1e-4)
    assert rep["raw_stability"] == pytest.approx(1 / (1 + cv(G)), rel=1e-4)
    assert rep["clip_rate"] == 1.0  # every segment norm exceeds τ = 2 with these gradients
    assert rep["stability"] > rep["raw_stability"]  # clipping evens the norms out


def test_attach_counts_steps_and_skips():
    p = torch.randn(10, requires_grad=True)
    opt = SGGAdamW([p], lr=1e-2)
    tracker = GuidanceMetrics()
    handle = tracker.attach(opt)
    for bad in (False, True, False):
        p.grad = torch.randn(10)
        if bad:
            p.grad[3] = float("nan")
        opt.step()
    rep = tracker.report()
    assert rep["steps"] == 2 and rep["skipped_steps"] == 1
    handle.remove()
    p.grad = torch.randn(10)
    opt.step()
    assert tracker.report()["steps"] == 2


def test_attach_to_gradient_guidance_baseline():
    """A plain AdamW behind GradientGuidance with every λ = 0: update unchanged, metrics produced."""
    p = torch.randn(50, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    probe = GradientGuidance(torch.optim.AdamW([p], lr=1e-2), lambda_dir=0, lambda_mag=0, lambda_align=0)
    ref = torch.optim.AdamW([q], lr=1e-2)
    tracker = GuidanceMetrics()
    tracker.attach(probe)
    for _ in range(3):
        g = torch.randn(50)
        p.grad, q.grad = g.clone(), g.clone()
        probe.step()
        ref.step()
    assert torch.equal(p, q)
    assert tracker.report()["steps"] == 3 and tracker.report()["clip_rate"] == 0.0


def test_update_does_not_sync(monkeypatch):
    """update() must not read tensors on the host (CPU proxy of the CUDA sync check below)."""
    m = GuidanceMetrics()
    stats = _stats([1, 2], [1, 1], [0.3, -0.2], [1, 2], [1, 0.5])

    def no_sync(*a, **k):
        raise AssertionError("host sync in GuidanceMetrics.update")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    m.update(stats)
    m.update(stats)
    monkeypatch.undo()
    assert m.report()["steps"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_sync_cuda():
    stats = {k: v.cuda() for k, v in _stats([1, 2], [1, 1], [0.3, -0.2], [1, 2], [1, 0.5]).items()}
    m = GuidanceMetrics()
    m.update(stats)  # allocates the accumulator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            m.update(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert m.report()["steps"] == 4
