"""The compiled ops (csrc/) at op level: statistics against float64, finalize against
sgg_fast.guidance.finalize, apply/guide against a float64 AdamW, determinism across thread
counts and instruction sets, bad input, fake implementations (torch.compile / opcheck). The
build, the lazy import and the JIT fallback are tests/test_build.py. CUDA tests are marked
``cuda`` (skipped without a GPU).

The behavioural suite (oracle, equivalences, state dicts, ...) also runs with backend="cpu"
through conftest's CPU_BACKENDS.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch

from sgg_fast import SGGAdamW, _ext
from sgg_fast import guidance as G
from sgg_fast.backends import cpp_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.error()}", allow_module_level=True)

ops = torch.ops.sgg_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(), (1,), (97,), (4097,), (0,), (64,), (65,), (3, 5, 7), (33000,)]
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
                                    reason="needs a CUDA device and the extension's CUDA kernels")


def _run(code: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=full, timeout=timeout)


def _ws(P, device):
    if torch.device(device).type != "cuda":
        return None, None
    n = cpp_backend.WS_WORDS_PER_TENSOR * max(P, 1)
    return torch.zeros(n, dtype=torch.int64, device=device), torch.zeros(n, dtype=torch.int64)


NONE = torch.empty(0)  # "no reference" in the ops' mutable refs lists


def _rows(numels, chunk):
    return [max(1, -(-n // chunk)) for n in numels]


# ---- statistics ----------------------------------------------------------------------------
def _stats_case(device, dtype, seed, n_tensors=None):
    rng = random.Random(seed)
    shapes = [rng.choice(SIZES) for _ in range(n_tensors or rng.randint(1, 8))]
    gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    rs = [None if rng.random() < 0.3 else torch.randn(s, device=device).to(dtype) for s in shapes]
    ps = [None if rng.random() < 0.5 else torch.randn(s, device=device).to(dtype) for s in shapes]
    return gs, rs, ps


def _stats_want(gs, rs, ps):
    want = []
    for g, r, p in zip(gs, rs, ps):
        g64 = g.double().reshape(-1)
        r64 = r.double().reshape(-1) if r is not None else torch.zeros_like(g64)
        p64 = p.double().reshape(-1) if p is not None else torch.zeros_like(g64)
        want.append(torch.stack([(g64 * g64).sum(), (r64 * r64).sum(), (g64 * r64).sum(), (p64 * p64).sum()]))
    return torch.stack(want).cpu()


def _per_tensor(partials, numels, chunk):
    rows = _rows(numels, chunk)
    assert partials.shape == (sum(rows), 4)
    out, at = [], 0
    for k in rows:
        out.append(partials[at:at + k].double().sum(0))
        at += k
    return torch.stack(out).cpu()


def _check_stats(device, dtype, seed, chunk, n_tensors=None):
    gs, rs, ps = _stats_case(device, dtype, seed, n_tensors)
    ws, wsh = _ws(len(gs), device)
    partials = ops.sgg_stats(gs, rs, ps, chunk, ws, wsh)
    assert partials.dtype == torch.float32 and partials.device == gs[0].device
    numels = [g.numel() for g in gs]
    got = _per_tensor(partials, numels, chunk)
    want = _stats_want(gs, rs, ps)
    # Error bound of the kernels' summation. Each product x·y is rounded once (u), each accumulator
    # adds its terms in fp32 in order (recursive summation: |err| <= γ_{m-1}·Σ|x·y|), the lanes and
    # chunks are summed in double and each chunk is rounded to fp32 once (u). With m terms per
    # accumulator at most: |err| <= (m + 1)·u·Σ|x·y| to first order. The CPU kernel keeps at least
    # 2·W accumulators per chunk with W >= 8 fp32 lanes (default/AVX2: 8, AVX-512: 16), so
    # m <= ceil(chunk_len / 16); the CUDA kernel's per-thread sums plus its tree are shorter.
    # Σ|x·y| is gg, rr, pp for the squares and at most √(gg·rr) (Cauchy-Schwarz) for gr.
    u = 2.0 ** -24
    m = torch.tensor([-(-min(n, chunk) // 16) for n in numels], dtype=torch.float64)[:, None]
    mag = want.abs().clone()
    mag[:, 2] = torch.sqrt(want[:, 0] * want[:, 1])
    assert torch.all((got - want).abs() <= (m + 2) * u * mag + 1e-30), (got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 64, 100, 32768])
@pytest.mark.parametrize("seed", range(4))
def test_stats_match_float64(dtype, chunk, seed):
    """Per-chunk sums, regrouped per tensor, equal float64 sums of the upcast values; chunk
    sizes around the vector width (64 = 2·16 lanes, 100, 1) put chunk boundaries everywhere."""
    _check_stats("cpu", dtype, seed, chunk)


def test_stats_many_tensors():
    _check_stats("cpu", torch.float32, 7, 257, n_tensors=300)


def test_stats_rows_layout_and_empty_tensors():
    gs = [torch.ones(0), torch.full((70,), 2.0), torch.ones(())]
    part = ops.sgg_stats(gs, [None, gs[1], None], [None, None, None], 32)
    assert part.shape == (1 + 3 + 1, 4)
    assert part[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert part[1:4, 0].tolist() == [128.0, 128.0, 24.0] and part[1:4, 2].tolist() == [128.0, 128.0, 24.0]
    assert part[4, 0].item() == 1.0


# ---- finalize ------------------------------------------------------------------------------
def _finalize_cases(n, seed, dtype):
    """Random statistics, from vectors and raw, plus the edge cases of guidance.finalize.
    Returns (stats [S, 4], hyper [S, H], nu [S, 2]) in ``dtype``."""
    rng = random.Random(seed)
    rows, hyper, nu = [], [], []
    for _ in range(n):
        kind = rng.choice(["vec", "vec", "raw", "zero_g", "zero_r", "zeros", "anti", "parallel",
                           "conflict", "nonfinite", "tiny", "huge_ratio", "tiny_ratio"])
        m = rng.choice([1, 3, 50])
        g = torch.randn(m, dtype=torch.float64) * rng.choice([1e-4, 1.0, 1e3])
        r = torch.randn(m, dtype=torch.float64) * rng.choice([1e-3, 1.0, 10.0])
        p = torch.randn(m, dtype=torch.float64) * rng.choice([0.0, 1e-5, 1.0])
        if kind == "zero_g":
            g = torch.zeros_like(g)
        elif kind == "zero_r":
            r = torch.zeros_like(r)
        elif kind == "zeros":
            g, r = torch.zeros_like(g), torch.zeros_like(r)
        elif kind == "anti":
            g = -rng.choice([0.5, 2.5, 1.0]) * r
        elif kind == "parallel":
            g = 3.0 * r
        elif kind == "conflict":
            g = g - 3 * r * g.norm() / r.norm()
        elif kind == "tiny":
            g, r = g * 1e-20, r * 1e-20
        elif kind == "huge_ratio":
            r = r / r.norm() * 1e-20
            g = (g / g.norm() - 2 * r / r.norm()) * rng.choice([1.0, 1e8])
        elif kind == "tiny_ratio":
            g, r = g / g.norm() * 1e-9, r / r.norm() * 1e10
        st = [float((g * g).sum()), float((r * r).sum()), float((g * r).sum()), float((p * p).sum())]
        if kind == "raw":
            st = [abs(rng.gauss(0, 10)), abs(rng.gauss(0, 10)), rng.gauss(0, 10), abs(rng.gauss(0, 1))]
        if kind == "nonfinite":
            st[rng.randrange(4)] = rng.choice([float("nan"), float("inf"), -float("inf")])
        rows.append(st)
        mode = rng.choice(list(G.MAG_MODES))
        hyper.append(G.hyper_row(dict(
            lambda_dir=rng.choice([0.0, 0.5, 1.0, rng.random()]), lambda_mag=rng.choice([0.0, 1.0, rng.random()]),
            lambda_align=rng.choice([0.0, 1.0, rng.random()]), mag_mode=mode,
            max_norm=rng.choice([1e-3, 1.0, 1e3]), mag_ratio=rng.choice([0.5, 2.0]), mag_beta=rng.choice([0.0, 0.9]),
            maximize=rng.random() < 0.3, reference=rng.choice(["momentum", "ema", "source"])),
            rewrite_grad=rng.random() < 0.5))
        nu.append(rng.choice([[0.0, 0.0], [0.0, 1.0], [0.3, 1.0], [5.0, 1.0]]))
    t = lambda x: torch.tensor(x, dtype=dtype)
    # ν is float32 state (plan.seg_nus) whatever the statistics' dtype
    return t(rows), t(hyper), torch.tensor(nu, dtype=torch.float32).to(dtype)


def _nus(nu):
    """The op's ν argument: one float32 [2] tensor per segment (plan.seg_nus)."""
    return [row.to(torch.float32).clone() for row in nu]


