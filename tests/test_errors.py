"""Bad input: a clear error saying what is wrong and what to do; parameters and state untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from sgg_fast import GradientGuidance, SGGAdamW


def _p(*shape):
    return torch.randn(*shape, requires_grad=True)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(betas=0.9), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lambda_dir=1.5), "lambda_dir"),
    (dict(lambda_mag=-0.1), "lambda_mag"),
    (dict(lambda_align=2), "lambda_align"),
    (dict(mag_mode="rel"), "mag_mode"),
    (dict(max_norm=0.0), "max_norm"),
    (dict(max_norm=float("inf")), "max_norm"),
    (dict(mag_ratio=-1.0), "mag_ratio"),
    (dict(mag_beta=1.0), "mag_beta"),
    (dict(reference="teacher"), "reference"),
    (dict(ref_beta=1.0), "ref_beta"),
    (dict(granularity="layer"), "granularity"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(backend="nope"), "unknown backend 'nope'"),
])
def test_invalid_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SGGAdamW([_p(3)], **kw)


def test_invalid_param_group_is_rejected_and_not_added():
    opt = SGGAdamW([_p(3)])
    with pytest.raises(ValueError, match="lambda_dir"):
        opt.add_param_group({"params": [_p(2)], "lambda_dir": 3.0})
    assert len(opt.param_groups) == 1


def test_global_groups_must_agree():
    with pytest.raises(ValueError, match="granularity='global'"):
        SGGAdamW([{"params": [_p(3)]}, {"params": [_p(2)], "lambda_dir": 0.9}], granularity="global")
    # AdamW settings may differ between global groups
    SGGAdamW([{"params": [_p(3)]}, {"params": [_p(2)], "lr": 0.5}], granularity="global")


def _stepped(backend, **kw):
    ps = [_p(5), _p(3, 2)]
    opt = SGGAdamW(ps, lr=1e-2, backend=backend, **kw)
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    return ps, opt


def _unchanged(ps, opt, fn, exc, match):
    before_p = [p.detach().clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=match):
        fn()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()
    for k, st in before_s["state"].items():
        for name, v in st.items():
            assert torch.equal(after["state"][k][name], v)


def test_sparse_gradient(backend):
    ps, opt = _stepped(backend)
    ps[1].grad = torch.randn(3, 2).to_sparse()
    _unchanged(ps, opt, opt.step, RuntimeError, "sparse gradients.*SparseAdam")


def test_complex_parameter(backend):
    p = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    opt = SGGAdamW([p], backend=backend)
    p.grad = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex.*view_as_real"):
        opt.step()


def test_source_reference_not_set(backend):
    p = _p(4)
    opt = SGGAdamW([p], reference="source", backend=backend)
    p.grad = torch.randn(4)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="set_reference"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_reference_shape_mismatch(backend):
    ps = [_p(5), _p(3, 2)]
    opt = SGGAdamW(ps, reference="source", backend=backend)
    with pytest.raises(ValueError, match=r"reference #1 has shape \(2, 3\).*\(3, 2\)"):
        opt.set_reference([torch.randn(5), torch.randn(2, 3)])
    with pytest.raises(ValueError, match="got 1 references for 2"):
        opt.set_reference([torch.randn(5)])
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_reference({_p(5): torch.randn(5)})
    assert not opt.state  # nothing stored by the failed calls


def test_segment_spanning_devices():
    a = _p(3)
    b = torch.randn(3, device="meta", requires_grad=True)
    opt = SGGAdamW([a, b], granularity="group")
    a.grad = torch.randn(3)
    b.grad = torch.randn(3, device="meta")
    with pytest.raises(RuntimeError, match="several devices.*separate param_groups"):
        opt.step()
    assert not opt.state[a]


def test_forced_backend_that_cannot_serve_lists_reasons():
    p = torch.randn(3, device="meta", requires_grad=True)
    p.grad = torch.randn(3, device="meta")
    from sgg_fast.backends import all_backends

    fused = [n for n in all_backends() if n != "torch"]
    for name in fused:
        opt = SGGAdamW([p], backend=name)
        with pytest.raises(RuntimeError, match=f"backend='{name}' cannot run this step"):
            opt.step()


def test_env_var_overrides_auto(monkeypatch):
    p = _p(3)
    p.grad = torch.randn(3)
    monkeypatch.setenv("SGG_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        SGGAdamW([p]).step()
    monkeypatch.setenv("SGG_FAST_BACKEND", "torch")
    opt = SGGAdamW([p])
    opt.step()
    assert opt._engine.resolve(opt._prepare()).name == "torch"


def test_amsgrad_from_loaded_adamw_continues_like_adamw():
    """An AdamW(amsgrad=True) checkpoint loads (max_exp_avg_sq under torch's name) and SGGAdamW
    with every λ = 0 continues exactly as AdamW would."""
    torch.manual_seed(0)
    p = _p(3)
    q = p.detach().clone().requires_grad_()
    adam = torch.optim.AdamW([p], amsgrad=True)
    for _ in range(2):
        p.grad = torch.randn(3)
        adam.step()
    opt = SGGAdamW([q], lambda_dir=0, lambda_mag=0, lambda_align=0)
    with torch.no_grad():
        q.copy_(p)
    opt.load_state_dict(copy.deepcopy(adam.state_dict()))  # as from disk: no aliasing
    assert opt.param_groups[0]["amsgrad"] is True
    for _ in range(3):
        g = torch.randn(3) * 0.1
        p.grad, q.grad = g.clone(), g.clone()
        adam.step()
        opt.step()
    torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[q]["max_exp_avg_sq"], adam.state[p]["max_exp_avg_sq"])


def test_guidance_wrapper_momentum_needs_a_buffer():
    p = _p(3)
    with pytest.raises(ValueError, match="momentum=0"):
        GradientGuidance(torch.optim.SGD([p], lr=0.1))
    g = GradientGuidance(torch.optim.Adagrad([p], lr=0.1))
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="no 'exp_avg' or 'momentum_buffer'"):
        g.step()
    with pytest.raises(TypeError, match="unknown settings"):
        GradientGuidance(torch.optim.AdamW([p]), lamda_dir=0.1)
