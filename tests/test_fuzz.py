"""Randomised differential test of the finalize math (DESIGN §1 A-C, §1.4b) in all its mirrors.

Random vectors g, r, p (float64) of every awkward kind — conflicting, exactly and nearly
antiparallel or parallel, zero g or r, one-element segments, ‖g‖/‖r‖ from 1e-20 to 1e30 — with
λ ∈ {0, ½, 1} or random, every mag_mode, ν uninitialised / 0 / positive, and ``maximize`` with
each reference kind. Their statistics, rounded to float32 (what a stats kernel produces), go
through the three mirrors (guidance.finalize, the compiled op, the Triton kernel under
TRITON_INTERPRET=1), which must agree bit for bit. Each mirror's u = α·g + β·r is compared with
:func:`reference`, a float64 implementation written from DESIGN §1 on the vectors themselves
(it shares no code with sgg_fast).

Error measure. ``err = ‖u - u_ref‖ / T`` with ``T`` the sum of the norms of the terms that make
u (``s·(‖g‖ + |c|·‖r‖)``, and with the blend ``s·((1-λ1)(‖g‖ + |c|·‖r‖) + λ1·‖g1‖)/‖w‖``):
the backward error of u in its ingredients. It stays meaningful where u itself cancels (the λ3
projection of a nearly antiparallel g leaves ‖u‖ ≪ ‖g‖, whose relative error is then limited by
the float32 statistics, not by finalize). ``err_rel = ‖u - u_ref‖/‖u_ref‖`` is reported too.
Near a degenerate threshold (sin² or ‖w‖² within rounding of 16·eps) the float32 decision and
the float64 one may differ; the measure bounds that by ~√eps.

``pytest -s tests/test_fuzz.py`` prints the worst errors per mirror; ``-m slow`` runs the long
variant.
"""

from __future__ import annotations

import math
import os
import random
import time

import pytest
import torch

import _finalize_mirrors as M
from sgg_fast import guidance as G

F64 = torch.float64
EPS32 = 2.0 ** -23
TOL = 16 * EPS32  # DESIGN §1.4b: the degenerate thresholds, relative to float32's eps
#: the bound of every case: err <= ERR_COND·eps·cond. The statistics carry 0.5 ulp each and
#: finalize adds a few ulps (κ from two divisions and two roots, then 1 - κ²): ~4 ulp of gr
#: relative to √(gg·rr), amplified by cond; near a degenerate threshold cond ~ 1/(16·eps) and
#: the bound is vacuous there by design (the float32 and float64 decisions may differ).
ERR_COND = 16.0
#: Triton's interpreter is slow (tiles of 512 segments: ~1 s per tile): in CI it fuzzes the
#: first TRITON_CASES cases
TRITON_CASES = 1024


# ---- the float64 reference, from DESIGN §1 ----------------------------------------------------
def reference(g, r, p, h, nu, flag):
    """(u, guided norm, s, new ν, new flag, T, cond) of one segment, float64 on the vectors.
    ``h``: dict of the guidance settings (+ maximize, reference, rewrite_grad). ``cond``: the
    condition number of u in the statistics, ``1/q · 1/‖w‖²`` with ``q = ‖g1‖²/‖g‖²``: the
    projection's cancellation and the blend's normalisation amplify an eps-sized perturbation
    of gr (or of ‖g‖, ‖r‖) by these factors."""
    sign = 1.0
    if h["maximize"]:
        # maximise f = minimise with g' = -g; r' = r for momentum (exp_avg stores the stepped
        # direction), -r for ema/source (stored in .grad's convention)
        g, r = -g, (r if h["reference"] == "momentum" else -r)
        sign = -1.0 if h["rewrite_grad"] else 1.0  # GradientGuidance writes -u' (optimizer negates)
    gg, rr, gr, pp = float(g @ g), float(r @ r), float(g @ r), float(p @ p)
    l1, l2, l3 = h["lambda_dir"], h["lambda_mag"], h["lambda_align"]
    ng, nr = math.sqrt(gg), math.sqrt(rr)
    # A. alignment
    c = -l3 * gr / rr if (rr > 0 and gr < 0) else 0.0
    g1 = g + c * r
    if c != 0 and l3 == 1 and 1 - gr * gr / (gg * rr) <= TOL:
        g1 = torch.zeros_like(g)
    n1 = float(g1.norm())
    terms = ng + abs(c) * nr
    cond = 1.0 if c == 0 or gg == 0 else gg / max(n1 * n1, 1e-300)
    # the statistics' own float32 rounding, relative: eps/2, or more where one is subnormal
    # (gr's error counts relative to √(gg·rr), the scale it cancels against)
    tiny = 2.0 ** -150
    rel_in = max([0.5 * EPS32] + [tiny / x for x in (gg, rr, math.sqrt(gg * rr)) if x > 0])
    cond *= rel_in / (0.5 * EPS32)
    # B. direction
    g2 = g1
    if rr > 0 and n1 > 0:
        w = (1 - l1) * g1 / n1 + l1 * r / nr
        wn2 = float(w @ w)
        cond /= max(wn2, 1e-300)
        if wn2 > TOL:
            wn = math.sqrt(wn2)
            g2 = n1 * w / wn
            terms = ((1 - l1) * terms + l1 * n1) / wn
    if n1 == 0:
        terms = 0.0
    n2 = float(g2.norm())
    # C. magnitude
    if h["mag_mode"] == "absolute":
        tau = h["max_norm"]
    elif h["mag_mode"] == "relative":
        tau = h["mag_ratio"] * nu if flag else math.inf
    else:
        tau = h["mag_ratio"] * max(math.sqrt(pp), 1e-3)
    s = (1 - l2) + l2 * tau / n2 if n2 > tau else 1.0
    u = s * g2
    n3 = s * n2
    nu_new, flag_new = nu, flag
    if h["mag_mode"] == "relative":
        if flag:
            nu_new = h["mag_beta"] * nu + (1 - h["mag_beta"]) * n3
        elif math.isfinite(n2) and n2 > 0:
            nu_new, flag_new = n2, 1.0
    return sign * u, n3, s, nu_new, flag_new, s * terms, cond


