"""The Triton backend's device tables across steps (issue 25 item 7): a changed table is updated in
place (its address stays, so no allocation per step), except a table a CUDA graph captured, which
is never written or freed afterwards (the graph keeps reading what it was captured with, and the
eager steps get new tables).

The first three tests record the tables under ``TRITON_INTERPRET=1`` (CPU tensors; with
``StepCache.freeze`` standing for a capture); the last captures and replays a real CUDA graph
(``-m cuda``, run by ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sgg_fast import SGGAdamW  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
SHAPES = [(300,), (17, 3), (5,)]


def _params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SHAPES]


def _grads(ps, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def _tables(opt):
    return opt._engine.cache.triton


interp_only = pytest.mark.skipif(not INTERP, reason="records the tables under TRITON_INTERPRET=1")


@interp_only
def test_changed_addresses_and_settings_update_the_tables_in_place():
    from sgg_fast.kernels import layout as L

    ps = _params("cpu")
    opt = SGGAdamW(ps, lr=1e-2, backend="triton")
    _grads(ps, 0)
    opt.step()
    tab = _tables(opt)
    meta, hyper, chunks = tab.meta, tab.hyper, tab.chunks
    addr = (meta.data_ptr(), hyper.data_ptr(), chunks.data_ptr())
    for k in range(1, 4):
        _grads(ps, k)  # new gradient tensors: new addresses
        opt.param_groups[0]["lr"] = 1e-2 / (k + 1)  # a new setting: the hyper table changes
        opt.step()
        assert tab.meta is meta and tab.hyper is hyper and tab.chunks is chunks
        assert (tab.meta.data_ptr(), tab.hyper.data_ptr(), tab.chunks.data_ptr()) == addr
        assert tab.meta[:, L.G].tolist() == [p.grad.data_ptr() for p in ps]  # the new contents
        assert tab.hyper[0, L.H_LR].item() == pytest.approx(1e-2 / (k + 1))


@interp_only
def test_a_frozen_table_is_never_written_again():
    """After a capture (StepCache.freeze), a change goes to a new table; the captured one keeps
    its contents and stays referenced (alive) in the cache."""
    from sgg_fast.kernels import layout as L

    ps = _params("cpu")
    opt = SGGAdamW(ps, lr=1e-2, backend="triton")
    _grads(ps, 0)
    opt.step()
    tab = _tables(opt)
    cache = opt._engine.cache
    captured = tab.meta
    captured_grads = tab.meta[:, L.G].clone()
    cache.freeze(tab.tables())
    _grads(ps, 1)
    opt.step()
    assert tab.meta is not captured and cache.is_frozen(captured)
    assert torch.equal(captured[:, L.G], captured_grads)  # untouched
    assert tab.meta[:, L.G].tolist() == [p.grad.data_ptr() for p in ps]
    now = tab.meta
    _grads(ps, 2)
    opt.step()
    assert tab.meta is now  # not frozen: updated in place again


@interp_only
def test_results_do_not_depend_on_in_place_tables():
    """The same steps with the cache dropped before every step (every table new) give the same
    parameters bitwise."""
    a, b = _params("cpu"), _params("cpu")
    oa = SGGAdamW(a, lr=1e-2, backend="triton")
    ob = SGGAdamW(b, lr=1e-2, backend="triton")
    for k in range(4):
        _grads(a, k)
        _grads(b, k)
        oa.param_groups[0]["lr"] = ob.param_groups[0]["lr"] = 1e-2 * (k + 1)
        oa.step()
        ob._engine.cache.triton = None
        ob._reuse = None
        ob.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y), k


@pytest.mark.cuda
@pytest.mark.skipif(INTERP or not HAS_CUDA, reason="needs a CUDA device (and no TRITON_INTERPRET)")
def test_cuda_graph_replay_after_an_eager_step_with_other_gradients():
    """Capture opt.step() on static gradients; run an eager step on gradients at other addresses
    (the tables change); copy new values into the static gradients and replay: the replay equals
    eager steps on the same values (it read the tables it was captured with, not freed memory)."""
    dev = torch.device("cuda")
    ps, ref = _params(dev), _params(dev)
    lr = torch.tensor(1e-2, device=dev)
    opt = SGGAdamW(ps, lr=lr, backend="triton", capturable=True)
    ropt = SGGAdamW(ref, lr=1e-2, backend="triton")
    static = [torch.zeros_like(p) for p in ps]
    gen = torch.Generator(device="cpu").manual_seed(3)
    values = [[torch.randn(p.shape, generator=gen).to(dev) for p in ps] for _ in range(4)]
    for p, s in zip(ps, static):
        p.grad = s
    s0 = torch.cuda.Stream()
    s0.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s0):  # warm-up on a side stream, as torch.cuda.graphs asks
        for s, v in zip(static, values[0]):
            s.copy_(v)
        opt.step()
    torch.cuda.current_stream().wait_stream(s0)
    for q, v in zip(ref, values[0]):
        q.grad = v.clone()
    ropt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    # an eager step on gradients at other addresses: the triton tables change
    for p, q, v in zip(ps, ref, values[1]):
        p.grad = v.clone() * 1.0
        q.grad = v.clone()
    opt.step()
    ropt.step()
    torch.cuda.synchronize()
    for p, s in zip(ps, static):
        p.grad = s  # back to the static gradients the graph reads
    for v in values[2:]:
        for s, x in zip(static, v):
            s.copy_(x)
        graph.replay()
        for q, x in zip(ref, v):
            q.grad = x.clone()
        ropt.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
