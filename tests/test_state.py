"""state_dict round trips (bitwise resume, torch AdamW interop) and non-finite steps."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sgg_fast import SGGAdamW

SHAPES = [(), (1,), (97,), (4097,), (3, 4, 5)]
CONFIGS = [
    dict(reference="momentum", mag_mode="relative", granularity="group"),
    dict(reference="ema", mag_mode="absolute", granularity="tensor", max_norm=3.0),
    dict(reference="source", mag_mode="param", granularity="global", mag_ratio=0.5),
]


def _model(dtype=torch.float32):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]


def _grads(ps, n):
    g = torch.Generator().manual_seed(100 + n)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]


def _make(ps, cfg, backend):
    opt = SGGAdamW([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}],
                   lambda_dir=0.4, lambda_mag=0.7, lambda_align=0.8, backend=backend, **cfg)
    if cfg["reference"] == "source":
        g = torch.Generator().manual_seed(7)
        opt.set_reference([torch.randn(p.shape, generator=g) for p in ps])
    return opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()["state"])


def _assert_bitwise(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_is_bitwise_equal(backend, cfg, dtype):
    torch.manual_seed(0)
    ps = _model(dtype)
    init = [p.detach().clone() for p in ps]
    opt = _make(ps, cfg, backend)
    saved = None
    for n in range(6):
        for p, g in zip(ps, _grads(ps, n)):
            p.grad = g
        opt.step()
        if n == 2:
            buf = io.BytesIO()
            torch.save({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
            saved = buf.getvalue()
    uninterrupted = _snapshot(ps, opt)

    ckpt = torch.load(io.BytesIO(saved), weights_only=True)
    qs = [x.clone().requires_grad_() for x in ckpt["params"]]
    assert not all(torch.equal(q, i) for q, i in zip(qs, init))
    opt2 = _make(qs, cfg, backend)
    opt2.load_state_dict(ckpt["opt"])
    for n in range(3, 6):
        for q, g in zip(qs, _grads(qs, n)):
            q.grad = g
        opt2.step()
    _assert_bitwise(uninterrupted, _snapshot(qs, opt2))


def test_state_names_and_dtypes(backend):
    ps = _model(torch.bfloat16)
    opt = _make(ps, CONFIGS[0], backend)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    st = opt.state[ps[2]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
    assert st["exp_avg"].dtype == torch.bfloat16 and st["step"].dtype == torch.float32
    assert float(st["step"]) == 1.0
    # one running norm per segment (granularity="group": in the param group), [ν, initialised]
    nu = next(g["norm_ema"] for g in opt.param_groups if any(q is ps[2] for q in g["params"]))
    assert nu.dtype == torch.float32 and nu.shape == (2,) and float(nu[0]) > 0 and float(nu[1]) == 1


def test_adamw_state_dict_loads_both_ways(backend):
    """AdamW → SGGAdamW(λ=0) continues exactly like AdamW; SGGAdamW → AdamW loads and steps."""
    torch.manual_seed(0)
    ps = _model()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    adam = torch.optim.AdamW(ps, lr=1e-2)
    for n in range(3):
        for p, g in zip(ps, _grads(ps, n)):
            p.grad = g
        adam.step()
    for q, p in zip(qs, ps):
        q.data.copy_(p.data)
    sgg = SGGAdamW(qs, lr=5.0, lambda_dir=0, lambda_mag=0, lambda_align=0, backend=backend)
    sgg.load_state_dict(copy.deepcopy(adam.state_dict()))  # as from disk: no aliasing
    assert sgg.param_groups[0]["lr"] == 1e-2          # the loaded group's lr
    assert sgg.param_groups[0]["lambda_dir"] == 0      # missing guidance keys: this optimizer's
    for n in range(3, 6):
        for p, q, g in zip(ps, qs, _grads(ps, n)):
            p.grad, q.grad = g.clone(), g.clone()
        adam.step()
        sgg.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # and back: AdamW takes SGGAdamW's state (the extra group keys are ignored by AdamW)
    adam2 = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in qs], lr=1.0)
    adam2.load_state_dict(copy.deepcopy(sgg.state_dict()))
    for a, b in zip(adam2.state.values(), sgg.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=0)
        assert float(a["step"]) == float(b["step"]) == 6.0
    for p in adam2.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape)
    adam2.step()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_step_is_skipped_bitwise(backend, cfg, bad):
    ps = _model()
    opt = _make(ps, cfg, backend)
    for n in range(2):
        for p, g in zip(ps, _grads(ps, n)):
            p.grad = g
        opt.step()
    before = _snapshot(ps, opt)
    grads = _grads(ps, 9)
    grads[3].view(-1)[17] = bad
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    assert bool(opt.last_stats()["skipped"].all())
    _assert_bitwise(before, _snapshot(ps, opt))
    # the next finite step proceeds normally, counting from where it was
    for p, g in zip(ps, _grads(ps, 10)):
        p.grad = g
    opt.step()
    assert not bool(opt.last_stats()["skipped"].any())
    assert float(opt.state[ps[0]]["step"]) == 3.0


def test_nonfinite_raise_names_segment_and_changes_nothing(backend):
    ps = _model()
    opt = SGGAdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, nonfinite="raise", backend=backend)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    before = _snapshot(ps, opt)
    grads = _grads(ps, 1)
    grads[4].view(-1)[0] = float("nan")
    for p, g in zip(ps, grads):
        p.grad = g
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]"):
        opt.step()
    _assert_bitwise(before, _snapshot(ps, opt))
