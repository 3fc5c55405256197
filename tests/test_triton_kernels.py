"""Kernel-level tests of the Triton backend (kernels/stats.py, kernels/apply.py).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before anything imports triton; see the
Makefile's ``test`` target) and on CUDA tensors when a GPU is present; skipped otherwise. Tests
marked ``cuda`` need a real GPU (and no interpreter): ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

pytest.importorskip("triton")  # noqa: E402  (the module is skipped, not failed, without triton)

from _vector_cases import KINDS, arrange  # noqa: E402
from sgg_fast import GradientGuidance, SGGAdamW  # noqa: E402
from sgg_fast import guidance as G  # noqa: E402
from sgg_fast.backends import get_backend, resolve  # noqa: E402
from sgg_fast.backends import triton_backend as TB  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERP else "cuda"

if not INTERP:
    # on CUDA tensors: every test of this file is a GPU test (benchmarks/gpu_check.sh runs -m cuda)
    pytestmark = [pytest.mark.cuda] + (
        [] if HAS_CUDA else [pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")]
    )

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kernels():
    from sgg_fast.kernels import apply as kapply
    from sgg_fast.kernels import launches as kernels
    from sgg_fast.kernels import stats as kstats

    return kernels, kstats, kapply


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 blocks (2048 elements), so that modest tensors span several chunks."""
    _, kstats, _ = _kernels()
    monkeypatch.setattr(TB, "CHUNK_OVERRIDE", 2 * kstats.BLOCK)
    return 2 * kstats.BLOCK


def _params(shapes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(dt).to(DEVICE).requires_grad_()
            for s, dt in zip(shapes, dtypes)]


def _set_grads(ps, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g, dtype=F64) * scale).to(p.dtype).to(DEVICE)


def _planned(ps, refs=None, **kw):
    """An SGGAdamW with reference='source' (r = refs) and mag_mode='param', and its step plan."""
    kw = {**dict(reference="source", mag_mode="param", granularity="tensor", backend="triton"), **kw}
    opt = SGGAdamW(ps, **kw)
    if kw["reference"] == "source":
        opt.set_reference(refs)
    return opt, opt._prepare()


def _stats64(plan):
    """Float64 (gg, rr, gr, pp) per segment, computed directly from the tensors."""
    rows = []
    for s in plan.segments:
        acc = torch.zeros(4, dtype=F64)
        for i in range(s.start, s.stop):
            g = plan.grads[i].detach().double().reshape(-1).cpu()
            r = plan.refs[i].detach().double().reshape(-1).cpu()
            p = plan.params[i].detach().double().reshape(-1).cpu()
            acc += torch.stack([g @ g, r @ r, g @ r, p @ p])
        rows.append(acc)
    return torch.stack(rows)


def _check_stats(plan, parts):
    """Partials summed per segment (float64) against the float64 statistics; rows per chunk."""
    want = _stats64(plan)
    vals = parts.values.double().cpu()
    got = torch.stack([vals[parts.offsets[s]:parts.offsets[s + 1]].sum(0) for s in range(len(plan.segments))])
    assert parts.offsets[-1] == len(vals)
    # sums of squares: relative; g·r may cancel: relative to √(gg·rr)
    for c in (G.GG, G.RR, G.PP):
        torch.testing.assert_close(got[:, c], want[:, c], rtol=2e-5, atol=1e-30)
    scale = (want[:, G.GG] * want[:, G.RR]).sqrt()
    assert ((got[:, G.GR] - want[:, G.GR]).abs() <= 2e-5 * scale + 1e-30).all()


# ---- statistics --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, granularity", [(1, "tensor"), (7, "tensor"), (7, "group"), (1000, "tensor"),
                                            (40, "group")])
