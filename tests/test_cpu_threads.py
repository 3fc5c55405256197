"""The CPU ops really run on several threads, and their results do not depend on how many.

``torch.ops.sgg_fast.sgg_cpu_debug_threads()`` is the number of distinct threads that ran
chunks in the last CPU stats / apply / guide call. Every bitwise comparison below first checks
that the call it compares ran on the number of threads it claims, so "identical for 1, 2 and 3
threads" cannot pass by running everything on one thread (which it did while the extension was
compiled without OpenMP: at::parallel_for then silently runs serially).
"""

from __future__ import annotations

import pytest
import torch

from sgg_fast import SGGAdamW, _ext

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.error()}", allow_module_level=True)

ops = torch.ops.sgg_fast
CHUNK = 1 << 15  # cpp_backend.CPU_STATS_CHUNK
NONE = torch.empty(0)
SHAPES = [(300, 1031), (70001,), (3,), (129, 64), (1 << 18,)]  # ≥ 20 chunks of 32 Ki
THREADS = (1, 2, 3)


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for a test; restored afterwards."""
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


def _ran_on(n: int) -> None:
    got = ops.sgg_cpu_debug_threads()
    assert got == n, f"the last CPU op ran on {got} thread(s), the test set {n}"


def test_built_with_openmp_where_torch_uses_it():
    if not torch.backends.openmp.is_available():
        pytest.skip("torch's parallel backend is not OpenMP: at::parallel_for needs no OpenMP flags")
    openmp = int(_ext.info()["openmp"])
    assert openmp >= 201107, f"torch's parallel backend is OpenMP but the CPU kernels have _OPENMP={openmp}"


def test_counter_follows_the_thread_count(threads):
    g = torch.randn(64 * CHUNK)
    threads(2)
    ops.sgg_stats([g], [g], [None], CHUNK)
    _ran_on(2)
    threads(1)
    ops.sgg_stats([g], [g], [None], CHUNK)
    _ran_on(1)
    threads(2)
    ops.sgg_stats([g[:100]], [None], [None], CHUNK)  # one chunk: one thread
    _ran_on(1)


def _tensors(dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def _out(alpha, beta):
    """A finalize output with the given per-segment α, β and no skip."""
    from sgg_fast.guidance import OUT_COLS

    out = torch.zeros(len(alpha), len(OUT_COLS))
    out[:, OUT_COLS.index("alpha")] = torch.tensor(alpha)
    out[:, OUT_COLS.index("beta")] = torch.tensor(beta)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_bitwise_for_any_thread_count(threads, dtype):
    gs, rs, ps = _tensors(dtype, 1), _tensors(dtype, 2), _tensors(dtype, 3)
    res = {}
    for n in THREADS:
        threads(n)
        res[n] = ops.sgg_stats(gs, rs, ps, CHUNK)
        _ran_on(n)
    assert res[1].shape[0] >= 20
    assert torch.equal(res[1], res[2]) and torch.equal(res[1], res[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_bitwise_for_any_thread_count(threads, dtype):
    res = {}
    for n in THREADS:
        threads(n)
        ps, gs, ms = _tensors(dtype, 1), _tensors(dtype, 2), _tensors(dtype, 3)
        vs = [t.abs() for t in _tensors(dtype, 4)]
        refs = [NONE, *_tensors(dtype, 5)[1:]]
        modes = [0, 1, 2, 1, 2]
        steps = [torch.tensor(3.0) for _ in ps]
        vmax = [t.abs() if i % 2 == 0 else NONE for i, t in enumerate(_tensors(dtype, 6))]  # amsgrad on 0, 2, 4
        P = len(ps)
        ops.sgg_adamw_apply(ps, gs, ms, vs, steps, refs, _out([0.7, 1.1], [-0.2, 0.3]), [0, 1, 1, 0, 1],
                            [1e-2] * P, [0.9] * P, [0.999] * P, [1e-8] * P, [0.1] * P, [0.9] * P, modes, [],
                            vmax)
        _ran_on(n)
        res[n] = ps + ms + vs + refs[1:] + steps + vmax[::2]
    for a, b, c in zip(res[1], res[2], res[3]):
        assert torch.equal(a, b) and torch.equal(a, c)


def _full_steps(n: int, dtype):
    torch.manual_seed(11)
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    groups = [{"params": ps[:3]}, {"params": ps[3:], "reference": "ema", "amsgrad": True}]
    opt = SGGAdamW(groups, lr=1e-2, lambda_dir=0.3, lambda_mag=0.8, lambda_align=1.0, backend="cpu")
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=dtype)
        opt.step()
        _ran_on(n)  # the apply op, the last CPU op of the step
    state = [t for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in ps] + state, opt.last_stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_step_bitwise_for_any_thread_count(threads, dtype):
    res = {}
    for n in THREADS:
        threads(n)
        res[n] = _full_steps(n, dtype)
    (t1, s1), (t2, s2), (t3, s3) = res[1], res[2], res[3]
    assert len(t1) == len(t2) == len(t3) > len(SHAPES)
    for a, b, c in zip(t1, t2, t3):
        assert torch.equal(a, b) and torch.equal(a, c)
    for k in s1:
        assert torch.equal(s1[k], s2[k]) and torch.equal(s1[k], s3[k])
