"""sgg_fast.guidance.finalize (the scalar math) against the oracle's explicit vectors."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from oracle import Oracle
from sgg_fast import guidance as G


def _case(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 97, 500])
    g = torch.randn(n, dtype=torch.float64) * rng.choice([1e-3, 1.0, 30.0])
    kind = rng.choice(["random", "conflict", "aligned", "zero_r", "zero_g", "antiparallel"])
    r = torch.randn(n, dtype=torch.float64) * rng.choice([0.1, 1.0])
    if kind == "conflict":
        g = g - 3 * r * g.norm() / r.norm()
    elif kind == "aligned":
        g = g + 3 * r * g.norm() / r.norm()
    elif kind == "zero_r":
        r = torch.zeros_like(r)
    elif kind == "zero_g":
        g = torch.zeros_like(g)
    elif kind == "antiparallel":
        g = -2.5 * r
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
    out = G.finalize(stats, hyper, torch.tensor([nu or 0.0], dtype=dtype))
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
    nu = torch.tensor([0.7, 0.0, 3.0])
    out = G.finalize(stats, hyper, nu)
    assert out[:, G.O_BAD].tolist() == [0.0, 1.0, 1.0]
    assert out[:, G.O_SKIP].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(out[:, G.O_NU], nu)  # unchanged when skipping


def test_batched_segments_are_independent():
    """One call over S segments equals S calls over one segment (no cross-talk)."""
    cases = [_case(s) for s in range(12)]
    stats = torch.tensor([[float((g * g).sum()), float((r * r).sum()), float((g * r).sum()), float((p * p).sum())]
                          for g, r, p, h, nu in cases], dtype=torch.float64)
    hyper = torch.tensor([G.hyper_row(h) for *_, h, nu in cases], dtype=torch.float64)
    nu = torch.tensor([nu or 0.0 for *_, nu in cases], dtype=torch.float64)
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