# ---- random cases -----------------------------------------------------------------------------
_KINDS = ["random", "conflict", "aligned", "anti_exact", "anti_near", "parallel_near", "zero_g", "zero_r",
          "zero_both", "orthogonal", "ratio"]


def _unit(x):
    return x / x.norm()


def _case(rng: random.Random, gen: torch.Generator):
    kind = rng.choice(_KINDS)
    n = rng.choice([1, 1, 2, 3, 17, 200])
    if n == 1 and kind in ("orthogonal", "anti_near", "parallel_near"):
        n = 2
    a = torch.randn(n, generator=gen, dtype=F64)
    b = torch.randn(n, generator=gen, dtype=F64)
    ng = 10 ** rng.uniform(-6, 6)
    nr = ng / 10 ** rng.uniform(-3, 3)
    if kind == "ratio":
        ratio = 10 ** rng.uniform(-20, 30)  # ‖g‖/‖r‖
        lg = rng.uniform(max(-20.0, math.log10(ratio) - 18), min(18.0, math.log10(ratio) + 20))
        ng, nr = 10 ** lg, 10 ** lg / ratio
    r = _unit(b) * nr
    if kind == "conflict":
        g = _unit(_unit(a) - rng.uniform(0.1, 5) * _unit(b)) * ng
    elif kind == "aligned":
        g = _unit(_unit(a) + rng.uniform(0.1, 5) * _unit(b)) * ng
    elif kind == "anti_exact":
        g = -_unit(b) * ng
    elif kind in ("anti_near", "parallel_near"):
        perp = _unit(a - (a @ _unit(b)) * _unit(b))
        th = 10 ** rng.uniform(-8, -1)
        d = -1.0 if kind == "anti_near" else 1.0
        g = (d * math.cos(th) * _unit(b) + math.sin(th) * perp) * ng
    elif kind == "orthogonal":
        g = _unit(a - (a @ _unit(b)) * _unit(b)) * ng
    else:
        g = _unit(a) * ng
    if kind in ("zero_g", "zero_both"):
        g = torch.zeros_like(g)
    if kind in ("zero_r", "zero_both"):
        r = torch.zeros_like(r)
    if kind == "ratio" and rng.random() < 0.5:
        g = _unit(_unit(a) - rng.uniform(0.1, 3) * _unit(b)) * ng  # conflicting at extreme ratios
    p = torch.randn(n, generator=gen, dtype=F64) * 10 ** rng.uniform(-6, 2)
    lam = lambda: rng.choice([0.0, 0.5, 1.0, rng.random()])
    mode = rng.choice(list(G.MAG_MODES))
    h = dict(lambda_dir=lam(), lambda_mag=lam(), lambda_align=lam(), mag_mode=mode,
             max_norm=10 ** rng.uniform(-3, 3) * max(ng, 1e-30) ** rng.choice([0, 1]),
             mag_ratio=rng.choice([0.5, 1.0, 2.0]), mag_beta=rng.choice([0.0, 0.5, 0.9]),
             maximize=rng.random() < 0.25, reference=rng.choice(["momentum", "ema", "source"]),
             rewrite_grad=rng.random() < 0.5)
    state = rng.choice(["uninit", "zero", "value"])
    nu, flag = {"uninit": (0.0, 0.0), "zero": (0.0, 1.0), "value": (ng * 10 ** rng.uniform(-2, 2), 1.0)}[state]
    nu = float(torch.tensor(nu, dtype=torch.float32))  # ν is float32 state
    # the hyper-parameters as finalize sees them (a float32 table): the reference uses the same
    # values, so that e.g. 1 - λ2 of λ2 = 0.9919 measures finalize, not the table's rounding
    for k in ("lambda_dir", "lambda_mag", "lambda_align", "max_norm", "mag_ratio", "mag_beta"):
        h[k] = float(torch.tensor(h[k], dtype=torch.float32))
    return kind, g, r, p, h, nu, flag