def test_stats_many_tiny_tensors(n, granularity):
    rng = random.Random(n)
    shapes = [(rng.randint(0, 20),) if k % 5 else () for k in range(n)]
    dtypes = [rng.choice(DTYPES) for _ in range(n)]
    ps = _params(shapes, dtypes, seed=n)
    _set_grads(ps, seed=n + 1)
    refs = [torch.randn(p.shape, dtype=F64).to(p.dtype).to(DEVICE) for p in ps]
    _, plan = _planned(ps, refs, granularity=granularity)
    parts = get_backend("triton").stats(plan)
    assert parts.values.shape == (n, 4)  # one chunk per tiny tensor (0-element ones included)
    _check_stats(plan, parts)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_stats_tensors_larger_than_a_chunk(dtype, small_chunks):
    C = small_chunks
    shapes = [(3 * C + 5,), (C,), (C - 1,), (C + 1,), (0,), (), (2, C // 2 + 3)]
    ps = _params(shapes, [dtype] * len(shapes), seed=3)
    _set_grads(ps, seed=4)
    refs = [torch.randn(p.shape, dtype=F64).to(dtype).to(DEVICE) for p in ps]
    _, plan = _planned(ps, refs)
    parts = get_backend("triton").stats(plan)
    per = [max(1, math.ceil(p.numel() / C)) for p in ps]
    assert parts.values.shape[0] == sum(per)
    # every chunk row holds exactly its own slice of its tensor
    row = 0
    for p, g, r, k in zip(plan.params, plan.grads, plan.refs, per):
        for j in range(k):
            sl = slice(j * C, (j + 1) * C)
            gs, rs, ps_ = (t.detach().reshape(-1)[sl].double().cpu() for t in (g, r, p))
            want = torch.stack([gs @ gs, rs @ rs, gs @ rs, ps_ @ ps_])
            torch.testing.assert_close(parts.values[row].double().cpu(), want, rtol=2e-5, atol=1e-6)
            row += 1
    _check_stats(plan, parts)


def test_stats_mixed_sizes_and_dtypes_in_one_launch(small_chunks):
    kernels, _, _ = _kernels()
    shapes = [(5000,), (0,), (), (97,), (4097,), (33, 17), (1,), (2049,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16,
              torch.float32, torch.float32, torch.bfloat16]
    ps = _params(shapes, dtypes, seed=5)
    _set_grads(ps, seed=6)
    refs = [torch.randn(p.shape, dtype=F64).to(p.dtype).to(DEVICE) for p in ps]
    _, plan = _planned(ps, refs, granularity="global")
    kernels.reset_launches()
    parts = get_backend("triton").stats(plan)
    assert kernels.LAUNCHES == {"stats": 1}
    _check_stats(plan, parts)


def test_stats_without_reference_and_without_pp():
    """r = None (GradientGuidance before the wrapped optimizer keeps momentum): rr = gr = 0;
    pp is only accumulated for mag_mode='param' segments."""
    ps = _params([(50,), (7,)], [torch.float32] * 2, seed=7)
    _set_grads(ps, seed=8)
    gg = GradientGuidance(torch.optim.AdamW(ps), backend="triton", mag_mode="absolute", granularity="tensor")
    plan = gg._prepare()
    assert plan.refs == [None, None]
    parts = get_backend("triton").stats(plan)
    v = parts.values.double().cpu()
    want = torch.stack([p.grad.double().cpu().pow(2).sum() for p in ps])
    torch.testing.assert_close(v[:, G.GG], want, rtol=1e-5, atol=0)
    assert (v[:, [G.RR, G.GR, G.PP]] == 0).all()


# ---- finalize ----------------------------------------------------------------------------------
def _random_segment_stats(rng, S, with_bad):
    """Statistics of S random segments (every kind: zeros, conflicts, antiparallel, aligned,
    no reference, tiny/huge norms), computed in fp32 from explicit vectors."""
    rows, hyper, nus = [], [], []
    kinds = KINDS
    for s in range(S):
        n = rng.choice([1, 3, 40])
        g = torch.randn(n, dtype=F64) * rng.choice([1e-3, 1.0, 50.0])
        r = torch.randn(n, dtype=F64) * rng.choice([0.1, 1.0])
        kind = kinds[s % len(kinds)]
        g, r = arrange(kind, g, r, anti=rng.choice([0.3, 2.5]) if kind == "antiparallel" else 2.5)
        p = torch.randn(n, dtype=F64) * rng.choice([1e-5, 1.0])
        g, r, p = g.float(), r.float(), p.float()
        rows.append(torch.stack([(g * g).sum(), (r * r).sum(), (g * r).sum(), (p * p).sum()]))
        hyper.append(G.hyper_row(dict(
            lambda_dir=rng.choice([0.0, 0.5, 1.0, rng.random()]),
            lambda_mag=rng.choice([0.0, 0.5, 1.0, rng.random()]),
            lambda_align=rng.choice([0.0, 1.0, rng.random()]),
            mag_mode=rng.choice(["absolute", "relative", "param"]),
            max_norm=rng.choice([0.01, 1.0, 100.0]), mag_ratio=rng.choice([0.5, 2.0]),
            mag_beta=rng.choice([0.0, 0.9]), maximize=rng.random() < 0.3,
            reference=rng.choice(["momentum", "ema", "source"])), rewrite_grad=rng.random() < 0.5))
        nus.append(rng.choice([[0.0, 0.0], [0.0, 1.0], [0.3, 1.0], [5.0, 1.0]]))
    stats = torch.stack(rows).float()
    if with_bad:
        for s in rng.sample(range(S), max(1, S // 10)):
            stats[s, rng.randrange(4)] = rng.choice([float("nan"), float("inf"), -float("inf")])
    return stats, torch.tensor(hyper, dtype=torch.float32), torch.tensor(nus, dtype=torch.float32)


def _segs_table(lo_hi, nu_addrs=None):
    rows = [[lo, hi, 0 if nu_addrs is None else nu_addrs[s]] for s, (lo, hi) in enumerate(lo_hi)]
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE).reshape(len(rows), 3)


def _run_finalize(partials, segs, hyper, nu, nu_mode):
    _, kstats, _ = _kernels()
    S = segs.shape[0]
    red = torch.empty(S, 4, device=DEVICE)
    out = torch.empty(S, len(G.OUT_COLS), device=DEVICE)
    kstats.launch_finalize(partials.to(DEVICE), segs, hyper.to(DEVICE), nu.to(DEVICE), red, out, nu_mode=nu_mode)
    return red.cpu(), out.cpu()


def _assert_out_close(got, want):
    """Bitwise agreement, NaNs in the same places: the kernel evaluates guidance.finalize's
    operations in the same order with IEEE div_rn / sqrt_rn and no FMA contraction (and
    guidance.sqrt_rn makes torch's CPU sqrt IEEE), so any difference is a divergence."""
    for c, name in enumerate(G.OUT_COLS):
        a, b = got[:, c], want[:, c]
        same = (a == b) | (a.isnan() & b.isnan())
        assert bool(same.all()), (name, a[~same], b[~same])


@pytest.mark.parametrize("S", [1, 5, 37, 300])
@pytest.mark.parametrize("with_bad", [False, True], ids=["finite", "nonfinite"])
def test_finalize_matches_guidance(S, with_bad):
    stats, hyper, nu = _random_segment_stats(random.Random(S * 7 + with_bad), S, with_bad)
    want = G.finalize(stats, hyper, nu)
    red, got = _run_finalize(stats, _segs_table([(s, s + 1) for s in range(S)]), hyper, nu, nu_mode=1)
    assert torch.equal(red, stats) or torch.equal(red.isnan(), stats.isnan())
    _assert_out_close(got, want)
    assert bool((got[:, G.O_SKIP] == 1).all()) == with_bad and bool((got[:, G.O_SKIP] == 0).all()) != with_bad
    if with_bad:
        assert torch.equal(got[:, [G.O_NU, G.O_NUINIT]], nu)  # ν unchanged when skipping
    # ν read through the addresses of each segment's (ν, initialised) tensor (plan.seg_nus,
    # the path the optimizer uses) and written back for relative segments unless skipped
    states = [row.clone().to(DEVICE) for row in nu]
    segs = _segs_table([(s, s + 1) for s in range(S)], [t.data_ptr() for t in states])
    _, got2 = _run_finalize(stats, segs, hyper, torch.zeros(1), nu_mode=2)
    assert torch.equal(got2.nan_to_num(7.0), got.nan_to_num(7.0))
    rel = hyper[:, G.H_MODE] == G.MAG_MODES["relative"]
    expect = torch.where((rel & (not with_bad))[:, None], want[:, [G.O_NU, G.O_NUINIT]], nu)
    assert torch.equal(torch.stack([t.cpu() for t in states]), expect)


@pytest.mark.parametrize("bad_at", [None, 0, 18, 36], ids=["finite", "bad-first", "bad-middle", "bad-last"])
def test_finalize_grid_equals_one_program(bad_at, monkeypatch):
    """The grid of finalize (one program per tile of segments, the last to finish writes the
    global skip and the ν write-back) gives the bits of one program walking every segment,
    whichever tile holds the one non-finite segment; the workspace is left zero."""
    _, kstats, _ = _kernels()
    S = 37
    stats, hyper, nu = _random_segment_stats(random.Random(5), S, False)
    hyper[:, G.H_MODE] = G.MAG_MODES["relative"]  # every segment writes ν back unless skipped
    if bad_at is not None:
        stats[bad_at, 2] = float("nan")
    grids = []
    real = kstats._finalize_kernel

    class Recorder:  # records each launch's grid
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(kstats, "_finalize_kernel", Recorder())
    results = {}
    for sb in (64, 16, 4, 2):
        states = [row.clone().to(DEVICE) for row in nu]
        segs = _segs_table([(s, s + 1) for s in range(S)], [t.data_ptr() for t in states])
        sync = kstats.finalize_workspace(DEVICE)
        red = torch.empty(S, 4, device=DEVICE)
        out = torch.empty(S, len(G.OUT_COLS), device=DEVICE)
        kstats.launch_finalize(stats.to(DEVICE), segs, hyper.to(DEVICE), torch.zeros(1, device=DEVICE), red, out,
                               nu_mode=2, sync=sync, max_seg_block=sb)
        assert grids[-1] == (-(-S // min(sb, 64)),)  # the premise: 1, 3, 10 and 19 programs ran
        assert torch.equal(sync.cpu(), torch.zeros(kstats.SYNC_SLOTS, dtype=torch.int32)), "workspace not reset"
        results[sb] = (red.cpu(), out.cpu(), torch.stack([t.cpu() for t in states]))
    assert [g[0] for g in grids] == [1, 3, 10, 19]
    want = G.finalize(stats, hyper, nu)
    for sb, (red, out, states) in results.items():
        _assert_out_close(out, want)
        for x, y in zip((red, out, states), results[64]):
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), sb
        skipped = bad_at is not None
        assert bool((out[:, G.O_SKIP] == float(skipped)).all()), sb
        assert torch.equal(states, nu if skipped else want[:, [G.O_NU, G.O_NUINIT]]), sb


STRESS_SEGMENTS, STRESS_LAUNCHES = 4096, 300


@pytest.mark.skipif(INTERP, reason="a GPU stress test (256 programs x 300 launches): too slow interpreted")
def test_finalize_grid_stress_on_the_gpu():
    """Real concurrency for the grid join: 4096 segments (256 programs) over 300 launches that
    share one workspace, a non-finite segment in a random tile every third launch. Each launch
    must skip exactly when it has the bad segment, write ν back only when it does not, and leave
    the workspace zero."""
    _, kstats, _ = _kernels()
    S = STRESS_SEGMENTS
    stats, hyper, nu = _random_segment_stats(random.Random(9), S, False)
    hyper[:, G.H_MODE] = G.MAG_MODES["relative"]
    want = G.finalize(stats, hyper, nu)
    rng = random.Random(10)
    sync = kstats.finalize_workspace(DEVICE)
    red = torch.empty(S, 4, device=DEVICE)
    out = torch.empty(S, len(G.OUT_COLS), device=DEVICE)
    nus = nu.to(DEVICE)
    for n in range(STRESS_LAUNCHES):
        bad = rng.randrange(S) if n % 3 == 0 else None
        st = stats.clone()
        if bad is not None:
            st[bad, 0] = float("inf")
        states = nus.clone()  # rows are the segments' (ν, initialised) tensors
        segs = _segs_table([(s, s + 1) for s in range(S)], [states[s].data_ptr() for s in range(S)])
        out.fill_(float("nan"))
        kstats.launch_finalize(st.to(DEVICE), segs, hyper.to(DEVICE), torch.zeros(1, device=DEVICE), red, out,
                               nu_mode=2, sync=sync)
        got = out.cpu()
        assert torch.equal(sync.cpu(), torch.zeros(kstats.SYNC_SLOTS, dtype=torch.int32)), n
        assert bool((got[:, G.O_SKIP] == float(bad is not None)).all()), n
        if bad is None:
            _assert_out_close(got, want)
            assert torch.equal(states.cpu(), want[:, [G.O_NU, G.O_NUINIT]]), n
        else:
            assert torch.equal(states.cpu(), nu), n


def test_finalize_segmented_sums_are_fixed_order_and_exact_enough():
    """Segments of 0..700 partial rows (several tiles): sums against float64, and a second run
    (and a run with other segments around) gives the same bits."""
    rng = random.Random(11)
    lens = [rng.choice([1, 2, 130, 700, 3]) for _ in range(41)]
    C = sum(lens)
    parts = torch.rand(C, 4) * torch.tensor([1.0, 2.0, 1.0, 3.0]) - torch.tensor([0.0, 0.0, 0.5, 0.0])
    lo = [sum(lens[:s]) for s in range(len(lens))]
    segs = _segs_table([(a, a + n) for a, n in zip(lo, lens)])
    hyper = torch.tensor([G.hyper_row(dict(lambda_dir=0.3, lambda_mag=1.0, lambda_align=1.0, mag_mode="absolute",
                                           max_norm=1.0, mag_ratio=2.0, mag_beta=0.9))] * len(lens))
    nu = torch.zeros(len(lens), 2)
    red, out = _run_finalize(parts, segs, hyper, nu, nu_mode=0)
    want = torch.stack([parts[a:a + n].double().sum(0) for a, n in zip(lo, lens)])
    torch.testing.assert_close(red.double(), want, rtol=1e-5, atol=1e-5)
    red2, out2 = _run_finalize(parts, segs, hyper, nu, nu_mode=0)
    assert torch.equal(red, red2) and torch.equal(out, out2)
    # segment 5 alone gives the same bits as inside the batch
    one, _ = _run_finalize(parts, _segs_table([(lo[5], lo[5] + lens[5])]), hyper[:1], nu[:1], nu_mode=0)
    assert torch.equal(one[0], red[5])
    _assert_out_close(out, G.finalize(red, hyper, nu))


# ---- the whole step ----------------------------------------------------------------------------
def _run_opt(backend, shapes, dtype, steps, cfg, seed=0, realloc=True):
    ps = _params(shapes, [dtype] * len(shapes), seed=seed)
    opt = SGGAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2, backend=backend,
                   lambda_dir=0.4, lambda_mag=0.8, lambda_align=0.9, **cfg)
    if cfg.get("reference") == "source":
        g = torch.Generator().manual_seed(seed + 7)
        opt.set_reference([torch.randn(p.shape, generator=g, dtype=F64).to(dtype).to(DEVICE) for p in ps])
    for n in range(steps):
        if realloc or n == 0:
            _set_grads(ps, seed=100 + n)
        else:
            g = torch.Generator().manual_seed(100 + n)
            for p in ps:
                p.grad.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
        opt.step()
    return ps, opt


CFGS = [
    dict(reference="momentum", mag_mode="relative", granularity="group"),
    dict(reference="ema", mag_mode="absolute", granularity="tensor", max_norm=2.0),
    dict(reference="source", mag_mode="param", granularity="global", mag_ratio=0.3),
]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c["reference"])
def test_two_runs_are_bitwise_equal(cfg, small_chunks):
    shapes = [(5000,), (97,), (), (0,), (2049,), (3, 5)]
    a, oa = _run_opt("triton", shapes, torch.bfloat16, 4, cfg)
    b, ob = _run_opt("triton", shapes, torch.bfloat16, 4, cfg)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for k in oa.state[x]:
            assert torch.equal(oa.state[x][k], ob.state[y][k]), k
    for k, v in oa.last_stats().items():
        assert torch.equal(v, ob.last_stats()[k]), k


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_step_matches_torch_backend(cfg, dtype, small_chunks):
    """Several chunks per tensor, fp16 included (the oracle suite covers fp32/bf16)."""
    shapes = [(5000,), (97,), (), (0,), (2049,), (3, 5)]
    a, oa = _run_opt("triton", shapes, dtype, 4, cfg)
    b, ob = _run_opt("torch", shapes, dtype, 4, cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    if cfg["mag_mode"] == "relative":  # one (ν, initialised) per segment, in its param group
        for ga, gb in zip(oa.param_groups, ob.param_groups):
            assert float(ga["norm_ema"][1]) == float(gb["norm_ema"][1]) == 1.0
            torch.testing.assert_close(ga["norm_ema"], gb["norm_ema"], rtol=1e-4, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), **tol)
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 4.0  # 0-element ones too
        if cfg["reference"] == "ema":
            torch.testing.assert_close(oa.state[x]["ref"].float(), ob.state[y]["ref"].float(), **tol)


def test_mixed_dtypes_in_one_step_match_torch_backend(small_chunks):
    kernels, _, _ = _kernels()
    shapes = [(3000,), (97,), (2049,), (), (0,)]
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    runs = []
    for backend in ("triton", "torch"):
        ps = _params(shapes, dts, seed=1)
        opt = SGGAdamW(ps, lr=1e-2, backend=backend, reference="ema", granularity="global", mag_mode="relative")
        kernels.reset_launches()
        for n in range(3):
            _set_grads(ps, seed=20 + n)
            opt.step()
        runs.append((ps, opt, dict(kernels.LAUNCHES)))
    assert runs[0][2] == {"stats": 3, "finalize": 3, "apply": 3}
    for x, y in zip(runs[0][0], runs[1][0]):
        tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.parametrize("n", [10, 500])
def test_three_launches_per_step(n, monkeypatch):
    """Three launches whatever the number of tensors, for SGGAdamW and for GradientGuidance; and
    no torch operation inside step() besides allocations (kernel launches stubbed out here, so
    that the interpreter's own tensor copies are not counted) and one read of the skip flag.

    That read: the finalize output lives on the CPU under the interpreter, so the engine reads
    its skip flag on the host (``last_host_skip``: the state commit and GradientGuidance use it)
    at no cost, no device sync. It is allowed here only on CPU tensors and once per step: on CUDA
    tensors (benchmarks/gpu_check.sh runs this file with ``-m cuda``) the engine reads nothing on
    the host, it only keeps a view of the device flag (tests/test_launches_cuda.py also runs with
    torch.cuda.set_sync_debug_mode("error"))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kernels, kstats, kapply = _kernels()
    ps = _params([(3,)] * n, [torch.float32] * n, seed=n)
    opt = SGGAdamW(ps, backend="triton", mag_mode="relative", granularity="tensor")
    _set_grads(ps, seed=1)
    kernels.reset_launches()
    opt.step()                         # real kernels (tables built on this step)
    assert kernels.LAUNCHES == {"stats": 1, "finalize": 1, "apply": 1}
    assert all(float(opt.state[p]["step"]) == 1.0 for p in ps)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

            self.host_reads = []    # devices of the tensors read by .item()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name == "aten._local_scalar_dense":
                self.host_reads.append(args[0].device.type)
            elif name in ("aten.slice", "aten.select") and args[0].device.type == DEVICE \
                    and args[0].shape[-1:] == (len(G.OUT_COLS),):
                name = f"view of the finalize output ({args[0].device.type})"  # its skip flag
            elif name == "aten.equal" and all(a.device.type == "cpu" and a.dtype == torch.int64 for a in args):
                name = "host compare of the layout fingerprint"  # plan reuse (plan.same_fingerprint)
            self.ops.add(name)
            return func(*args, **(kwargs or {}))

    for mod, name in ((kstats, "launch_stats"), (kstats, "launch_finalize"), (kapply, "launch_apply")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: kernels.count_launch(_n))
    with torch.no_grad():
        for p in ps:                   # same addresses: nothing to rebuild
            p.grad.add_(1.0)
    kernels.reset_launches()
    with Ops() as log:
        opt.step()
    assert kernels.total_launches() == 3
    if DEVICE == "cpu":
        assert log.host_reads == ["cpu"], log.host_reads  # the skip flag, once, from host memory
        allowed = {"aten._local_scalar_dense", "view of the finalize output (cpu)"}
    else:
        assert log.host_reads == [], log.host_reads  # nothing read on the host: no sync
        allowed = {"view of the finalize output (cuda)"}
    assert log.ops <= allowed | {"aten.empty", "host compare of the layout fingerprint",
                                 "profiler._record_function_enter_new", "profiler._record_function_exit"}, log.ops
    _set_grads(ps, seed=2)             # new gradients at new addresses: tables re-uploaded
    kernels.reset_launches()
    opt.step()
    assert kernels.total_launches() == 3
    monkeypatch.undo()

    qs = _params([(3,)] * n, [torch.float32] * n, seed=n)
    wrapped = GradientGuidance(torch.optim.SGD(qs, lr=0.1, momentum=0.9), backend="triton", granularity="tensor")
    _set_grads(qs, seed=3)
    kernels.reset_launches()
    wrapped.step()
    assert kernels.LAUNCHES == {"stats": 1, "finalize": 1, "guide": 1}


def test_reallocated_gradient_at_a_new_address_is_picked_up():
    ps = _params([(300,), (7,)], [torch.float32] * 2, seed=3)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = SGGAdamW(ps, lr=1e-2, backend="triton", mag_mode="absolute", max_norm=0.5)
    b = SGGAdamW(qs, lr=1e-2, backend="torch", mag_mode="absolute", max_norm=0.5)
    keep = []
    for n in range(4):
        grads = [torch.randn(p.shape, device=DEVICE) * (1 + n) for p in ps]
        for p, q, g in zip(ps, qs, grads):
            if p.grad is not None:
                keep.append(p.grad)    # the old gradient stays alive: the new one gets a new address
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        tab = a._engine.cache.triton
        assert tab.ptrs[0] == [p.grad.data_ptr() for p in ps]
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # zero_grad(set_to_none=True) and a fresh backward: whatever address the allocator hands out
    for n in range(3):
        a.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
        for p, q in zip(ps, qs):
            (p.sin().sum() * (n + 1)).backward()
            (q.sin().sum() * (n + 1)).backward()
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_hyperparameters_are_runtime_values():
    """lr / betas / eps / weight decay / ref_beta changes take effect without new tables or
    kernels (a group table re-upload); compared with the torch backend."""
    runs = []
    for backend in ("triton", "torch"):
        ps = _params([(40,), (3, 3)], [torch.float32] * 2, seed=9)
        opt = SGGAdamW(ps, backend=backend, reference="ema", mag_mode="absolute")
        for n, (lr, b1, b2, eps, wd, rb) in enumerate([(1e-2, 0.9, 0.999, 1e-8, 0.0, 0.9),
                                                      (3e-2, 0.5, 0.99, 1e-3, 0.1, 0.5),
                                                      (1e-3, 0.0, 0.9, 1e-6, 0.01, 0.0)]):
            for g in opt.param_groups:
                g.update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, ref_beta=rb)
            _set_grads(ps, seed=40 + n)
            opt.step()
        runs.append(ps)
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---- what the backend refuses -------------------------------------------------------------------
def test_not_supported_reasons():
    be = get_backend("triton")
    p = torch.randn(4, 6, device=DEVICE).t().requires_grad_()   # non-contiguous parameter
    p.grad = torch.randn(4, 6, device=DEVICE).t()
    opt = SGGAdamW([p], backend="triton")
    with pytest.raises(RuntimeError, match="contiguous"):
        opt.step()
    q = torch.randn(3, dtype=F64, device=DEVICE, requires_grad=True)
    q.grad = torch.randn(3, dtype=F64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        SGGAdamW([q], backend="triton").step()
    # auto never picks triton for CPU tensors, even under the interpreter
    r = torch.randn(3, requires_grad=True)
    r.grad = torch.randn(3)
    from sgg_fast.plan import build_plan
    assert resolve("auto", build_plan(SGGAdamW([r]).param_groups)).name != "triton"
    assert be.auto_priority.get("cpu") is None


def test_reference_of_another_dtype_is_refused():
    p = torch.randn(8, device=DEVICE, requires_grad=True)
    p.grad = torch.randn(8, device=DEVICE)
    opt = SGGAdamW([p], backend="triton", reference="source")
    opt.set_reference([torch.randn(8)])
    opt.state[p]["ref"] = opt.state[p]["ref"].half()
    before = p.detach().clone()
    with pytest.raises(RuntimeError,
                       match=r"state\['ref'\] of param_groups\[0\]\['params'\]\[0\] is .*float16.*does not match"):
        opt.step()
    assert torch.equal(p.detach(), before)


# ---- GPU only (benchmarks/gpu_check.sh) ----------------------------------------------------------
def _llm_like(dtype, layers=2, d=256):
    shapes = [(1000, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (4 * d, d), (d,), (d,)]
    return shapes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA device and TRITON_INTERPRET unset")
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_no_host_sync_inside_step(cfg, dtype):
    ps = _params(_llm_like(dtype), [dtype] * len(_llm_like(dtype)), seed=1)
    opt = SGGAdamW(ps, backend="triton", **cfg)
    if cfg["reference"] == "source":
        opt.set_reference([torch.randn_like(p) for p in ps])
    for n in range(2):  # warm-up: state, cached hyper-parameter tensor, compiled kernels
        _set_grads(ps, seed=n)
        opt.step()
    torch.cuda.synchronize()
    try:
        for n in range(3):
            _set_grads(ps, seed=10 + n)  # new gradient addresses: table upload inside the step
            torch.cuda.set_sync_debug_mode("error")
            opt.step()
            opt.last_stats()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[ps[0]]["step"]) == 5.0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA device and TRITON_INTERPRET unset")
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c["reference"])
def test_cuda_graph_replay_equals_eager(cfg):
    shapes = _llm_like(torch.float32, layers=1)
    ps = _params(shapes, [torch.float32] * len(shapes), seed=2)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    src = [torch.randn_like(p) for p in ps]
    a = SGGAdamW(ps, backend="triton", **cfg)
    b = SGGAdamW(qs, backend="triton", **cfg)
    if cfg["reference"] == "source":
        a.set_reference(src)
        b.set_reference(src)
    static = [torch.zeros_like(p) for p in ps]
    for p, s in zip(ps, static):
        p.grad = s

    def feed(n):
        g = torch.Generator(device="cuda").manual_seed(1000 + n)
        new = [torch.randn(p.shape, device="cuda", generator=g) for p in ps]
        for s, x in zip(static, new):
            s.copy_(x)
        for q, x in zip(qs, new):
            q.grad = x.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for n in range(3):      # warm-up (eager) on a side stream, as torch's docs do
            feed(n)
            a.step()
            b.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.step()
    for n in range(3, 8):
        feed(n)
        graph.replay()
        b.step()
        torch.cuda.synchronize()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
        for p, q in zip(ps, qs):
            assert torch.equal(a.state[p]["exp_avg"], b.state[q]["exp_avg"])
            assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == n + 1


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA device and TRITON_INTERPRET unset")
def test_cuda_tensor_over_2_pow_31_elements():
    """int64 offsets: a bf16 tensor of 2^31 + 4099 elements (4 GiB each for p, g, m, v)."""
    n = 2 ** 31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * 2 * n:
        pytest.skip(f"needs ~{6 * 2 * n / 2**30:.0f} GiB free GPU memory")
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad[-1] = 3.0
    p.grad[2 ** 31] = -2.0
    lr = 2 ** -6
    opt = SGGAdamW([p], lr=lr, weight_decay=0.0, lambda_dir=0, lambda_mag=0, lambda_align=0,
                   mag_mode="absolute", backend="triton")
    opt.step()
    st = opt.last_stats()
    want_gg = (n - 2) + 9.0 + 4.0
    torch.testing.assert_close(st["grad_norm"][0].double() ** 2, torch.tensor(want_gg, dtype=F64, device="cuda"),
                               rtol=1e-6, atol=0)
    # first AdamW step from p = 0: p = -lr·g/(|g| + eps) = -lr·sign(g) (to bf16 rounding)
    assert float(p[0]) == float(p[2 ** 31 - 1]) == float(p[-2]) == -lr
    assert float(p[2 ** 31]) == lr and float(p[-1]) == -lr
    assert int((p == -lr).sum()) == n - 1
    assert float(opt.state[p]["step"]) == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA device and TRITON_INTERPRET unset")
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_torch_backend_llm_shaped(cfg, dtype):
    shapes = _llm_like(dtype)
    a, oa = _run_opt("triton", shapes, dtype, 5, cfg)
    b, ob = _run_opt("torch", shapes, dtype, 5, cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), **tol)
    for k in ("grad_norm", "cos", "guided_norm", "mag_scale"):
        torch.testing.assert_close(oa.last_stats()[k], ob.last_stats()[k], rtol=1e-4, atol=1e-5)


def test_info_lists_triton_with_its_reason():
    import subprocess
    import sys

    def line(env):
        res = subprocess.run([sys.executable, "-m", "sgg_fast.info"], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        return next(ln for ln in res.stdout.splitlines() if ln.startswith("triton ") and "able" in ln)

    env = dict(os.environ, TRITON_INTERPRET="1")
    assert " available " in line(env) and "TRITON_INTERPRET=1" in line(env)
    env.pop("TRITON_INTERPRET")
    plain = line(env)
    if HAS_CUDA:
        assert " available " in plain
    else:
        assert "unavailable" in plain and "no CUDA device" in plain


def test_alignment_is_a_per_tensor_flag(small_chunks):
    """A gradient that is a view at an odd offset into a flat buffer (DDP bucket views, FSDP flat
    parameters) turns off vector accesses for its own tensor only; the step is unchanged."""
    from sgg_fast.kernels import layout as L

    shapes = [(3000,), (2049,), (70,)]
    runs = []
    for backend in ("triton", "torch"):
        ps = _params(shapes, [torch.float32] * 3, seed=4)
        opt = SGGAdamW(ps, lr=1e-2, backend=backend, mag_mode="absolute", max_norm=0.5)
        for n in range(2):
            _set_grads(ps, seed=30 + n)
            flat = torch.zeros(1 + 3000, device=DEVICE)
            flat[1:].copy_(ps[0].grad)
            ps[0].grad = flat[1:]          # 4 bytes past a 16-byte boundary
            opt.step()
        runs.append((ps, opt))
    tab = runs[0][1]._engine.cache.triton  # the plan's cache is the engine's
    aligned = (tab.meta_host[:, L.FLAGS] & L.F_ALIGNED != 0).tolist()
    assert runs[0][0][0].grad.data_ptr() % 16 != 0  # premise: the view is misaligned
    assert aligned == [False, True, True] and tab.aligned
    for x, y in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_tensor_lr_is_read_on_the_device():
    """A tensor lr is read by the apply kernel (meta column LR): no float(lr) on the host, an
    in-place change takes effect without re-uploading the hyper table, and the result is the
    same as with the number (weight_decay=0: decay is 1 either way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._local_scalar_dense":
                self.n += 1
            return func(*args, **(kwargs or {}))

    lr = torch.tensor(1e-2, device=DEVICE)
    ps = _params([(300,), (17,)], [torch.float32] * 2, seed=6)
    qs = _params([(300,), (17,)], [torch.float32] * 2, seed=6)
    a = SGGAdamW(ps, lr=lr, weight_decay=0.0, backend="triton")
    b = SGGAdamW(qs, lr=1e-2, weight_decay=0.0, backend="triton")
    for n, value in enumerate((None, 1e-2, None, 3e-3)):  # n = 0: the first step (state created)
        if value is not None:  # an in-place change (the settings check: validation.setting_key)
            lr.fill_(value)
            b.param_groups[0]["lr"] = value
        _set_grads(ps, seed=40 + n)
        _set_grads(qs, seed=40 + n)
        with Reads() as ra:
            a.step()
        with Reads() as rb:
            b.step()
        # the backend adds no host read of lr (the skip flag is the one read of an unchanged step);
        # the settings check reads a CPU tensor lr's value every step (a CPU read, no sync) and
        # never that of a CUDA one (an in-place write to it is the kernels' to read)
        if n >= 2:  # after the first two steps (the state's creation re-checks the settings once)
            # (on the CPU, +1 more when the value changed: the re-validation reads it)
            assert ra.n == rb.n + (DEVICE == "cpu") * (1 + (value is not None)), (n, ra.n, rb.n)
        for x, y in zip(ps, qs):
            assert torch.equal(x, y), n


def test_table_upload_refused_during_graph_capture(monkeypatch):
    from sgg_fast.plan import upload

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        upload(torch.zeros(3, dtype=torch.int64), torch.device("cuda"))


def test_tensor_lr_the_kernel_cannot_read_is_read_on_the_host():
    """A float64 tensor lr is not the kernel's float32 scalar: read on the host, same result."""
    ps = _params([(300,)], [torch.float32], seed=7)
    qs = _params([(300,)], [torch.float32], seed=7)
    a = SGGAdamW(ps, lr=torch.tensor(1e-2, dtype=torch.float64), weight_decay=0.1, backend="triton")
    b = SGGAdamW(qs, lr=1e-2, weight_decay=0.1, backend="triton")
    for n in range(2):
        _set_grads(ps, seed=50 + n)
        _set_grads(qs, seed=50 + n)
        a.step()
        b.step()
    assert a._engine.cache.triton.meta_host[0, TB._kernels()[2].LR] == 0
    assert torch.equal(ps[0], qs[0])