def _finalize_op(stats, hyper, nu):
    """sgg_finalize on one row per segment; returns (out, ν after the call as [S, 2])."""
    nus = _nus(nu)
    off = torch.arange(len(stats) + 1, dtype=torch.int64, device=stats.device)
    out = ops.sgg_finalize(stats, off, hyper, nus)
    return out, (torch.stack(nus) if nus else torch.zeros(0, 2))


def _cond(stats, hyper):
    """Condition estimate of the finalize math in its inputs (relative error of the result per
    relative perturbation of size eps): the λ3 projection divides by sin²(g, r) (its
    1 - κ² cancels), the blend by ‖w‖²; 1 elsewhere."""
    st, h = stats.double(), hyper.double()
    gg, rr, gr = st[:, G.GG], st[:, G.RR], st[:, G.GR] * h[:, G.H_GRSIGN]
    kap = (gr / (gg.sqrt() * rr.sqrt())).clamp(-1, 1).nan_to_num(0.0)
    sin2 = (1 - kap * kap).clamp_min(1e-300)
    ld = h[:, G.H_LDIR]
    w2 = ((1 - 2 * ld) ** 2 + 2 * ld * (1 - ld) * (1 + kap)).clamp_min(1e-300)
    return (1 + 1 / sin2) * (1 + 1 / w2)


