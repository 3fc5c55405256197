"""Loaded and hand-made state, references and failed steps (issue 24): every bad input gets a
clear error naming the entry and what to do, and leaves parameters and optimizer state bitwise
unchanged; valid but unusual forms (a float64 or int64 step count) convert, as torch's own
optimizers do for their checkpoints.

``test_bad_input_sweep`` runs every case below and prints the counts the issue asks for (clear
error / unclear error / silently accepted / state changed on error) with ``-s``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sgg_fast import SGGAdamW

SHAPES = [(5, 7), (97,), ()]


def _model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_(True) for s in SHAPES]


def _grads(ps, k=0, scale=1.0):
    gen = torch.Generator().manual_seed(100 + k)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * scale


def _opt(backend, ps, **kw):
    kw.setdefault("lr", 1e-2)
    return SGGAdamW([{"params": ps[:2]}, {"params": ps[2:], "granularity": "tensor"}], backend=backend, **kw)


def _trained(backend, steps=2, **kw):
    ps = _model()
    opt = _opt(backend, ps, **kw)
    for k in range(steps):
        _grads(ps, k)
        opt.step()
    return ps, opt


def _facts(ps, opt):
    """Parameters, state and groups, bitwise (strides and dtypes included)."""
    def f(v):
        if isinstance(v, torch.Tensor):
            # the bits (so that NaN equals NaN)
            return (v.dtype, tuple(v.shape), v.stride(), v.detach().reshape(-1).clone().view(torch.uint8))
        return repr(v)

    out = [f(p) for p in ps]
    for g in opt.param_groups:
        out.append({k: f(v) for k, v in g.items() if k != "params"})
    for p in ps:
        st = opt.state.get(p)
        out.append(None if st is None else {k: f(v) for k, v in st.items()})
    return out


def _same(a, b) -> bool:
    if isinstance(a, tuple) and len(a) == 4 and isinstance(a[3], torch.Tensor):
        return isinstance(b, tuple) and a[:3] == b[:3] and torch.equal(a[3], b[3])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _expect_unchanged(ps, opt, fn, exc, match):
    before = _facts(ps, opt)
    with pytest.raises(exc, match=match):
        fn()
    assert _same(_facts(ps, opt), before), "the refused call changed the optimizer"


# -- 1. the step counter's dtype: converted before anything is written -------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_step_count_of_another_dtype_converts(backend, dtype):
    ps, opt = _trained(backend)
    ref_ps, ref = copy.deepcopy((ps, opt))
    for p in ps:
        opt.state[p]["step"] = opt.state[p]["step"].to(dtype)
    _grads(ps, 5)
    _grads(ref_ps, 5)
    opt.step()
    ref.step()
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 3.0
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], ref.state[q][k])
    for g, h in zip(opt.param_groups, ref.param_groups):
        assert ("norm_ema" in g) == ("norm_ema" in h)
        assert "norm_ema" not in g or torch.equal(g["norm_ema"], h["norm_ema"])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_step_count_value_refused_before_any_write(backend, bad):
    ps, opt = _trained(backend)
    opt.state[ps[0]]["step"].fill_(bad)
    _grads(ps, 5)
    opt._reuse = None  # a value written in place is checked when the step is prepared
    _expect_unchanged(ps, opt, opt.step, RuntimeError, r"state\['step'\] of param_groups\[0\]\['params'\]\[0\]")


# -- 2./3. load_state_dict validates everything first ------------------------------------------
def _sd(opt):
    return copy.deepcopy(opt.state_dict())


LOAD_CASES = {
    "step_none": (lambda sd: sd["state"][0].update(step=None), r"state\['step'\] of parameter 0"),
    "step_str": (lambda sd: sd["state"][0].update(step="x"), r"state\['step'\] of parameter 0"),
    "step_list": (lambda sd: sd["state"][0].update(step=[1.0]), r"state\['step'\] of parameter 0"),
    "step_negative": (lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), r"finite and >= 0"),
    "entry_not_a_dict": (lambda sd: sd["state"].update({1: [1, 2]}), r"state\[1\] is a list"),
    "norm_ema_negative": (lambda sd: sd["param_groups"][0].update(norm_ema=torch.tensor([-1.0, 1.0])),
                          r"param_groups\[0\]\['norm_ema'\]"),
    "norm_ema_nan": (lambda sd: sd["param_groups"][0].update(norm_ema=torch.tensor([float("nan"), 1.0])),
                     r"param_groups\[0\]\['norm_ema'\]"),
    "norm_ema_flag": (lambda sd: sd["param_groups"][0].update(norm_ema=torch.tensor([1.0, 0.5])), "flag"),
    "tensor_norm_ema_negative": (lambda sd: sd["state"][2].update(norm_ema=torch.tensor([-3.0, 1.0])),
                                 r"state\['norm_ema'\] of parameter 2"),
    "exp_avg_sq_negative": (lambda sd: sd["state"][0]["exp_avg_sq"].view(-1).__setitem__(3, -1.0),
                            r"state\['exp_avg_sq'\] of parameter 0 has negative"),
    "exp_avg_nonfinite": (lambda sd: sd["state"][1]["exp_avg"].__setitem__(0, float("inf")),
                          r"state\['exp_avg'\] of parameter 1 contains inf or NaN"),
    "exp_avg_int": (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(97, dtype=torch.int64)),
                    r"dense floating tensor"),
    "exp_avg_wrong_shape": (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), "another model"),
    "moments_without_step": (lambda sd: sd["state"][1].pop("step"), "no 'step'"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_bad_checkpoint_is_refused_unchanged(backend, case):
    ps, opt = _trained(backend)
    sd = _sd(opt)
    edit, match = LOAD_CASES[case]
    edit(sd)
    _expect_unchanged(ps, opt, lambda: opt.load_state_dict(sd), ValueError, match)
    _grads(ps, 7)
    opt.step()  # still usable


def test_loaded_float64_step_and_list_norm_ema_convert(backend):
    ps, opt = _trained(backend)
    sd = _sd(opt)
    for st in sd["state"].values():
        st["step"] = st["step"].double()
    sd["param_groups"][0]["norm_ema"] = [float(sd["param_groups"][0]["norm_ema"][0]), 1.0]
    ps2 = [p.detach().clone().requires_grad_(True) for p in ps]
    opt2 = _opt(backend, ps2)
    opt2.load_state_dict(sd)
    assert all(opt2.state[p]["step"].dtype == torch.float32 and opt2.state[p]["step"].dim() == 0 for p in ps2)
    assert torch.equal(opt2.param_groups[0]["norm_ema"], opt.param_groups[0]["norm_ema"])
    _grads(ps, 3)
    _grads(ps2, 3)
    opt.step()
    opt2.step()
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)


def test_foreign_state_warns():
    ps = _model()
    sgd = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
    _grads(ps)
    sgd.step()
    opt = _opt("torch", [p.detach().clone().requires_grad_(True) for p in ps])
    with pytest.warns(UserWarning, match="momentum_buffer"):
        opt.load_state_dict(sgd.state_dict())


def test_adamw_state_loads_without_warning():
    ps = _model()
    adamw = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
    _grads(ps)
    adamw.step()
    opt = _opt("torch", [p.detach().clone().requires_grad_(True) for p in ps])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(adamw.state_dict())


# -- 3. a group's running norm edited by hand -------------------------------------------------------
@pytest.mark.parametrize("value", [[-1.0, 1.0], [float("nan"), 1.0]])
def test_edited_norm_ema_refused_at_step(backend, value):
    ps, opt = _trained(backend)
    opt.param_groups[0]["norm_ema"] = torch.tensor(value)
    _grads(ps, 4)
    _expect_unchanged(ps, opt, opt.step, ValueError, r"param_groups\[0\].*norm_ema")


# -- 4. incomplete state -------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq", "step"])
def test_incomplete_state_names_what_is_missing(backend, missing):
    ps, opt = _trained(backend)
    del opt.state[ps[1]][missing]
    _grads(ps, 4)
    _expect_unchanged(ps, opt, opt.step, RuntimeError, rf"no '{missing}'.*incomplete")


# -- 5./7. set_reference ---------------------------------------------------------------------------
def _source_opt(backend, ps):
    return SGGAdamW(ps, backend=backend, reference="source", lr=1e-2)


@pytest.mark.parametrize("refs,match", [
    (None, "expected a list"),
    (torch.zeros(3), "expected a list"),
    ("abc", "expected a list"),
])
def test_set_reference_wrong_container(backend, refs, match):
    ps = _model()
    opt = _source_opt(backend, ps)
    _expect_unchanged(ps, opt, lambda: opt.set_reference(refs), ValueError, match)


def test_set_reference_meta_tensor(backend):
    ps = _model()
    opt = _source_opt(backend, ps)
    refs = [torch.zeros(p.shape) for p in ps]
    refs[1] = torch.empty(ps[1].shape, device="meta")
    _expect_unchanged(ps, opt, lambda: opt.set_reference(refs), ValueError, "meta tensor")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_set_reference_keeps_the_parameters_layout(backend, layout):
    if layout == "channels_last":
        p = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    else:
        p = torch.randn(6, 4).t().requires_grad_(True)
    opt = SGGAdamW([p], backend=backend, reference="source", lr=1e-2)
    r = torch.randn(p.shape)  # contiguous
    opt.set_reference([r])
    ref = opt.state[p]["ref"]
    assert ref.stride() == p.stride() and torch.equal(ref, r)
    q = p.detach().clone().requires_grad_(True)
    plain = SGGAdamW([q], backend="torch", reference="source", lr=1e-2)
    plain.set_reference([r])
    p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    q.grad = p.grad.clone()
    if backend == "triton":  # it needs contiguous parameters: refused for the parameter, not the reference
        with pytest.raises(RuntimeError, match="contiguous") as err:
            opt.step()
        assert "reference" not in str(err.value)
        return
    opt.step()
    plain.step()
    assert opt.backend == backend
    if backend != "torch":
        assert opt._engine._resolved.name == backend  # served by the backend asked for
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# -- the sweep --------------------------------------------------------------------------------------
def _sweep_cases():
    """(name, make) where make() -> (ps, opt, call); every call is bad input."""
    cases = []
    for name, (edit, _) in LOAD_CASES.items():
        def load(edit=edit):
            ps, opt = _trained("torch")
            sd = _sd(opt)
            edit(sd)
            return ps, opt, lambda: opt.load_state_dict(sd)
        cases.append((f"load:{name}", load))

    def group_edit(key, value):
        def make():
            ps, opt = _trained("torch")
            opt.param_groups[0][key] = value
            _grads(ps, 9)
            return ps, opt, opt.step
        return make

    for key, value in [("lr", -1.0), ("lr", float("nan")), ("lr", True), ("betas", (0.9, 1.5)), ("eps", -1.0),
                       ("weight_decay", float("inf")), ("lambda_dir", 2.0), ("lambda_mag", -0.1),
                       ("mag_mode", "bogus"), ("reference", "nope"), ("granularity", 3), ("nonfinite", "ignore"),
                       ("norm_ema", torch.tensor([-1.0, 1.0])), ("amsgrad", "yes"), ("max_norm", 0.0)]:
        cases.append((f"group:{key}={value!r}", group_edit(key, value)))

    def ref_case(refs):
        def make():
            ps = _model()
            opt = _source_opt("torch", ps)
            return ps, opt, lambda: opt.set_reference(refs())
        return make

    first = {
        "nan": lambda: torch.full((5, 7), float("nan")),
        "shape": lambda: torch.zeros(3),
        "int": lambda: torch.zeros(5, 7, dtype=torch.int64),
        "meta": lambda: torch.empty(5, 7, device="meta"),
    }
    cases.append(("set_reference:none", ref_case(lambda: None)))
    cases.append(("set_reference:short", ref_case(lambda: [None])))
    for name, make_first in first.items():
        refs = lambda make_first=make_first: [make_first(), None, None]
        cases.append((f"set_reference:{name}", ref_case(refs)))

    def integ(fn_name, kwargs):
        def make():
            from transformers import TrainingArguments

            from sgg_fast.integrations import transformers as T

            ps = _model()
            opt = _opt("torch", ps)
            args = TrainingArguments(output_dir="/tmp/sgg_sweep", report_to=[], use_cpu=True)
            fn = getattr(T, fn_name)
            return ps, opt, lambda: fn(args, **kwargs)
        return make

    for fn_name in ("sgg_training_args", "sgg_optimizer_kwargs", "sgg_optimizer_cls_and_kwargs"):
        bad_kwargs = [{"lambda_magg": 0}, {"lambda_mag": -1}, {"lambda_dir": 1.5}, {"mag_mode": "x"},
                      {"betas": (0.9, 2.0)}]
        for kwargs in bad_kwargs:
            cases.append((f"{fn_name}:{kwargs}", integ(fn_name, kwargs)))
    return cases


def test_bad_input_sweep(capsys):
    pytest.importorskip("transformers")
    counts = {"clear error": 0, "unclear error": 0, "silently accepted": 0, "state changed on error": 0}
    bad = []
    for name, make in _sweep_cases():
        ps, opt, call = make()
        before = _facts(ps, opt)
        try:
            call()
        except (ValueError, RuntimeError, TypeError) as e:
            counts["clear error"] += 1
            if len(str(e)) < 20:
                counts["unclear error"] += 1
                bad.append((name, "unclear", str(e)))
        except Exception as e:  # noqa: BLE001 - KeyError, AttributeError, ... count as unclear
            counts["unclear error"] += 1
            bad.append((name, type(e).__name__, str(e)))
        else:
            counts["silently accepted"] += 1
            bad.append((name, "accepted", ""))
            continue
        if not _same(_facts(ps, opt), before):
            counts["state changed on error"] += 1
            bad.append((name, "state changed", ""))
    with capsys.disabled():
        print(f"\nbad-input sweep: {sum(counts.values()) - counts['state changed on error']} cases: {counts}")
    assert counts["state changed on error"] == counts["unclear error"] == counts["silently accepted"] == 0, bad
