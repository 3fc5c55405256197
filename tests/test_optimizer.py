"""SGGAdamW against the float64 oracle of DESIGN §1 (tests/oracle.py), on every CPU backend."""

from __future__ import annotations

import random

import pytest
import torch

from oracle import Oracle
from sgg_fast import SGGAdamW

SHAPES = [(), (1,), (97,), (4097,), (3, 5, 7), (0,), (16, 33)]
STAT_KEYS = ("grad_norm", "ref_norm", "cos", "conflict", "guided_norm", "mag_scale",
             "dir_penalty", "mag_penalty")


def random_config(seed: int) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    gran = ["group", "tensor", "global"][seed % 3]
    ref = ["momentum", "ema", "source"][(seed // 3) % 3]
    mode = ["absolute", "relative", "param"][(seed // 9) % 3]
    lam = lambda: rng.choice([0.0, 0.3, 0.7, 1.0, rng.random()])
    groups = []
    for _ in range(2):
        shapes = rng.sample(SHAPES, 4)
        g = dict(
            shapes=shapes,
            lr=rng.choice([1e-2, 3e-3]), betas=(rng.choice([0.9, 0.8]), rng.choice([0.999, 0.99])),
            eps=1e-8, weight_decay=rng.choice([0.0, 0.01, 0.1]),
            lambda_dir=lam(), lambda_mag=lam(), lambda_align=lam(),
            mag_mode=mode, max_norm=rng.choice([0.5, 5.0, 50.0]), mag_ratio=rng.choice([0.8, 1.2, 2.0]),
            mag_beta=rng.choice([0.0, 0.5, 0.9]), reference=ref, ref_beta=rng.choice([0.0, 0.9]),
            granularity=gran, nonfinite="skip",
        )
        groups.append(g)
    if gran == "global":  # one global segment has one guidance setting
        for k in ("lambda_dir", "lambda_mag", "lambda_align", "max_norm", "mag_ratio", "mag_beta", "ref_beta"):
            groups[1][k] = groups[0][k]
    return groups, dict(no_grad=rng.random() < 0.4, conflict=rng.random() < 0.5)


def make_params(groups, dtype=torch.float32):
    out = []
    for g in groups:
        out.append([torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_() for s in g["shapes"]])
    return out


def opt_groups(groups, params):
    return [{**{k: v for k, v in g.items() if k != "shapes"}, "params": ps} for g, ps in zip(groups, params)]


def grads_for(params, step, extra, sources=None, scale=1.0):
    flat = [p for ps in params for p in ps]
    grads = []
    for i, p in enumerate(flat):
        if extra["no_grad"] and i == 2 and step % 2 == 1:
            grads.append(None)  # takes no part this step
            continue
        g = torch.randn(p.shape, dtype=torch.float64) * scale * (1 + step % 3)
        if extra["conflict"] and sources is not None and sources[i] is not None and step % 2 == 0:
            g = g - 2.0 * sources[i].double()  # anti-aligned with the source direction
        grads.append(g)
    return grads


def assert_close_stats(opt, oracle, rtol, atol):
    st = opt.last_stats()
    assert len(st["grad_norm"]) == len(oracle.stats)
    for k in STAT_KEYS:
        got = st[k].double()
        want = torch.tensor([s[k] for s in oracle.stats], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, k=k: f"stat {k}: {m}")
    assert bool(st["skipped"].any()) == oracle.skipped


@pytest.mark.parametrize("seed", range(27))
def test_matches_float64_oracle(seed, backend):
    groups, extra = random_config(seed)
    params = make_params(groups)
    flat = [p for ps in params for p in ps]
    sources = None
    if groups[0]["reference"] == "source":
        sources = [torch.randn(p.shape) if i != 1 else None for i, p in enumerate(flat)]
    opt = SGGAdamW(opt_groups(groups, params), backend=backend)
    if sources is not None:
        opt.set_reference(sources)
    oracle = Oracle(opt_groups(groups, params), sources)
    for step in range(6):
        grads = grads_for(params, step, extra, sources)
        for p, g in zip(flat, grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
        oracle.step([None if g is None else g.float() for g in grads])
        assert_close_stats(opt, oracle, rtol=2e-4, atol=2e-5)
        for p, want in zip(flat, oracle.params):
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 5, 13, 22])
def test_bf16_parameters_follow_oracle(seed, backend):
    """bf16 parameters and state, fp32 arithmetic: within bf16 rounding of the oracle."""
    groups, extra = random_config(seed)
    params = make_params(groups, torch.bfloat16)
    flat = [p for ps in params for p in ps]
    sources = None
    if groups[0]["reference"] == "source":
        sources = [torch.randn(p.shape).bfloat16() for p in flat]
    opt = SGGAdamW(opt_groups(groups, params), backend=backend)
    if sources is not None:
        opt.set_reference(sources)
    oracle = Oracle(opt_groups(groups, params), sources)
    for step in range(3):
        grads = grads_for(params, step, extra, sources)
        grads = [None if g is None else g.bfloat16() for g in grads]
        for p, g in zip(flat, grads):
            p.grad = g
        opt.step()
        oracle.step(grads)
        assert_close_stats(opt, oracle, rtol=2e-2, atol=2e-2)
    for p, want in zip(flat, oracle.params):
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 if opt.state.get(p) else True
        torch.testing.assert_close(p.detach().double(), want, rtol=2e-2, atol=2e-2)


def test_no_grad_parameters_take_no_part(backend):
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    b0 = b.detach().clone()
    opt = SGGAdamW([a, b], lr=0.1, backend=backend)
    a.grad = torch.randn(10)
    opt.step()
    assert torch.equal(b.detach(), b0)
    assert b not in opt.state or not opt.state[b]
    # with every gradient None the step is a no-op
    a.grad = None
    a0 = a.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0)


def test_lr_scheduler_assignment(backend):
    p = torch.randn(50, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = SGGAdamW([p], lr=0.1, lambda_dir=0, lambda_mag=0, lambda_align=0, backend=backend)
    ref = torch.optim.AdamW([q], lr=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    for _ in range(4):
        g = torch.randn(50)
        p.grad, q.grad = g.clone(), g.clone()
        for o in (opt, ref, s1, s2):
            o.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 16)
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_closure_returns_loss(backend):
    w = torch.randn(5, requires_grad=True)
    opt = SGGAdamW([w], lr=0.1, backend=backend)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    before = float((w ** 2).sum())
    loss = opt.step(closure)
    assert float(loss) == pytest.approx(before)
    assert float((w ** 2).sum()) < before


def test_step_keeps_no_reference_to_gradients(backend):
    """After zero_grad(set_to_none=True) last step's gradients can be freed (no O(N) retention)."""
    import gc
    import weakref

    ps = [torch.randn(97, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    opt = SGGAdamW([{"params": ps[:1]}, {"params": ps[1:]}], backend=backend)
    for p in ps:
        p.grad = torch.randn(p.shape)
    refs = [weakref.ref(p.grad) for p in ps]
    opt.step()
    assert opt.segment_labels() == ["param_groups[0]", "param_groups[1]"]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