def _assert_finalize_equal(got, want, stats, hyper):
    """The compiled finalize against guidance.finalize.

    float32: bitwise equal, every column (NaNs in the same places). Both evaluate the same
    operations in the same order with IEEE rounding (guidance.sqrt_rn makes torch's CPU sqrt
    correctly rounded; the extension is built without FMA contraction), so any difference is a
    divergence of the mirrors — whatever the CPU vendor or SGG_FAST_CPU_ISA.

    float64 (the torch backend's precision for float64 parameters): torch's CPU float64 sqrt is
    MKL's (within 1 ulp, not correctly rounded), so the two may differ by an ulp in each √. The
    bound: an input perturbation of ~4 ulp (eps64 = 2.2e-16) propagates with the condition
    number :func:`_cond`, so every column agrees to 64·eps64·cond relative, α, β measured in the
    space of u = α·g + β·r (relative to |α|·‖g‖ + |β|·‖r‖); the norms and cos to 8·eps64.
    """
    assert got.shape == want.shape == (want.shape[0], len(G.OUT_COLS)) and got.dtype == want.dtype
    nan_g, nan_w = got.isnan(), want.isnan()
    assert torch.equal(nan_g, nan_w), (got, want)
    if got.dtype == torch.float32:
        same = (got == want) | (nan_g & nan_w)
        assert bool(same.all()), (got[~same.all(1)], want[~same.all(1)], stats[~same.all(1)], hyper[~same.all(1)])
        return
    eps = torch.finfo(got.dtype).eps
    g, w = got.double().nan_to_num(0, 1e300, -1e300), want.double().nan_to_num(0, 1e300, -1e300)
    finite = torch.isfinite(stats).all(1)
    cond = _cond(stats, hyper)
    cols = lambda *names: [G.OUT_COLS.index(n) for n in names]
    exact = cols("grad_norm", "ref_norm", "cos", "dir_penalty", "conflict", "skipped")
    torch.testing.assert_close(g[:, exact], w[:, exact], rtol=8 * eps, atol=8 * eps)
    tol = (64 * eps * cond).clamp_max(64.0)[:, None]  # (beyond cond ~ 1/eps nothing is bounded)
    cond_cols = cols("guided_norm", "norm_ema", "mag_penalty", "mag_scale")
    err = (g[:, cond_cols] - w[:, cond_cols]).abs()
    assert bool(((err <= tol * w[:, cond_cols].abs()) | (err == 0) | ~finite[:, None]).all()), (got, want)
    st = stats.double()
    gn, rn = st[:, G.GG].clamp_min(0).sqrt(), st[:, G.RR].clamp_min(0).sqrt()
    a_err = (g[:, G.O_ALPHA] - w[:, G.O_ALPHA]).abs() * gn + (g[:, G.O_BETA] - w[:, G.O_BETA]).abs() * rn
    size = w[:, G.O_ALPHA].abs() * gn + w[:, G.O_BETA].abs() * rn
    ok = (a_err <= tol[:, 0] * size) | (a_err == 0) | ~finite
    assert bool(ok.all()), (got[~ok], want[~ok], stats[~ok], hyper[~ok])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("seed", range(25))
