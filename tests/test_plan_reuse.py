"""Reusing last step's checked plan (plan.PlanReuse) changes nothing a user can observe.

Two optimizers over identical models: one reuses its plan while nothing changed (the default),
the other builds and checks a new plan every step (``reuse_plans = False``). Every scenario,
including the edits that must invalidate a reused plan (state replaced or deleted, a parameter's
``.data`` swapped, a sparse or differently strided gradient, structural settings changed, a
parameter group added, ``load_state_dict``), must give the same parameters and state bitwise, and
the same exception, on both.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sgg_fast import SGGAdamW

SHAPES = [(), (1,), (97,), (5, 7), (2, 3, 4, 5)]


def _model(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_(True) for s in SHAPES]


def _pair(backend, **kw):
    """Two optimizers on equal parameters: (reusing, rebuilding)."""
    out = []
    for reuse in (True, False):
        ps = _model()
        groups = [
            {"params": ps[:3]},
            {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1},
        ]
        opt = SGGAdamW(groups, backend=backend, lr=1e-2, lambda_dir=0.3, lambda_mag=0.2, lambda_align=0.2, **kw)
        opt.reuse_plans = reuse
        out.append((ps, opt))
    return out


def _grads(ps, step: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def _snapshot(ps, opt):
    state = {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(ps)
        if p in opt.state
    }
    return [p.detach().clone() for p in ps], state


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert x.shape == y.shape and torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for k in sa[i]:
            x, y = sa[i][k], sb[i][k]
            if isinstance(x, torch.Tensor):
                assert x.shape == y.shape and torch.equal(x, y), (i, k)
            else:
                assert x == y, (i, k)


def _step_both(pair):
    """Step both; both raise the same error or both succeed."""
    results = []
    for _ps, opt in pair:
        try:
            opt.step()
            results.append(None)
        except Exception as e:  # noqa: BLE001 - the exception itself is compared
            results.append((type(e), str(e)))
    assert results[0] == results[1]
    _assert_same(_snapshot(*pair[0]), _snapshot(*pair[1]))
    return results[0]


def _do(pair, edit):
    for ps, opt in pair:
        edit(ps, opt)


def test_plan_is_reused_on_an_ordinary_loop(backend):
    (ps, opt), (ps2, opt2) = _pair(backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.7)
    plans = []
    for t in range(5):
        _grads(ps, t)
        _grads(ps2, t)
        assert _step_both([(ps, opt), (ps2, opt2)]) is None
        plan, _ = opt._plan()  # what the next step would use (before any edit)
        plans.append(plan)
        sched.step()
        sched2.step()
    # the premise: from the second step on the reusing optimizer hands out one plan object
    assert opt._reuse is not None and opt2._reuse is None
    assert all(p is plans[0] for p in plans) and plans[0].reused
    assert not opt2._plan()[0].reused


EDITS = {
    "accumulate_in_place": lambda ps, opt: [p.grad.add_(0.5) for p in ps],
    "grad_none": lambda ps, opt: setattr(ps[2], "grad", None),
    "lr_and_lambda_change": lambda ps, opt: opt.param_groups[1].update(lr=1e-1, lambda_dir=0.9),
    "state_tensor_wrong_shape": lambda ps, opt: opt.state[ps[3]].update(exp_avg=torch.zeros(3)),
    "state_tensor_replaced": lambda ps, opt: opt.state[ps[3]].update(exp_avg=opt.state[ps[3]]["exp_avg"] * 2),
    "state_deleted": lambda ps, opt: opt.state.pop(ps[1]),
    "state_dict_replaced": lambda ps, opt: opt.state.__setitem__(ps[2], {}),
    "param_data_new_shape": lambda ps, opt: setattr(ps[3], "data", torch.zeros(6, 6)),
    "param_data_same_shape": lambda ps, opt: setattr(ps[3], "data", torch.ones(5, 7)),
    "sparse_grad": lambda ps, opt: setattr(ps[3], "grad", torch.zeros(5, 7).to_sparse()),
    "channels_last_grad": lambda ps, opt: setattr(
        ps[4], "grad", ps[4].grad.contiguous(memory_format=torch.channels_last)
    ),
    "nonfinite_grad": lambda ps, opt: ps[2].grad.__setitem__(0, float("inf")),
    "granularity_tensor": lambda ps, opt: opt.param_groups[0].update(granularity="tensor"),
    "reference_ema": lambda ps, opt: opt.param_groups[1].update(reference="ema"),
    "mag_mode_param": lambda ps, opt: opt.param_groups[0].update(mag_mode="param"),
    "amsgrad_on": lambda ps, opt: opt.param_groups[0].update(amsgrad=True),
    "params_list_edited": lambda ps, opt: opt.param_groups[0]["params"].pop(),
    "bad_setting": lambda ps, opt: opt.param_groups[0].update(lambda_dir=-1.0),
    "norm_ema_reset": lambda ps, opt: opt.param_groups[0].pop("norm_ema", None),
}


def _add_group(ps, opt):
    extra = torch.randn(4, 3, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    extra.grad = torch.ones(4, 3)
    ps.append(extra)
    opt.add_param_group({"params": [extra]})


EDITS["add_param_group"] = _add_group


#: the edits whose step must fail (on both optimizers), by the start of the message
EXPECT_ERROR = {
    "bad_setting": "Invalid lambda_dir",
    "param_data_new_shape": "SGGAdamW: the gradient of param_groups[1]['params'][0]",
    "sparse_grad": "SGGAdamW does not support sparse gradients",
    "state_tensor_wrong_shape": "SGGAdamW: state['exp_avg'] of param_groups[1]['params'][0]",
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edit_between_steps_matches_a_fresh_plan(backend, edit):
    kw = {"mag_mode": "relative"} if edit == "norm_ema_reset" else {}
    pair = _pair(backend, **kw)
    for t in range(3):  # reaches the reused plan
        _do(pair, lambda ps, opt, t=t: _grads(ps, t))
        assert _step_both(pair) is None
    assert pair[0][1]._reuse is not None
    _do(pair, lambda ps, opt: _grads(ps, 10))
    _do(pair, EDITS[edit])
    result = _step_both(pair)
    want = EXPECT_ERROR.get(edit)
    if edit == "channels_last_grad" and backend != "torch":
        want = f"backend='{backend}' cannot run this step"
    assert (result is None) == (want is None), result
    if want is not None:
        assert result[1].startswith(want), result
    # and the steps after the edit (error or not) still agree
    for t in range(11, 13):
        _do(pair, lambda ps, opt, t=t: _grads(ps, t) if ps[3].shape == (5, 7) else None)
        _step_both(pair)


def test_load_state_dict_between_steps(backend):
    pair = _pair(backend)
    saved = []
    for t in range(3):
        _do(pair, lambda ps, opt, t=t: _grads(ps, t))
        _step_both(pair)
        if t == 0:
            saved = [copy.deepcopy(opt.state_dict()) for _ps, opt in pair]
    for (_ps, opt), sd in zip(pair, saved):
        opt.load_state_dict(sd)
    for t in range(3, 6):
        _do(pair, lambda ps, opt, t=t: _grads(ps, t))
        assert _step_both(pair) is None


def test_set_reference_between_steps(backend):
    pair = _pair(backend, reference="source")
    gen = torch.Generator().manual_seed(3)
    refs = [torch.randn(s, generator=gen) for s in SHAPES]
    _do(pair, lambda ps, opt: opt.set_reference(refs))
    for t in range(3):
        _do(pair, lambda ps, opt, t=t: _grads(ps, t))
        _step_both(pair)
    new = [r.flip(0) if r.dim() else -r for r in refs]
    _do(pair, lambda ps, opt: opt.set_reference(new))
    _do(pair, lambda ps, opt: _grads(ps, 9))
    assert _step_both(pair) is None


def test_reused_plan_is_dropped_by_pickling(backend):
    (ps, opt), _ = _pair(backend)
    for t in range(2):
        _grads(ps, t)
        opt.step()
    assert opt._reuse is not None
    clone = copy.deepcopy(opt)
    assert clone._reuse is None


# -- overlap_backward: each hook's one-tensor plan (plan.TensorPlanReuse) --------------------

#: the edits of EDITS that a training loop with hooks can make between steps (the gradients come
#: from backward, so the gradient edits do not apply)
OVERLAP_EDITS = [
    "amsgrad_on",
    "bad_setting",
    "lr_and_lambda_change",
    "mag_mode_param",
    "norm_ema_reset",
    "param_data_same_shape",
    "reference_ema",
    "state_deleted",
    "state_dict_replaced",
    "state_tensor_replaced",
    "state_tensor_wrong_shape",
]
OVERLAP_MODES = [("stats", "group"), ("step", "tensor")]


def _overlap_pair(backend, mode, gran, **kw):
    from sgg_fast import overlap_backward

    pair = _pair(backend, granularity=gran, **kw)
    for ps, opt in pair:
        overlap_backward(ps, opt, mode=mode)
    return pair


def _train_both(pair, t: int):
    """backward (the hooks) + step on both; both raise the same error or both succeed."""
    gen = torch.Generator().manual_seed(2000 + t)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    results = []
    for ps, opt in pair:
        try:
            sum((p * w).sum() for p, w in zip(ps, weights)).backward()
            opt.step()
            results.append(None)
        except Exception as e:  # noqa: BLE001 - the exception itself is compared
            results.append((type(e), str(e)))
        opt.zero_grad()
    assert results[0] == results[1]
    _assert_same(_snapshot(*pair[0]), _snapshot(*pair[1]))
    return results[0]


@pytest.mark.parametrize("mode,gran", OVERLAP_MODES)
def test_hooks_reuse_their_plans(backend, mode, gran):
    pair = _overlap_pair(backend, mode, gran)
    for t in range(4):
        assert _train_both(pair, t) is None
    (ps, opt), (_ps2, opt2) = pair
    reuse = opt.overlap_handle._reuse
    if mode == "stats" and backend not in ("cpu", "cuda", "torch"):
        assert not reuse  # step() takes the statistics (overlap.PRECOMPUTED_STATS_BACKENDS)
        return
    # the premise: every hook hands out its plan of the last step, the rebuilding one none
    assert set(reuse) == set(ps) and all(r.plan.uses >= 2 and r.plan.grads == [] for r in reuse.values())
    assert not opt2.overlap_handle._reuse


@pytest.mark.parametrize("mode,gran", OVERLAP_MODES)
@pytest.mark.parametrize("edit", OVERLAP_EDITS)
def test_hooks_edit_between_steps_matches_a_fresh_plan(backend, mode, gran, edit):
    kw = {"mag_mode": "relative"} if edit == "norm_ema_reset" else {}
    pair = _overlap_pair(backend, mode, gran, **kw)
    for t in range(3):
        assert _train_both(pair, t) is None
    _do(pair, EDITS[edit])
    result = _train_both(pair, 10)
    assert (result is None) == (edit not in ("bad_setting", "state_tensor_wrong_shape")), result
    if result is None:
        for t in range(11, 13):
            assert _train_both(pair, t) is None


@pytest.mark.parametrize("mode,gran", OVERLAP_MODES)
def test_hooks_load_state_dict_and_set_reference_between_steps(backend, mode, gran):
    pair = _overlap_pair(backend, mode, gran, reference="source")
    gen = torch.Generator().manual_seed(3)
    refs = [torch.randn(s, generator=gen) for s in SHAPES]
    _do(pair, lambda ps, opt: opt.set_reference(refs))
    saved = []
    for t in range(3):
        assert _train_both(pair, t) is None
        if t == 0:
            saved = [copy.deepcopy(opt.state_dict()) for _ps, opt in pair]
    _do(pair, lambda ps, opt: opt.set_reference([r.flip(0) if r.dim() else -r for r in refs]))
    assert _train_both(pair, 5) is None
    for (_ps, opt), sd in zip(pair, saved):
        opt.load_state_dict(sd)
    for t in range(6, 9):
        assert _train_both(pair, t) is None


def _backend_switch_case(reuse: bool):
    """Three tensors stepped in hooks: c (bf16), a, b (fp32; b's exp_avg laid out unlike b after
    the first step). Returns the values after four steps and the (tensor, backend) pairs used."""
    from sgg_fast import overlap_backward

    gen = torch.Generator().manual_seed(0)
    c = torch.randn(6, generator=gen).to(torch.bfloat16).requires_grad_(True)
    a = torch.randn(5, generator=gen).requires_grad_(True)
    b = torch.randn(4, 3, generator=gen).requires_grad_(True)
    opt = SGGAdamW([b, a, c], granularity="tensor", lr=1e-2, lambda_dir=0.3)
    opt.reuse_plans = reuse
    overlap_backward([b, a, c], opt, mode="step")
    ids = {id(b): "b", id(a): "a", id(c): "c"}
    names: list[tuple[str, str]] = []
    resolve = opt._engine.resolve

    def spy(plan):
        be = resolve(plan)
        names.append((ids[id(plan.params[0])], be.name))
        return be

    opt._engine.resolve = spy
    for t in range(4):
        ((b * 2).sum() + (a * 3).sum() + (c.float() * 4).sum()).backward()
        opt.step()
        opt.zero_grad()
        if t == 0:
            opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].t().contiguous().t()  # strides (1, 4)
            names.clear()
    return [t.detach().clone() for t in (a, b, c, opt.state[b]["exp_avg"])], sorted(set(names))


def test_hooks_reused_plan_is_checked_again_against_another_backend():
    """The hooks' one-tensor plans share the engine's backend choice. A reused plan skips the
    backend's input checks only for the backend it was checked against: here a state laid out
    unlike its parameter (the cpu backend cannot run it, so auto falls back to torch), stepped
    between tensors of another dtype that make the engine choose the cpu backend again."""
    import sgg_fast

    if "cpu" not in sgg_fast.available_backends():
        pytest.skip("needs the compiled cpu backend")
    (got, chosen), (want, chosen_fresh) = _backend_switch_case(True), _backend_switch_case(False)
    assert chosen == chosen_fresh
    assert ("b", "torch") in chosen and ("a", "cpu") in chosen  # the premise: both backends ran
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_hooks_stats_plans_follow_a_backend_switch_and_keep_no_gradient(monkeypatch):
    import weakref

    import sgg_fast
    from sgg_fast import overlap_backward
    from sgg_fast.backends import ENV_VAR

    if "cpu" not in sgg_fast.available_backends():
        pytest.skip("needs the compiled cpu backend")
    ps = _model()
    opt = SGGAdamW(ps, lr=1e-2)
    h = overlap_backward(ps, opt, mode="stats")

    def train():
        sum((p * 2).sum() for p in ps).backward()
        grads = [weakref.ref(p.grad) for p in ps]
        opt.step()
        opt.zero_grad()
        return grads

    monkeypatch.setenv(ENV_VAR, "cpu")
    for _ in range(2):
        train()
    assert {r.plan.checked_backend.name for r in h._reuse.values()} == {"cpu"} and len(h._reuse) == len(ps)
    monkeypatch.setenv(ENV_VAR, "torch")
    grads = train()
    assert {r.plan.checked_backend.name for r in h._reuse.values()} == {"torch"} and len(h._reuse) == len(ps)
    assert all(r.plan.grads == [] for r in h._reuse.values())
    assert all(w() is None for w in grads)  # nothing kept this step's gradients alive
    opt.load_state_dict(opt.state_dict())
    assert not h._reuse  # the kept plans referred to the old state
