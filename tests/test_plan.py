"""StepPlan / build_plan: which tensors take part, how segments form, what is checked."""

from __future__ import annotations

import pytest
import torch

from sgg_fast import SGGAdamW
from sgg_fast.plan import StepCache, build_plan


def _p(*shape, grad=True, dtype=torch.float32):
    p = torch.randn(*shape, dtype=dtype, requires_grad=True)
    if grad:
        p.grad = torch.randn_like(p)
    return p


def _groups(granularity, params_a, params_b):
    return SGGAdamW([{"params": params_a}, {"params": params_b}], granularity=granularity).param_groups


@pytest.mark.parametrize("granularity, n_segments", [("group", 2), ("tensor", 4), ("global", 1)])
def test_segments_by_granularity(granularity, n_segments):
    a = [_p(3), _p(2, 2), _p(4, grad=False)]
    b = [_p(5), _p(())]
    plan = build_plan(_groups(granularity, a, b))
    assert plan.num_segments == n_segments
    assert len(plan.params) == 4, "a parameter without .grad takes no part"
    assert all(p.grad is not None for p in plan.params)
    # a segment's tensors are contiguous in the plan's lists and cover them exactly once
    covered = [i for s in plan.segments for i in range(s.start, s.stop)]
    assert covered == list(range(len(plan.params)))
    assert all(plan.seg_of_param[i] == s.index for s in plan.segments for i in range(s.start, s.stop))
    assert plan.labels[0] == "param_groups[0]['params'][0]"
    assert plan.label(3) == "param_groups[1]['params'][1]"


def test_empty_groups_give_no_segment():
    plan = build_plan(_groups("group", [_p(3, grad=False)], [_p(2)]))
    assert plan.num_segments == 1 and plan.segments[0].label == "param_groups[1]"


def test_sparse_gradients_are_refused_with_the_alternative():
    p = _p(3, grad=False)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    with pytest.raises(RuntimeError, match=r"sparse gradients.*param_groups\[0\]\['params'\]\[0\].*SparseAdam"):
        build_plan(SGGAdamW([p]).param_groups)


def test_complex_parameters_are_refused():
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        build_plan(SGGAdamW([p]).param_groups)


def test_segment_on_several_devices_is_refused():
    a, b = _p(3), torch.randn(3, device="meta", requires_grad=True)
    b.grad = torch.randn(3, device="meta")
    groups = SGGAdamW([{"params": [a, b]}], backend="torch").param_groups
    with pytest.raises(RuntimeError, match="several devices"):
        build_plan(groups)


def test_hyper_is_cached_until_a_setting_changes():
    p = _p(3)
    opt = SGGAdamW([p])
    cache = StepCache()
    h1 = build_plan(opt.param_groups, cache=cache).hyper()
    assert build_plan(opt.param_groups, cache=cache).hyper() is h1
    opt.param_groups[0]["lambda_dir"] = 0.7
    h2 = build_plan(opt.param_groups, cache=cache).hyper()
    assert h2 is not h1 and float(h2[0, 0]) == pytest.approx(0.7)


# -- the layout fingerprint (plan.fingerprint): the compiled op and the Python form agree ------------
def _fp_edits():
    def base():
        p = torch.randn(5, 7)
        return [p, torch.randn(5, 7), torch.zeros(()), torch.randn(97)], [torch.randn(5, 7)]

    def data_swap(f, s):
        f[1].data = f[1].clone()

    def retype(f, s):
        f[1].data = f[1].to(torch.bfloat16)

    def resize0(f, s):
        f[3].resize_(0)

    def transpose(f, s):
        f[0].t_()

    def offset(f, s):
        f[3].data = torch.randn(98)[1:]

    def grad_retype(f, s):
        s[0].data = s[0].to(torch.float64)

    def grad_strides(f, s):
        s[0].data = s[0].t().contiguous().t()

    def grad_new_address(f, s):  # a new gradient each step is expected: not a change
        s[0] = s[0].clone()

    def values(f, s):  # values are not part of it
        f[1].fill_(3.0)
        s[0].mul_(2.0)

    return base, {"data_swap": (data_swap, True), "retype": (retype, True), "resize0": (resize0, True),
                  "transpose": (transpose, True), "offset": (offset, True), "grad_retype": (grad_retype, True),
                  "grad_strides": (grad_strides, True), "grad_new_address": (grad_new_address, False),
                  "values": (values, False)}


@pytest.mark.parametrize("edit", list(_fp_edits()[1]))
def test_fingerprint_op_and_python_form_agree(edit, monkeypatch):
    from sgg_fast import _ext
    from sgg_fast import plan as P

    if not _ext.load():
        pytest.skip(f"compiled extension unavailable: {_ext.error()}")
    base, edits = _fp_edits()
    fn, changes = edits[edit]
    results = {}
    for form in ("op", "python"):
        monkeypatch.setattr(P, "_FP_OP_MIN", 0 if form == "op" else 10**9)
        fixed, per_step = base()
        before = P.fingerprint(fixed, per_step)
        assert isinstance(before, torch.Tensor) == (form == "op")  # premise: the form asked for ran
        assert P.same_fingerprint(P.fingerprint(fixed, per_step), before)  # unchanged: equal
        fn(fixed, per_step)
        results[form] = P.same_fingerprint(P.fingerprint(fixed, per_step), before)
    assert results == {"op": not changes, "python": not changes}, results