def test_finalize_mirrors_guidance(dtype, seed):
    """sgg_finalize on reduced statistics == guidance.finalize, column by column (bitwise in
    float32); segments are batched (one call), a non-finite segment sets the global skip, and
    the ν tensors are written back exactly as guidance's norm_ema columns say (relative segments
    only, never when skipped)."""
    stats, hyper, nu = _finalize_cases(12, seed, dtype)
    finite = torch.isfinite(stats).all(1)
    for rows in (finite, torch.ones_like(finite)):  # without and with the non-finite ones
        s, h, n = stats[rows], hyper[rows], nu[rows]
        got, nu_after = _finalize_op(s, h, n)
        want = G.finalize(s, h, n)
        _assert_finalize_equal(got, want, s, h)
        rel = h[:, G.H_MODE] == G.MAG_MODES["relative"]
        skipped = bool(want[0, G.O_SKIP]) if len(want) else False
        expect = torch.where((rel & ~torch.tensor(skipped))[:, None], want[:, [G.O_NU, G.O_NUINIT]].float(),
                             n.float())
        assert torch.equal(nu_after, expect)
        assert torch.equal(got[:, [G.O_NU, G.O_NUINIT]].float(), expect)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_finalize_mirrors_guidance_under_each_cpu_isa(isa):
    """The same comparison in a fresh process under SGG_FAST_CPU_ISA (the kernels' ISA must not
    change the finalize's rounding)."""
    code = ("import sys; sys.path.insert(0, 'tests'); import torch, test_csrc as T; "
            "from sgg_fast import _ext; _ext.load(); "
            "print(torch.ops.sgg_fast.sgg_build_info()); "
            "[T.test_finalize_mirrors_guidance(torch.float32, s) for s in range(25)]; print('ok')")
    res = _run(code, env={"SGG_FAST_CPU_ISA": isa, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
    if isa == "default" or "avx2" in _ext.info().get("cpu_isa", ""):
        assert f"cpu_isa={isa}" in res.stdout, res.stdout


@pytest.mark.parametrize("seed", range(5))
def test_finalize_sums_partials_per_segment(seed):
    """Unreduced partials: finalize sums each segment's rows (in float64, fixed order) first."""
    torch.manual_seed(seed)
    stats, hyper, nu = _finalize_cases(6, seed, torch.float32)
    keep = torch.isfinite(stats).all(1)
    stats, hyper, nu = stats[keep], hyper[keep], nu[keep]
    counts = [random.Random(seed * 7 + k).randint(1, 5) for k in range(len(stats))]
    parts = []
    for row, c in zip(stats, counts):
        w = torch.rand(c, dtype=torch.float64)
        w = w / w.sum()
        part = w[:, None] * row.double()[None, :]
        part[-1] = row.double() - part[:-1].sum(0)
        parts.append(part)
    partials = torch.cat(parts).float()
    off = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int64)
    reduced = ops.sgg_segment_sum(partials, off)
    want_red = torch.stack([p.float().double().sum(0) for p in torch.split(partials, counts)]).float()
    torch.testing.assert_close(reduced, want_red, rtol=0, atol=0)
    got = ops.sgg_finalize(partials, off, hyper, _nus(nu))
    _assert_finalize_equal(got, G.finalize(want_red, hyper, nu), want_red, hyper)


def test_finalize_constants_match_guidance():
    info = _ext.info()
    assert int(info["num_out"]) == len(G.OUT_COLS) and int(info["num_hyper"]) == len(G.HYPER_COLS)
    assert float(info["blend_eps"]) == G.BLEND_EPS and float(info["cancel_eps"]) == G.CANCEL_EPS
    assert float(info["param_norm_floor"]) == G.PARAM_NORM_FLOOR


def test_finalize_column_constants_match_guidance():
    """sgg_common.h's column constants are guidance.py's (parsed from the header)."""
    import re

    text = open(os.path.join(REPO, "csrc", "sgg_common.h")).read()
    consts = {k: int(v) for k, v in re.findall(r"\b([A-Z][A-Z0-9_]*) = (\d+)\b", text)}
    for name in ("GG", "RR", "GR", "PP", "H_LDIR", "H_LMAG", "H_LALIGN", "H_MODE", "H_MAXNORM", "H_RATIO",
                 "H_MBETA", "H_GRSIGN", "H_ASIGN", "H_BSIGN", "O_ALPHA", "O_BETA", "O_NU", "O_NUINIT", "O_GNORM",
                 "O_RNORM", "O_COS", "O_CONFLICT", "O_UNORM", "O_SCALE", "O_DIRPEN", "O_MAGPEN", "O_BAD", "O_SKIP",
                 "N_NU", "N_INIT"):
        assert consts[name] == getattr(G, name), name
    assert consts["NUM_NU"] == len(G.NU_COLS) and consts["NUM_OUT"] == len(G.OUT_COLS)
    assert consts["MAG_RELATIVE"] == G.MAG_MODES["relative"] and consts["MAG_ABSOLUTE"] == G.MAG_MODES["absolute"]


def test_finalize_writes_nu_only_for_relative_segments_of_a_live_step():
    h_rel = G.hyper_row(dict(lambda_dir=0.0, lambda_mag=1.0, lambda_align=0.0, mag_mode="relative",
                             max_norm=1.0, mag_ratio=2.0, mag_beta=0.5))
    h_abs = G.hyper_row(dict(lambda_dir=0.0, lambda_mag=1.0, lambda_align=0.0, mag_mode="absolute",
                             max_norm=1.0, mag_ratio=2.0, mag_beta=0.5))
    stats = torch.tensor([[9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [16.0, 0.0, 0.0, 0.0]])
    hyper = torch.tensor([h_rel, h_abs, h_rel])
    nu = torch.tensor([[1.0, 1.0], [7.0, 1.0], [0.0, 0.0]])
    out, after = _finalize_op(stats, hyper, nu)
    # segment 0: τ = 2, n2 = 3 → n3 = 2, ν = 0.5·1 + 0.5·2; segment 2: first step, ν = n2 = 4
    assert after.tolist() == [[1.5, 1.0], [7.0, 1.0], [4.0, 1.0]]
    bad = stats.clone()
    bad[1, 0] = float("nan")
    out, after = _finalize_op(bad, hyper, nu)
    assert torch.equal(after, nu) and out[:, G.O_SKIP].tolist() == [1.0] * 3


# ---- apply / guide -------------------------------------------------------------------------
def _out(alpha, beta, skip=False, device="cpu"):
    out = torch.zeros(len(alpha), len(G.OUT_COLS))
    out[:, G.O_ALPHA] = torch.tensor(alpha)
    out[:, G.O_BETA] = torch.tensor(beta)
    out[:, G.O_SKIP] = float(skip)
    return out.to(device)


def _apply_case(device, dtype, seed, modes=(0, 1, 2)):
    rng = random.Random(seed)
    shapes = [rng.choice(SIZES) for _ in range(6)]
    mk = lambda s, scale=1.0: (torch.randn(s, device=device) * scale).to(dtype)
    P = len(shapes)
    d = dict(params=[mk(s) for s in shapes], grads=[mk(s) for s in shapes],
             m=[mk(s, 0.1) for s in shapes], v=[mk(s, 0.1).abs() for s in shapes],
             steps=[torch.tensor(float(rng.randint(0, 5)), device=device) for _ in shapes],
             mode=[rng.choice(modes) for _ in shapes], seg=[rng.randrange(3) for _ in shapes],
             lr=[rng.choice([1e-3, 1e-2]) for _ in shapes], b1=[rng.choice([0.9, 0.8]) for _ in shapes],
             b2=[rng.choice([0.999, 0.99]) for _ in shapes], eps=[1e-8] * P,
             wd=[rng.choice([0.0, 0.1]) for _ in shapes], rb=[rng.choice([0.0, 0.9]) for _ in shapes])
    d["refs"] = [torch.empty(0, device=device) if mo == 0 else mk(s) for s, mo in zip(shapes, d["mode"])]
    d["alpha"] = [rng.uniform(0.2, 1.5) for _ in range(3)]
    d["beta"] = [rng.uniform(-1, 1) for _ in range(3)]
    return d


def _apply_want(d):
    """float64 AdamW on u = α·g + β·r per tensor (DESIGN §1 D)."""
    out = []
    for i, p in enumerate(d["params"]):
        g, m, v = d["grads"][i].double(), d["m"][i].double(), d["v"][i].double()
        r = m if d["mode"][i] == 0 else d["refs"][i].double()
        s = d["seg"][i]
        u = d["alpha"][s] * g + d["beta"][s] * r
        r_new = d["rb"][i] * r + (1 - d["rb"][i]) * g if d["mode"][i] == 1 else None
        t = float(d["steps"][i]) + 1
        b1, b2, lr = d["b1"][i], d["b2"][i], d["lr"][i]
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * u * u
        pn = p.double() * (1 - lr * d["wd"][i])
        pn = pn - (lr / (1 - b1 ** t)) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + d["eps"][i])
        out.append((pn, m, v, r_new, t))
    return out


def _call_apply(d, out, lr_tensors=()):
    ws, wsh = _ws(len(d["params"]), d["params"][0].device)
    ops.sgg_adamw_apply(d["params"], d["grads"], d["m"], d["v"], d["steps"], d["refs"], out, d["seg"],
                        d["lr"], d["b1"], d["b2"], d["eps"], d["wd"], d["rb"], d["mode"], list(lr_tensors),
                        [], ws, wsh)


def _check_apply(device, dtype, seed):
    d = _apply_case(device, dtype, seed)
    want = _apply_want(d)
    _call_apply(d, _out(d["alpha"], d["beta"], device=device))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for i, (p, m, v, r, t) in enumerate(want):
        torch.testing.assert_close(d["params"][i].double(), p.to(d["params"][i].device), **tol)
        torch.testing.assert_close(d["m"][i].double(), m.to(d["m"][i].device), **tol)
        torch.testing.assert_close(d["v"][i].double(), v.to(d["v"][i].device), **tol)
        if r is not None:
            torch.testing.assert_close(d["refs"][i].double(), r.to(d["refs"][i].device), **tol)
        assert float(d["steps"][i]) == t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_adamw_apply_matches_float64(dtype, seed):
    _check_apply("cpu", dtype, seed)


def test_adamw_apply_skip_changes_nothing():
    d = _apply_case("cpu", torch.float32, 3)
    before = {k: [t.clone() for t in d[k]] for k in ("params", "m", "v", "refs", "steps")}
    _call_apply(d, _out(d["alpha"], d["beta"], skip=True))
    for k, ts in before.items():
        for a, b in zip(ts, d[k]):
            assert torch.equal(a, b)


def test_adamw_apply_lr_tensor_overrides_lr():
    d = _apply_case("cpu", torch.float32, 4)
    e = {k: ([t.clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v)
         for k, v in d.items()}
    lr_t = [torch.tensor(0.05) if i % 2 == 0 else None for i in range(len(d["params"]))]
    e["lr"] = [0.05 if i % 2 == 0 else lr for i, lr in enumerate(d["lr"])]
    d["lr"] = [123.0 if i % 2 == 0 else lr for i, lr in enumerate(d["lr"])]  # ignored: overridden
    _call_apply(d, _out(d["alpha"], d["beta"]), lr_t)
    _call_apply(e, _out(e["alpha"], e["beta"]))
    for a, b in zip(d["params"], e["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guide_apply_matches_float64(dtype):
    torch.manual_seed(0)
    shapes = [(), (97,), (4097,), (0,), (33000,)]
    gs = [torch.randn(s).to(dtype) for s in shapes]
    modes = [0, 1, 2, 1, 0]
    refs = [NONE, torch.randn(97).to(dtype), torch.randn(4097).to(dtype), torch.randn(0).to(dtype),
            torch.randn(33000).to(dtype)]
    seg, rb = [0, 1, 1, 0, 1], [0.9, 0.5, 0.9, 0.9, 0.0]
    alpha, beta = [0.7, 1.2], [-0.3, 0.4]
    want_g = [alpha[s] * g.double() + (beta[s] * r.double() if r is not NONE else 0) for g, r, s in zip(gs, refs, seg)]
    want_r = [rb[i] * r.double() + (1 - rb[i]) * gs[i].double() if m == 1 else r.double()
              for i, (r, m) in enumerate(zip(refs, modes))]
    ops.sgg_guide_apply(gs, refs, _out(alpha, beta), seg, rb, modes)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for g, w in zip(gs, want_g):
        torch.testing.assert_close(g.double(), w, **tol)
    for r, w in zip(refs, want_r):
        torch.testing.assert_close(r.double(), w, **tol)


# ---- determinism ---------------------------------------------------------------------------
def _steps(threads: int, dtype=torch.float32):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(11)
        ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in [(300, 257), (70001,), (3,), (129, 64)]]
        opt = SGGAdamW([{"params": ps[:2]}, {"params": ps[2:], "reference": "ema"}], lr=1e-2, lambda_dir=0.3,
                       lambda_mag=0.8, lambda_align=1.0, backend="cpu")
        parts = []
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=dtype)
            parts.append(ops.sgg_stats([p.grad for p in ps], [opt.state[p].get("exp_avg") for p in ps],
                                       list(ps), 1000))
            opt.step()
        return [p.detach().clone() for p in ps], parts, opt.last_stats()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_thread_counts(dtype):
    p1, s1, st1 = _steps(1, dtype)
    p2, s2, st2 = _steps(2, dtype)
    p3, s3, st3 = _steps(3, dtype)
    for a, b, c in zip(p1, p2, p3):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b, c in zip(s1, s2, s3):
        assert torch.equal(a, b) and torch.equal(a, c)
    for k in st1:
        assert torch.equal(st1[k], st2[k])


_ISA_SCRIPT = r"""
import torch, sys
from sgg_fast import SGGAdamW, _ext
assert _ext.load(), _ext.error()
torch.manual_seed(5)
shapes = [(97,), (4097,), (33, 65), ()]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    ps = [torch.randn(s).to(dt).requires_grad_() for s in shapes]
    opt = SGGAdamW(ps, lr=1e-2, lambda_dir=0.3, lambda_mag=0.8, lambda_align=1.0, reference="ema",
                   mag_mode="absolute", max_norm=3.0, backend="cpu")
    for k in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape).to(dt)
        opt.step()
    torch.save({"isa": _ext.info()["cpu_isa"], "p": [p.detach() for p in ps],
                "ref": [opt.state[p]["ref"] for p in ps], "stats": opt.last_stats()},
               sys.argv[-1] + f"_{dt}".replace("torch.", ""))
"""


def test_instruction_sets_agree(tmp_path):
    """The default / AVX2 / AVX-512 kernel builds (SGG_FAST_CPU_ISA) give the same steps: the
    elementwise math bitwise (no FMA contraction), the statistics to rounding (lane counts
    differ, so the summation order does)."""
    results = {}
    for isa in ("default", "avx2", "avx512"):
        out = str(tmp_path / isa)
        res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, out], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "SGG_FAST_CPU_ISA": isa}, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        results[isa] = {dt: torch.load(out + f"_{dt}", weights_only=False) for dt in ("float32", "bfloat16", "float16")}
    got_isas = {r["float32"]["isa"] for r in results.values()}
    assert "default" in got_isas  # the portable build ran (the others when this CPU has them)
    base = results["default"]
    for isa, res in results.items():
        for dt in base:
            for a, b in zip(res[dt]["p"], base[dt]["p"]):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 if dt == "float32" else 1e-2, atol=1e-6)
            for a, b in zip(res[dt]["ref"], base[dt]["ref"]):  # depends on g only: bitwise
                assert torch.equal(a, b), (isa, dt)
            torch.testing.assert_close(res[dt]["stats"]["grad_norm"], base[dt]["stats"]["grad_norm"], rtol=1e-5, atol=0)


