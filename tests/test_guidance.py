"""sgg_fast.guidance.finalize (the scalar math) against the oracle's explicit vectors."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch

from _vector_cases import arrange
from oracle import Oracle
from sgg_fast import guidance as G


def _case(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 97, 500])
    g = torch.randn(n, dtype=torch.float64) * rng.choice([1e-3, 1.0, 30.0])
    kind = rng.choice(["random", "conflict", "aligned", "zero_r", "zero_g", "antiparallel"])
    r = torch.randn(n, dtype=torch.float64) * rng.choice([0.1, 1.0])
    g, r = arrange(kind, g, r)
    h = dict(lambda_dir=rng.choice([0.0, 0.5, 1.0, rng.random()]),
             lambda_mag=rng.choice([0.0, 0.5, 1.0, rng.random()]),
             lambda_align=rng.choice([0.0, 1.0, rng.random()]),
             mag_mode=rng.choice(["absolute", "relative", "param"]),
             max_norm=rng.choice([0.01, 1.0, 100.0]), mag_ratio=rng.choice([0.5, 2.0]),
             mag_beta=rng.choice([0.0, 0.9]))
    nu = rng.choice([None, 0.3, 5.0])
    p = torch.randn(n, dtype=torch.float64) * rng.choice([1e-5, 1.0])
    return g, r, p, h, nu


def _oracle(g, r, p, h, nu):
    o = Oracle([dict(params=[p], lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, reference="source",
                     ref_beta=0.9, granularity="group", **h)], sources=[r])
    if nu is not None:
        o.nu[("group", 0)] = nu
    guided, new_nu, stats, bad = o.guide([g])
    return guided[0], new_nu.get(("group", 0), nu), stats[0], bad


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-9, 1e-12), (torch.float32, 2e-4, 1e-5)])
@pytest.mark.parametrize("seed", range(60))
def test_finalize_matches_oracle(seed, dtype, rtol, atol):
    g, r, p, h, nu = _case(seed)
    u_want, nu_want, st_want, bad = _oracle(g, r, p, h, nu)
    stats = torch.stack([(g * g).sum(), (r * r).sum(), (g * r).sum(), (p * p).sum()]).reshape(1, 4).to(dtype)
    hyper = torch.tensor([G.hyper_row(h)], dtype=dtype)
    out = G.finalize(stats, hyper, torch.tensor([[nu or 0.0, float(nu is not None)]], dtype=dtype))
    assert out.shape == (1, len(G.OUT_COLS)) and out.dtype == dtype
    u = out[0, G.O_ALPHA].double() * g + out[0, G.O_BETA].double() * r
    scale = max(float(g.norm()), 1e-30)
    torch.testing.assert_close(u / scale, u_want / scale, rtol=rtol, atol=max(atol, 10 * rtol))
    st = G.stats_dict(out)
    for k in G.STATS_KEYS[:-1]:
        want = st_want[k]
        torch.testing.assert_close(st[k][0].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=rtol * 10, atol=max(atol, rtol * 10) * max(1.0, abs(want)))
    if h["mag_mode"] == "relative":
        want = nu_want if nu_want is not None else 0.0
        torch.testing.assert_close(out[0, G.O_NU].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=rtol * 10, atol=atol)
    assert not bad and not bool(st["skipped"][0])


def test_nonfinite_statistics_mark_the_segment_and_skip_all():
    stats = torch.tensor([[1.0, 1.0, 0.5, 1.0], [float("nan"), 1.0, 0.5, 1.0], [4.0, float("inf"), 0.0, 1.0]])
    hyper = torch.tensor([G.hyper_row(dict(lambda_dir=0.5, lambda_mag=1.0, lambda_align=1.0, mag_mode="relative",
                                           max_norm=1.0, mag_ratio=2.0, mag_beta=0.9))] * 3)
    nu = torch.tensor([[0.7, 1.0], [0.0, 0.0], [3.0, 1.0]])
    out = G.finalize(stats, hyper, nu)
    assert out[:, G.O_BAD].tolist() == [0.0, 1.0, 1.0]
    assert out[:, G.O_SKIP].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(out[:, [G.O_NU, G.O_NUINIT]], nu)  # unchanged when skipping


def test_batched_segments_are_independent():
    """One call over S segments equals S calls over one segment (no cross-talk)."""
    cases = [_case(s) for s in range(12)]
    stats = torch.tensor([[float((g * g).sum()), float((r * r).sum()), float((g * r).sum()), float((p * p).sum())]
                          for g, r, p, h, nu in cases], dtype=torch.float64)
    hyper = torch.tensor([G.hyper_row(h) for *_, h, nu in cases], dtype=torch.float64)
    nu = torch.tensor([[nu or 0.0, float(nu is not None)] for *_, nu in cases], dtype=torch.float64)
    out = G.finalize(stats, hyper, nu)
    for s in range(len(cases)):
        one = G.finalize(stats[s:s + 1], hyper[s:s + 1], nu[s:s + 1])
        torch.testing.assert_close(out[s], one[0], rtol=0, atol=0, equal_nan=True)


def test_import_does_not_load_triton_or_extensions():
    code = ("import sys, sgg_fast; sgg_fast.available_backends(); "
            "bad = [m for m, mod in list(sys.modules.items()) if m == 'triton' or m.startswith('triton.') "
            "or str(getattr(mod, '__file__', '') or '').endswith(('.so', '.pyd')) and 'sgg' in m]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_info_lists_torch_available():
    res = subprocess.run([sys.executable, "-m", "sgg_fast.info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("torch ")]
    assert line and "available" in line[0] and "unavailable" not in line[0]


# ---- numerics (DESIGN §1.4b; issue #11 items 1, 7, 8) ------------------------------------------
def _stats32(g, r, p=None):
    p = torch.zeros_like(g) if p is None else p
    return torch.stack([(g * g).sum(), (r * r).sum(), (g * r).sum(), (p * p).sum()]).reshape(1, 4).float()


def _u(out, g, r):
    return out[0, G.O_ALPHA].double() * g + out[0, G.O_BETA].double() * r


def _nu(v=None):
    return torch.tensor([[v or 0.0, float(v is not None)]])


def _norms(ratio, place):
    """(‖g‖, ‖r‖) with ‖g‖/‖r‖ = ratio and float32 statistics: "sym" √ratio and 1/√ratio;
    "r_tiny" ‖g‖ = 1 (a decayed momentum, rr subnormal); "g_huge" ‖g‖ = 1e18."""
    if place == "sym":
        return math.sqrt(ratio), 1 / math.sqrt(ratio)
    if place == "r_tiny":
        return 1.0, 1 / ratio
    return 1e18, 1e18 / ratio


@pytest.mark.parametrize("ratio, place", [(1e-20, "sym"), (1e-10, "sym"), (1.0, "sym"), (1e10, "sym"),
                                          (1e19, "sym"), (1e30, "sym"), (1e10, "r_tiny"), (1e19, "r_tiny"),
                                          (2e19, "r_tiny"), (1e21, "r_tiny"), (1e19, "g_huge"),
                                          (1e25, "g_huge"), (1e2, "g_huge")])
@pytest.mark.parametrize("l_dir", [0.0, 0.3, 0.5])
def test_huge_and_tiny_norm_ratios_stay_finite_and_exact(ratio, place, l_dir):
    """Issue #11 item 1: a conflicting reference with ‖g‖/‖r‖ from 1e-20 to 1e30 (statistics
    finite in float32) gives finite α, β and the oracle's u; the old formula overflowed in
    c²·rr = λ3²·gr²/rr at ‖g‖/‖r‖ ≳ 2e19 (NaN parameters)."""
    gen = torch.Generator().manual_seed(int(math.log10(ratio) * 10) + 100)
    n = 64
    ng, nr = _norms(ratio, place)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r / r.norm() * nr
    g = g / g.norm() - 1.5 * r / r.norm()
    g = g / g.norm() * ng
    assert float((g * r).sum()) < 0  # conflicting
    h = dict(lambda_dir=l_dir, lambda_mag=0.0, lambda_align=1.0, mag_mode="absolute", max_norm=1.0,
             mag_ratio=2.0, mag_beta=0.9)
    stats = _stats32(g, r)
    assert torch.isfinite(stats).all()
    out = G.finalize(stats, torch.tensor([G.hyper_row(h)]), _nu())
    assert torch.isfinite(out).all() and out[0, G.O_SKIP] == 0 and out[0, G.O_BAD] == 0
    u_want, *_ = _oracle(g, r, torch.zeros_like(g), h, None)
    u = _u(out, g, r)
    # the statistics' own float32 rounding: relative eps/2, or half the subnormal spacing 2^-149
    # (rr of ‖r‖ = 1e-21 is subnormal: 7e-4 relative); u inherits a few times that
    rel_in = max(2.0 ** -24, 2.0 ** -150 / float(stats[0, G.RR]), 2.0 ** -150 / float(stats[0, G.GG]))
    tol = 8 * rel_in + 4e-6
    assert float((u - u_want).norm()) <= tol * float(u_want.norm()), (u.norm(), u_want.norm())


def test_gradient_norm_near_the_float32_limit():
    """Issue #11 item 1: ‖g‖ ≈ 1.5e19 (gg finite) with a unit reference: the old 2c·gr
    overflowed and u silently became 0; also gg = FLT_MAX·(1 - 2^-24)."""
    n = 16
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r / r.norm()
    for ng in (1.5e19, 1.8446743e19):
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        g = g / g.norm() - 3 * r  # cos ≈ -0.95: the old 2c·gr ≈ 2cos²·gg overflowed
        g = g / g.norm() * ng
        h = dict(lambda_dir=0.2, lambda_mag=0.0, lambda_align=1.0, mag_mode="absolute", max_norm=1.0,
                 mag_ratio=2.0, mag_beta=0.9)
        stats = _stats32(g, r)
        assert torch.isfinite(stats).all()
        out = G.finalize(stats, torch.tensor([G.hyper_row(h)]), _nu())
        assert torch.isfinite(out).all() and out[0, G.O_SKIP] == 0
        u_want, *_ = _oracle(g, r, torch.zeros_like(g), h, None)
        assert float((_u(out, g, r) - u_want).norm()) <= 1e-5 * float(u_want.norm())


def test_unrepresentable_beta_skips_the_step():
    """β = ‖g‖/‖r‖·(...) beyond float32's range (‖g‖ = 1e18, ‖r‖ = 1e-22): the segment is bad
    and the step skipped (DESIGN §1.5), never a non-finite α/β applied."""
    stats = torch.tensor([[1e36, 1e-44, -0.5e-4, 0.0], [1.0, 1.0, 0.5, 0.0]])
    h = G.hyper_row(dict(lambda_dir=0.5, lambda_mag=0.0, lambda_align=1.0, mag_mode="relative",
                         max_norm=1.0, mag_ratio=2.0, mag_beta=0.9))
    nu = torch.tensor([[0.3, 1.0], [0.7, 1.0]])
    out = G.finalize(stats, torch.tensor([h, h]), nu)
    assert out[:, G.O_BAD].tolist() == [1.0, 0.0] and out[:, G.O_SKIP].tolist() == [1.0, 1.0]
    assert torch.equal(out[:, [G.O_NU, G.O_NUINIT]], nu)


@pytest.mark.parametrize("excess", [4e2, 4e4, 1e7, 1e9, 1e18])
@pytest.mark.parametrize("l_mag", [1.0, 0.5])
def test_hard_clip_does_not_cancel(excess, l_mag):
    """Issue #11 item 7: n2 = excess·τ with λ2 = 1 clips to exactly τ (the old
    1 - λ2·(1 - τ/n2) gave ‖u‖ = 1.19τ at 1e7 and 0 at 1e9); λ2 = ½ keeps half the excess."""
    tau = 3.0
    n2 = excess * tau
    stats = torch.tensor([[n2 * n2, 0.0, 0.0, 0.0]])
    h = G.hyper_row(dict(lambda_dir=0.0, lambda_mag=l_mag, lambda_align=0.0, mag_mode="absolute",
                         max_norm=tau, mag_ratio=2.0, mag_beta=0.9))
    out = G.finalize(stats, torch.tensor([h]), _nu())
    want = (1 - l_mag) * n2 + l_mag * tau
    eps = torch.finfo(torch.float32).eps
    n_u = float(out[0, G.O_ALPHA]) * float(torch.tensor(n2 * n2).float().sqrt())
    assert abs(n_u - want) <= 4 * eps * want, (n_u, want)
    assert abs(float(out[0, G.O_UNORM]) - want) <= 4 * eps * want


def test_half_blend_with_an_antiparallel_reference_never_steps_uphill():
    """Issue #11 item 8: λ1 = ½ and g antiparallel to r (every one-element segment with a
    conflicting reference): ‖w‖ = 0 exactly, so g2 = g1 (DESIGN §1 B); in float32 ‖w‖² is
    rounding noise that the old absolute threshold (1e-12) took for a direction (23 of 100
    one-element steps went uphill). Now u is a non-negative multiple of g, as the oracle says."""
    rng = random.Random(8)
    uphill = 0
    for _ in range(200):
        g = torch.tensor([rng.choice([-1, 1]) * 10 ** rng.uniform(-8, 8)], dtype=torch.float64)
        r = -g * 10 ** rng.uniform(-6, 6)
        h = dict(lambda_dir=0.5, lambda_mag=rng.choice([0.0, 1.0]), lambda_align=rng.choice([0.0, 0.3, 1.0]),
                 mag_mode="absolute", max_norm=10 ** rng.uniform(-3, 3), mag_ratio=2.0, mag_beta=0.9)
        out = G.finalize(_stats32(g, r), torch.tensor([G.hyper_row(h)]), _nu())
        u = _u(out, g, r)
        uphill += int(float(u @ g) < 0)
        u_want, *_ = _oracle(g, r, torch.zeros_like(g), h, None)
        assert float((u - u_want).abs()) <= 1e-5 * float(g.abs()) * max(float(out[0, G.O_SCALE]), 1e-30) + 1e-300
    assert uphill == 0


def test_zero_norm_ema_is_a_valid_initialised_value():
    """ν = 0 with the flag set clips to τ = 0 (s = 1 - λ2); the flag unset means "first step":
    τ = ∞ and ν ← n2, flag ← 1. (With mag_beta = 0 a zero-norm step sets ν = 0.)"""
    stats = torch.tensor([[4.0, 0.0, 0.0, 0.0]] * 2 + [[0.0, 0.0, 0.0, 0.0]])
    h = G.hyper_row(dict(lambda_dir=0.0, lambda_mag=0.5, lambda_align=0.0, mag_mode="relative",
                         max_norm=1.0, mag_ratio=2.0, mag_beta=0.0))
    out = G.finalize(stats, torch.tensor([h] * 3), torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert out[:, G.O_SCALE].tolist() == [0.5, 1.0, 1.0]
    assert out[:, G.O_NU].tolist() == [1.0, 2.0, 0.0]       # mbeta = 0: ν ← n3; first step: ν ← n2
    assert out[:, G.O_NUINIT].tolist() == [1.0, 1.0, 0.0]   # a zero first step initialises nothing


@pytest.mark.parametrize("reference", ["momentum", "ema", "source"])
@pytest.mark.parametrize("rewrite_grad", [False, True], ids=["sggadamw", "guidance"])
def test_maximize_signs_act_on_the_negated_gradient(reference, rewrite_grad):
    """hyper_row's sign columns: the kernels' α·g + β·r (raw .grad g, stored r) equals the
    oracle's guided gradient u' of g' = -g with the reference r' in the maximised convention
    (r' = r for momentum, -r for ema/source), or -u' when GradientGuidance rewrites .grad for a
    wrapped optimizer that negates it again; the statistics row is that of (g', r')."""
    gen = torch.Generator().manual_seed(12)
    n = 40
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    r = torch.randn(n, generator=gen, dtype=torch.float64) - 0.8 * g
    p = torch.randn(n, generator=gen, dtype=torch.float64)
    h = dict(lambda_dir=0.3, lambda_mag=1.0, lambda_align=0.7, mag_mode="absolute", max_norm=1.0,
             mag_ratio=2.0, mag_beta=0.9)
    r_used = r if reference == "momentum" else -r
    u_prime, _, st_want, _ = _oracle(-g, r_used, p, h, None)
    want = -u_prime if rewrite_grad else u_prime
    row = G.hyper_row(dict(h, maximize=True, reference=reference), rewrite_grad=rewrite_grad)
    out = G.finalize(_stats32(g, r, p), torch.tensor([row]), _nu())
    torch.testing.assert_close(_u(out, g, r), want, rtol=1e-5, atol=1e-5 * float(want.norm()))
    for k in ("cos", "conflict", "guided_norm"):
        assert abs(float(G.stats_dict(out)[k][0]) - st_want[k]) <= 1e-5 * max(1.0, abs(st_want[k]))
    plain = G.hyper_row(dict(h, maximize=False, reference=reference), rewrite_grad=rewrite_grad)
    assert plain[G.H_GRSIGN:] == [1.0, 1.0, 1.0]


def test_sqrt_rn_is_correctly_rounded():
    """guidance.sqrt_rn equals IEEE sqrt (numpy's, and math.sqrt rounded once) on float32
    inputs where torch's own CPU sqrt is off by an ulp, plus 0, subnormals, FLT_MAX, inf, nan."""
    import numpy as np

    x = torch.cat([torch.rand(20000) * 100, torch.rand(2000) * 1e-38, torch.tensor(
        [0.0, 1.4e-45, 1e-40, 3.4028235e38, float("inf"), 1.0, 2.0, 4.0])])
    want = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(G.sqrt_rn(x), want)
    assert G.sqrt_rn(torch.tensor([float("nan"), -1.0])).isnan().all()


# ---- maximize, end to end (issue #12), every backend ------------------------------------------
def _max_pair(backend, reference, wrapped):
    from sgg_fast import GradientGuidance, SGGAdamW

    torch.manual_seed(5)
    shapes = [(7,), (3, 4), (1,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    lam = dict(lambda_dir=0.4, lambda_mag=0.8, lambda_align=0.9, reference=reference, mag_mode="relative")
    if wrapped:
        a = GradientGuidance(torch.optim.AdamW(ps, lr=1e-2, maximize=True), backend=backend, **lam)
        b = GradientGuidance(torch.optim.AdamW(qs, lr=1e-2), backend=backend, **lam)
    else:
        from sgg_fast import SGGAdamW

        a = SGGAdamW(ps, lr=1e-2, maximize=True, backend=backend, **lam)
        b = SGGAdamW(qs, lr=1e-2, backend=backend, **lam)
    if reference == "source":
        src = [torch.randn(s) for s in shapes]
        a.set_reference(src)
        b.set_reference([-x for x in src])  # a source gradient of the negated objective
    return ps, qs, a, b


@pytest.mark.parametrize("reference", ["momentum", "ema", "source"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["sggadamw", "guidance"])
def test_maximize_equals_minimizing_the_negated_objective(backend, reference, wrapped):
    """maximize=True with gradient g steps exactly like maximize=False with -g (and the source
    reference negated with it): the guidance sees -g and its reference in that convention."""
    ps, qs, a, b = _max_pair(backend, reference, wrapped)
    for step in range(4):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape) * (1 + 3 * (step % 2))
            p.grad, q.grad = g.clone(), -g
        a.step()
        b.step()
        for k in ("cos", "conflict", "guided_norm", "mag_scale"):
            torch.testing.assert_close(a.last_stats()[k], b.last_stats()[k], rtol=1e-6, atol=1e-7)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