def _cases(seed: int, n: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        kind, g, r, p, h, nu, flag = _case(rng, gen)
        st = torch.tensor([float(g @ g), float(r @ r), float(g @ r), float(p @ p)], dtype=F64).float()
        if not torch.isfinite(st).all():
            continue
        out.append((kind, g, r, p, h, nu, flag, st))
    return out


def _hyper_row(h):
    return M.hyper(**{k: h[k] for k in ("lambda_dir", "lambda_mag", "lambda_align", "mag_mode", "max_norm",
                                        "mag_ratio", "mag_beta", "maximize", "reference", "rewrite_grad")})


# ---- the differential run ---------------------------------------------------------------------
def _fuzz(seed: int, n: int, mirrors=M.MIRRORS, triton_cases: int = TRITON_CASES):
    cases = _cases(seed, n)
    stats = torch.stack([c[-1] for c in cases])
    hyper = torch.tensor([_hyper_row(c[4]) for c in cases], dtype=torch.float32)
    nu = torch.tensor([[c[5], c[6]] for c in cases], dtype=torch.float32)
    avail = [m for m in mirrors if M.unavailable(m) is None]
    results, seconds = {}, {}
    for m in avail:
        k = min(n, triton_cases) if m == "triton" else n
        t0 = time.perf_counter()
        results[m] = M.run(m, stats[:k], hyper[:k], nu[:k], max_seg_block=512)
        seconds[m] = time.perf_counter() - t0
    out0, nu0 = results["torch"]
    for m in avail:  # the mirrors agree bit for bit (NaN nowhere: every case is finite)
        out, after = results[m]
        k = out.shape[0]
        assert torch.isfinite(out).all(), m
        diff = (out != out0[:k]).any(1) | (after != nu0[:k]).any(1)
        assert not bool(diff.any()), (m, [cases[i][:1] + cases[i][4:7] for i in diff.nonzero()[:5, 0].tolist()],
                                      out[diff][:5], out0[:k][diff][:5], stats[:k][diff][:5])
    assert not bool(out0[:, G.O_BAD].any()) and not bool(out0[:, G.O_SKIP].any())

    worst = {}
    errs, errs_rel, errs_nu, errs_cond = [], [], [], []
    for i, (kind, g, r, p, h, nu_i, flag_i, _st) in enumerate(cases):
        u_ref, n3_ref, s_ref, nu_ref, flag_ref, T, cond = reference(g, r, p, h, nu_i, flag_i)
        a, b = float(out0[i, G.O_ALPHA]), float(out0[i, G.O_BETA])
        u = a * g + b * r
        d = float((u - u_ref).norm())
        e = 0.0 if d == 0 else (d / T if T > 0 else math.inf)
        errs.append((e, i, kind))
        errs_cond.append((e / (EPS32 * cond), i, kind))
        assert e <= ERR_COND * EPS32 * cond, (kind, h, e, cond)
        nu_ = float(u_ref.norm())
        if nu_ > 0:
            errs_rel.append((d / nu_, i, kind))
        assert float(nu0[i, 1]) == flag_ref, (kind, h, nu_i, flag_i)
        if h["mag_mode"] == "relative":
            scale = max(abs(nu_ref), T, 1e-300)
            e_nu = abs(float(nu0[i, 0]) - nu_ref) / scale
            errs_nu.append((e_nu, i, kind))
            assert e_nu <= ERR_COND * EPS32 * cond, (kind, h, e_nu, cond)
    for name, lst in (("err", errs), ("err_rel", errs_rel), ("err_nu", errs_nu), ("err_cond", errs_cond)):
        lst.sort(reverse=True)
        worst[name] = lst[0] if lst else (0.0, -1, "")
        worst[name + "_p999"] = lst[len(lst) // 1000][0] if lst else 0.0
    return cases, worst, avail, seconds


def _report(tag, cases, worst, avail, seconds):
    lines = [f"[fuzz {tag}] {len(cases)} cases; mirrors {', '.join(avail)} bitwise identical "
             f"(triton on the first {min(len(cases), TRITON_CASES) if 'slow' not in tag else len(cases)}; "
             f"seconds: {', '.join(f'{m} {t:.1f}' for m, t in seconds.items())})"]
    for m in avail:
        lines.append(f"  {m:7s} worst err (term-scaled) {worst['err'][0]:.3g} ({worst['err'][2]}), "
                     f"p99.9 {worst['err_p999']:.3g}; worst ‖Δu‖/‖u‖ {worst['err_rel'][0]:.3g} "
                     f"({worst['err_rel'][2]}), p99.9 {worst['err_rel_p999']:.3g}; worst ν err "
                     f"{worst['err_nu'][0]:.3g} ({worst['err_nu'][2]}); worst err/(eps·cond) "
                     f"{worst['err_cond'][0]:.3g} ({worst['err_cond'][2]})")
    print("\n".join(lines))
    return lines


def test_fuzz_finalize_mirrors_against_float64():
    cases, worst, avail, seconds = _fuzz(seed=20261202, n=3000)
    _report("ci", cases, worst, avail, seconds)
    assert "torch" in avail and len(avail) >= 2, avail


@pytest.mark.slow
def test_fuzz_finalize_mirrors_against_float64_long(request):
    if "slow" not in (request.config.getoption("markexpr") or "") or "not slow" in request.config.getoption("markexpr"):
        pytest.skip("long variant: run with -m slow")
    for seed in range(int(os.environ.get("SGG_FAST_FUZZ_SEEDS", "4"))):
        cases, worst, avail, seconds = _fuzz(seed=seed, n=25000, triton_cases=25000)
        _report(f"slow seed {seed}", cases, worst, avail, seconds)


# ---- the edge cases of issue #11, through every mirror ----------------------------------------
def _edge_cases():
    rows = []
    one = torch.ones(1, dtype=F64)
    for ratio in (1e-20, 1e-10, 1.0, 1e10, 2e19, 1e22, 1e30):
        ng = min(1e15, ratio ** 0.5 * 1e3) if ratio >= 1 else 1e-3
        nr = ng / ratio
        g = torch.tensor([1.0, 0.3], dtype=F64) * ng
        r = torch.tensor([-1.0, 0.5], dtype=F64) * nr
        for l1 in (0.0, 0.5, 1.0):
            rows.append((g, r, dict(lambda_dir=l1, lambda_mag=0.0, lambda_align=1.0, mag_mode="absolute")))
    for excess in (4e2, 4e4, 1e7, 1e9):
        rows.append((one * excess * 3, one * 0, dict(lambda_mag=1.0, mag_mode="absolute", max_norm=3.0)))
    for l3 in (0.0, 0.3, 1.0):  # λ1 = ½, one element, antiparallel
        for x in (1e-8, 1.0, 1e8):
            rows.append((one * x, -one * 2.5 * x, dict(lambda_dir=0.5, lambda_align=l3, mag_mode="absolute")))
    rows.append((torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), dict(lambda_dir=0.5, lambda_align=1.0)))
    rows.append((torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), dict(lambda_dir=0.5, lambda_align=1.0)))
    full = []
    for g, r, h in rows:
        hh = dict(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0, mag_mode="absolute", max_norm=1e30,
                  mag_ratio=2.0, mag_beta=0.9, maximize=False, reference="momentum", rewrite_grad=False)
        hh.update(h)
        full.append((g, r, torch.zeros_like(g), hh))
    return full