# ---- bad input -----------------------------------------------------------------------------
def test_errors_name_the_tensor_and_change_nothing():
    d = _apply_case("cpu", torch.float32, 1)
    d["m"][3] = d["m"][3].double()
    snap = [p.clone() for p in d["params"]]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[3\] has dtype Double but params\[3\]"):
        _call_apply(d, _out(d["alpha"], d["beta"]))
    assert all(torch.equal(a, b) for a, b in zip(snap, d["params"]))
    with pytest.raises(RuntimeError, match=r"refs\[1\] has shape"):
        ops.sgg_stats([torch.randn(3), torch.randn(4)], [None, torch.randn(5)], [None, None], 64)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Double.*backend='torch'"):
        ops.sgg_stats([torch.randn(3, dtype=torch.float64)], [None], [None], 64)
    with pytest.raises(RuntimeError, match=r"params has 1 entries but grads has 2"):
        ops.sgg_stats([torch.randn(3), torch.randn(4)], [None, None], [None], 64)
    with pytest.raises(RuntimeError, match=r"seg_offsets must start at 0"):
        ops.sgg_finalize(torch.zeros(3, 4), torch.tensor([0, 2]), torch.zeros(1, len(G.HYPER_COLS)), [torch.zeros(2)])
    with pytest.raises(RuntimeError, match=r"hyper must have shape \[S, 10\]"):
        ops.sgg_finalize(torch.zeros(2, 4), torch.tensor([0, 2]), torch.zeros(1, 7), [torch.zeros(2)])
    with pytest.raises(RuntimeError, match=r"nu must hold one .* per segment \(1\), got 2"):
        ops.sgg_finalize(torch.zeros(2, 4), torch.tensor([0, 2]), torch.zeros(1, 10), [torch.zeros(2)] * 2)
    with pytest.raises(RuntimeError, match=r"nu\[0\] must be a contiguous float32 CPU tensor of 2 elements"):
        ops.sgg_finalize(torch.zeros(2, 4), torch.tensor([0, 2]), torch.zeros(1, 10), [torch.zeros(1)])
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"refs\[0\] \(strides"):
        ops.sgg_stats([x.t().contiguous()], [x.t()], [None], 64)
    e = _apply_case("cpu", torch.float32, 2)
    e["steps"][0] = torch.zeros((), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32"):
        _call_apply(e, _out(e["alpha"], e["beta"]))


def test_dense_non_contiguous_parameters_work():
    """channels_last-like layouts (dense, same strides everywhere) run on the fused path."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, 4, 5)
    p = base.contiguous(memory_format=torch.channels_last).requires_grad_()
    q = base.clone().requires_grad_()
    o1 = SGGAdamW([p], lr=1e-2, backend="cpu")
    o2 = SGGAdamW([q], lr=1e-2, backend="torch")
    for _ in range(3):
        g = torch.randn(2, 3, 4, 5)
        p.grad = g.contiguous(memory_format=torch.channels_last)
        q.grad = g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


# ---- torch.compile / fake implementations ------------------------------------------------------
def _sample_apply_args(d, out):
    return (d["params"], d["grads"], d["m"], d["v"], d["steps"], d["refs"], out, d["seg"], d["lr"], d["b1"],
            d["b2"], d["eps"], d["wd"], d["rb"], d["mode"], [], [])


def test_opcheck_all_ops():
    torch.manual_seed(0)
    gs = [torch.randn(97), torch.randn(3, 5)]
    rs = [torch.randn(97), None]
    torch.library.opcheck(ops.sgg_stats.default, (gs, rs, [None, torch.randn(3, 5)], 64))
    partials = ops.sgg_stats(gs, rs, [None, None], 64)
    off = torch.tensor([0, 2, 3])
    hyper = torch.tensor([G.hyper_row(dict(lambda_dir=0.3, lambda_mag=1.0, lambda_align=1.0, mag_mode="absolute",
                                           max_norm=1.0, mag_ratio=2.0, mag_beta=0.9))] * 2)
    torch.library.opcheck(ops.sgg_segment_sum.default, (partials, off))
    torch.library.opcheck(ops.sgg_finalize.default, (partials, off, hyper, [torch.zeros(2), torch.zeros(2)]))
    d = _apply_case("cpu", torch.float32, 0, modes=(0, 2))
    torch.library.opcheck(ops.sgg_adamw_apply.default, _sample_apply_args(d, _out(d["alpha"], d["beta"])))
    g2 = [torch.randn(97), torch.randn(5)]
    torch.library.opcheck(ops.sgg_guide_apply.default,
                          (g2, [torch.randn(97), torch.empty(0)], _out([0.5], [0.1]), [0, 0], [0.9, 0.9], [1, 0]))


def test_torch_compile_traces_a_full_step():
    """A step written with the ops compiles (fake impls + functionalization of the in-place
    apply) and computes what the eager ops compute."""
    torch.manual_seed(0)
    d = _apply_case("cpu", torch.float32, 5, modes=(0, 2))
    d["nus"] = [torch.tensor([0.5, 1.0]), torch.zeros(2), torch.tensor([2.0, 1.0])]
    e = {k: ([t.clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v)
         for k, v in d.items()}
    hyper = torch.tensor([G.hyper_row(dict(lambda_dir=0.3, lambda_mag=1.0, lambda_align=1.0, mag_mode="relative",
                                           max_norm=1.0, mag_ratio=2.0, mag_beta=0.9))] * 3)
    seg_of = d["seg"]

    def step(x):
        r = [m if mo == 0 else ref for m, mo, ref in zip(x["m"], x["mode"], x["refs"])]
        part = ops.sgg_stats(x["grads"], r, [None] * len(r), 64)
        rows = _rows([g.numel() for g in x["grads"]], 64)
        # segment offsets for tensors sorted by segment: rebuild partials in segment order
        order = sorted(range(len(rows)), key=lambda i: seg_of[i])
        starts = [sum(rows[:i]) for i in range(len(rows))]
        part = torch.cat([part[starts[i]:starts[i] + rows[i]] for i in order])
        counts = [sum(rows[i] for i in order if seg_of[i] == s) for s in range(3)]
        off = torch.tensor([0, counts[0], counts[0] + counts[1], sum(counts)], dtype=torch.int64)
        out = ops.sgg_finalize(part, off, hyper, x["nus"])
        ops.sgg_adamw_apply(x["params"], x["grads"], x["m"], x["v"], x["steps"], x["refs"], out, x["seg"],
                            x["lr"], x["b1"], x["b2"], x["eps"], x["wd"], x["rb"], x["mode"], [], [])
        return out

    want = step(d)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(e)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(d["params"], e["params"]):
        assert torch.equal(a, b)
    for a, b in zip(d["steps"], e["steps"]):
        assert torch.equal(a, b)
    for a, b in zip(d["nus"], e["nus"]):  # the in-place ν update survives functionalization
        assert torch.equal(a, b)


# ---- memory ------------------------------------------------------------------------------------
def _step_alloc_bytes(n: int) -> tuple[int, int]:
    """(bytes allocated during one step: the leaf events' memory (the top-level ones are net of
    frees), statistics rows)."""
    ps = [torch.randn(n // 4, requires_grad=True) for _ in range(4)]
    opt = SGGAdamW(ps, lr=1e-3, lambda_dir=0.2, lambda_mag=1.0, lambda_align=1.0, backend="cpu")
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()  # state and caches exist from here on
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events() if not e.cpu_children)
    rows = sum(_rows([p.numel() for p in ps], cpp_backend.CPU_STATS_CHUNK))
    return allocated, rows


def test_step_allocations_do_not_grow_with_n():
    """The profiler's memory events of a step: the [rows, 4] fp32 partials (16 bytes per 32 Ki
    elements) plus a constant, never O(N) (one fp32 copy of 16 M parameters would be 64 MiB)."""
    for n in (1 << 18, 1 << 24):
        allocated, rows = _step_alloc_bytes(n)
        assert allocated - 16 * rows < 8 * 1024, (n, allocated, rows)


# ---- CUDA (run by benchmarks/gpu_check.sh on a lent GPU) ---------------------------------------
@cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [64, 32768])
def test_cuda_stats_match_float64(dtype, chunk):
    for seed in range(3):
        _check_stats("cuda", dtype, seed, chunk)
    _check_stats("cuda", dtype, 9, chunk, n_tensors=200)


@cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_finalize_mirrors_guidance(dtype):
    for seed in range(10):
        stats, hyper, nu = _finalize_cases(40, seed, dtype)
        finite = torch.isfinite(stats).all(1)
        for rows in (finite, torch.ones_like(finite)):
            s, h, n = stats[rows].cuda(), hyper[rows].cuda(), nu[rows].cuda()
            got, after = _finalize_op(s, h, n)
            want = G.finalize(s, h, n)
            _assert_finalize_equal(got.cpu(), want.cpu(), s.cpu(), h.cpu())
            # and the CPU op, bitwise, on the same inputs (float32)
            if dtype == torch.float32:
                cpu_out, cpu_after = _finalize_op(s.cpu(), h.cpu(), n.cpu())
                assert torch.equal(got.cpu().nan_to_num(7.0), cpu_out.nan_to_num(7.0))
                assert torch.equal(after.cpu(), cpu_after)


@cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_apply_matches_float64(dtype):
    for seed in range(4):
        _check_apply("cuda", dtype, seed)


def _cuda_pair(backend_a="cuda", backend_b="torch", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    shapes = [(1000, 257), (4097,), (), (0,), (3, 70000)]
    ps = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    cfg = dict(lr=1e-2, lambda_dir=0.3, lambda_mag=0.8, lambda_align=1.0, **kw)
    return ps, qs, SGGAdamW(ps, backend=backend_a, **cfg), SGGAdamW(qs, backend=backend_b, **cfg)


@cuda
@needs_cuda_ext
@pytest.mark.parametrize("cfg", [dict(reference="momentum", mag_mode="relative"),
                                 dict(reference="ema", mag_mode="absolute", max_norm=5.0, granularity="tensor"),
                                 dict(reference="momentum", mag_mode="param", granularity="global")],
                         ids=["momentum", "ema", "param"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_backend_equals_torch_backend(cfg, dtype):
    ps, qs, a, b = _cuda_pair(dtype=dtype, **cfg)
    for _ in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, device="cuda").to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol)
        assert float(a.state[p]["step"]) == 5.0
    for k in ("grad_norm", "cos", "guided_norm", "mag_scale"):
        torch.testing.assert_close(a.last_stats()[k], b.last_stats()[k], rtol=1e-4, atol=1e-6)


@cuda
@needs_cuda_ext
def test_cuda_step_has_no_host_sync():
    """After one warm-up step (caches, device table) a step makes no host sync."""
    ps, _, a, _ = _cuda_pair(mag_mode="absolute", max_norm=5.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    a.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            a.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda
@needs_cuda_ext
def test_cuda_nonfinite_step_is_skipped_on_device():
    ps, _, a, _ = _cuda_pair(mag_mode="absolute")
    for p in ps:
        p.grad = torch.randn_like(p)
    a.step()
    before = [p.detach().clone() for p in ps] + [a.state[p]["exp_avg"].clone() for p in ps]
    ps[0].grad[3, 5] = float("nan")
    a.step()
    after = [p.detach() for p in ps] + [a.state[p]["exp_avg"] for p in ps]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert float(a.state[ps[0]]["step"]) == 1.0 and bool(a.last_stats()["skipped"].all())


@cuda
@needs_cuda_ext
def test_cuda_graph_replay_equals_eager():
    ps, qs, a, b = _cuda_pair("cuda", "cuda", mag_mode="absolute", max_norm=5.0)
    grads = [[torch.randn_like(p) for p in ps] for _ in range(6)]
    static = [torch.zeros_like(p) for p in ps]
    for p, s in zip(ps, static):
        p.grad = s
    for q, g in zip(qs, grads[0]):
        q.grad = g.clone()
    b.step()  # eager reference, step 1
    for s, g in zip(static, grads[0]):
        s.copy_(g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        a.step()  # warm-up (eager) step 1: builds caches and the device table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.step()
    for k in range(1, 6):
        for s, g in zip(static, grads[k]):
            s.copy_(g)
        graph.replay()
        for q, g in zip(qs, grads[k]):
            q.grad = g.clone()
        b.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == 6.0


@cuda
@needs_cuda_ext
def test_cuda_tensor_over_2_31_elements():
    n = (1 << 31) + 4099
    g = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    part = ops.sgg_stats([g], [None], [None], cpp_backend.CUDA_STATS_CHUNK, *_ws(1, "cuda"))
    assert part.shape[0] == -(-n // cpp_backend.CUDA_STATS_CHUNK)
    assert int(part[:, 0].double().sum()) == n  # every element counted once (exact: sums of ones)
    assert float(part[-1, 0]) == float(n % cpp_backend.CUDA_STATS_CHUNK)  # the last, partial chunk
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.zeros((), device="cuda")
    out = _out([1.0], [0.0], device="cuda")
    ops.sgg_adamw_apply([p], [g], [m], [v], [step], [torch.empty(0, device="cuda")], out, [0], [0.1], [0.9],
                        [0.999], [1e-8], [0.0], [0.9], [0], [], [], *_ws(1, "cuda"))
    assert float(step) == 1.0
    assert float(p[0]) == float(p[-1]) != 0.0 and float(m[-1]) == float(m[0])
    assert int((p == 0).sum()) == 0


# ---- build helpers -----------------------------------------------------------------------------
def test_cuda_home_from_a_wrapper_script(tmp_path):
    """nvcc on PATH may be `exec /opt/cuda-x/bin/nvcc "$@"` (torch would guess /usr/local)."""
    from sgg_fast import _build

    root = tmp_path / "cuda-13.0"
    (root / "bin").mkdir(parents=True)
    real = root / "bin" / "nvcc"
    real.write_text("#!/bin/sh\n")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    assert _build.cuda_home_from_nvcc(str(wrapper)) == str(root)
    link = tmp_path / "nvcc-link"
    link.symlink_to(real)
    assert _build.cuda_home_from_nvcc(str(link)) == str(root)
    assert _build.parse_archs("80;90") == ["80", "90"] and _build.parse_archs("8.0 9.0+PTX") == ["80", "90+PTX"]
    flags = " ".join(_build.nvcc_flags(["90+PTX"]))
    assert "arch=compute_90,code=sm_90" in flags and "code=compute_90" in flags


def test_backend_reduce_then_finalize_equals_finalize():
    """The distributed path (reduce → all-reduce → finalize on reduced partials) gives the same
    α, β as finalizing the per-chunk partials directly."""
    from sgg_fast.backends import get_backend
    from sgg_fast.backends.base import Backend

    torch.manual_seed(3)
    ps = [torch.randn(s, requires_grad=True) for s in [(70000,), (33, 1000), (5,), (40000,)]]
    opt = SGGAdamW([{"params": ps[:2]}, {"params": ps[2:], "mag_mode": "param"}], lr=1e-2, backend="cpu")
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape)
    plan = opt._prepare()
    be = get_backend("cpu")
    parts = be.stats(plan)
    assert not parts.is_reduced and len(parts.offsets) == 3
    red = be.reduce(plan, parts)
    assert red.is_reduced
    torch.testing.assert_close(red.values, Backend.reduce(be, plan, parts).values, rtol=1e-6, atol=0)
    before = [t.clone() for t in plan.seg_nus]
    a = be.finalize(plan, parts)  # writes ν of the relative segment
    after = [t.clone() for t in plan.seg_nus]
    for t, v in zip(plan.seg_nus, before):
        t.copy_(v)
    b = be.finalize(plan, red)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(plan.seg_nus, after))