def test_edge_cases_agree_across_mirrors_and_with_float64():
    """Issue #11 items 1, 7, 8 in every mirror: huge/tiny ratios with a conflicting reference,
    the hard clip far above τ, λ1 = ½ with one antiparallel element, zero g / zero r."""
    rows = _edge_cases()
    stats = torch.stack([torch.tensor([float(g @ g), float(r @ r), float(g @ r), 0.0], dtype=F64).float()
                         for g, r, _, _ in rows])
    hyper = torch.tensor([_hyper_row(h) for *_, h in rows], dtype=torch.float32)
    nu = torch.zeros(len(rows), 2)
    avail = [m for m in M.MIRRORS if M.unavailable(m) is None]
    res = {m: M.run(m, stats, hyper, nu)[0] for m in avail}
    for m in avail:
        assert torch.equal(res[m], res["torch"]), m
    out = res["torch"]
    assert torch.isfinite(out).all()
    for i, (g, r, p, h) in enumerate(rows):
        u_ref, n3, s, _, _, T, cond = reference(g, r, p, h, 0.0, 0.0)
        u = float(out[i, G.O_ALPHA]) * g + float(out[i, G.O_BETA]) * r
        d = float((u - u_ref).norm())
        assert d <= 1e-5 * max(T, 1e-300) or d == 0, (i, h, u, u_ref)
        if h["lambda_dir"] == 0.5 and g.numel() == 1:
            assert float(u @ g) >= 0  # never uphill
