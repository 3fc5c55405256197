"""sgg_fast.overlap_backward: the SGG step (or its statistics) inside backward equals the ordinary
step; gradient accumulation, zero_grad, resume, LR schedulers, non-finite gradients, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import sgg_fast
from sgg_fast import SGGAdamW, overlap_backward
from sgg_fast.backends import get_backend
from sgg_fast.overlap import PRECOMPUTED_STATS_BACKENDS

#: a model whose hooks fire in several orders and whose tensors span several statistics chunks
#: on the cpu backend (the 40 000-element weight: two rows of 32 Ki)
IN, HID, OUT = 100, 400, 7


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, HID // 4),
                               torch.nn.Tanh(), torch.nn.Linear(HID // 4, OUT))


def make_opt(model, backend, **kw):
    ps = list(model.parameters())
    groups = [dict(params=ps[:2], lr=3e-2), dict(params=ps[2:])]   # two groups, two lrs
    kw.setdefault("lr", 1e-2)
    return SGGAdamW(groups, backend=backend, **kw)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, IN, generator=g) for _ in range(n)]


def loss_of(model, x):
    return model(x).square().mean()


def train(backend, mode=None, steps=3, micro=1, cfg=None, sched=False):
    """``steps`` steps of ``micro`` micro-batches each; ordinary when mode is None."""
    model = make_model()
    opt = make_opt(model, backend, **(cfg or {}))
    h = overlap_backward(model, opt, mode=mode) if mode else None
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)) if sched else None
    xs = batches(steps * micro)
    for k in range(steps):
        for j in range(micro):
            ctx = h.accumulate() if (h is not None and j < micro - 1) else _null()
            with ctx:
                loss_of(model, xs[k * micro + j]).backward()
        if h is not None and h.mode == "step":
            assert all(p.grad is None for p in model.parameters())  # premise: hooks did the work
        opt.step()
        opt.zero_grad()
        if lr_sched is not None:
            lr_sched.step()
    return model, opt, h


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def assert_same(m1, m2, exact):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if exact:
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def exact_for(backend, mode):
    # the cpu and torch backends sum the same rows in the same order in both paths; the step mode
    # runs the same per-tensor kernels on one-tensor plans
    return backend in ("cpu", "torch")


CFGS = [dict(granularity="group"), dict(granularity="global", reference="ema", mag_mode="param"),
        dict(granularity="tensor"), dict(granularity="tensor", reference="ema", mag_mode="absolute",
                                          max_norm=0.05)]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_equals_ordinary_step(backend, cfg):
    ref, ref_opt, _ = train(backend, cfg=cfg)
    modes = ["stats", "step"] if cfg["granularity"] == "tensor" else ["stats"]
    for mode in modes:
        got, opt, _ = train(backend, mode, cfg=cfg)
        assert_same(ref, got, exact_for(backend, mode))
        for a, b in zip(ref_opt.state.values(), opt.state.values()):
            assert torch.equal(a["step"], b["step"])
        s1, s2 = ref_opt.last_stats(), opt.last_stats()
        assert s1["grad_norm"].shape == s2["grad_norm"].shape
        torch.testing.assert_close(s1["grad_norm"], s2["grad_norm"], rtol=1e-6, atol=0)


def test_stats_mode_step_takes_no_statistics(backend, monkeypatch):
    """Premise of mode "stats": statistics are taken in backward, none in step()."""
    model = make_model()
    opt = make_opt(model, backend)
    overlap_backward(model, opt, mode="stats")
    calls = []
    for name in sgg_fast.available_backends():
        be = get_backend(name)
        orig = be.stats
        monkeypatch.setattr(be, "stats", lambda plan, _o=orig: calls.append(len(plan.params)) or _o(plan))
    if backend not in PRECOMPUTED_STATS_BACKENDS:   # documented: statistics taken in step()
        with pytest.warns(RuntimeWarning, match="not overlapped"):
            loss_of(model, batches(1)[0]).backward()
        assert not calls
        opt.step()
        assert calls
        return
    loss_of(model, batches(1)[0]).backward()
    n_backward = len(calls)
    assert n_backward == len(list(model.parameters())) and set(calls) == {1}
    opt.step()
    assert len(calls) == n_backward


def test_accumulation(backend):
    for cfg, mode in [(dict(granularity="group"), "stats"), (dict(granularity="tensor"), "step")]:
        ref, _, _ = train(backend, cfg=cfg, steps=2, micro=3)
        got, _, _ = train(backend, mode, cfg=cfg, steps=2, micro=3)
        assert_same(ref, got, exact_for(backend, mode))


@pytest.mark.parametrize("mode,gran", [("stats", "group"), ("step", "tensor")])
def test_second_backward_without_accumulate_raises(mode, gran):
    model = make_model()
    opt = make_opt(model, "torch", granularity=gran)
    overlap_backward(model, opt, mode=mode)
    x = batches(1)[0]
    loss_of(model, x).backward()
    with pytest.raises(RuntimeError, match="accumulate"):
        loss_of(model, x).backward()


def test_zero_grad_discards_a_backward(backend):
    """backward, zero_grad (both forms), backward, step == a step on the second batch only."""
    xs = batches(2)
    ref = make_model()
    ref_opt = make_opt(ref, backend)
    loss_of(ref, xs[1]).backward()
    ref_opt.step()
    for set_to_none in (True, False):
        model = make_model()
        opt = make_opt(model, backend)
        overlap_backward(model, opt, mode="stats")
        loss_of(model, xs[0]).backward()
        opt.zero_grad(set_to_none=set_to_none)
        loss_of(model, xs[1]).backward()
        opt.step()
        assert_same(ref, model, exact_for(backend, "stats"))


def test_in_place_clipping_after_backward_is_seen(backend):
    """Statistics taken in backward are re-taken when the gradient changed before step()."""
    def run(overlap):
        model = make_model()
        opt = make_opt(model, backend)
        if overlap:
            overlap_backward(model, opt, mode="stats")
        for x in batches(2):
            loss_of(model, x).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            opt.zero_grad()
        return model
    assert_same(run(False), run(True), exact_for(backend, "stats"))


@pytest.mark.parametrize("mode,gran", [("stats", "group"), ("step", "tensor")])
def test_state_dict_resume(mode, gran):
    backend = "torch"
    cfg = dict(granularity=gran)
    ref, _, _ = train(backend, cfg=cfg, steps=4)
    model, opt, h = train(backend, mode, cfg=cfg, steps=2)
    sd = copy.deepcopy(opt.state_dict())
    h.remove()
    model2 = copy.deepcopy(model)
    opt2 = make_opt(model2, backend, **cfg)
    opt2.load_state_dict(sd)
    overlap_backward(model2, opt2, mode=mode)
    for x in batches(4)[2:]:
        loss_of(model2, x).backward()
        opt2.step()
        opt2.zero_grad()
    assert_same(ref, model2, True)


def test_lr_scheduler(backend):
    for cfg, mode in [(dict(granularity="group"), "stats"), (dict(granularity="tensor"), "step")]:
        ref, ref_opt, _ = train(backend, cfg=cfg, sched=True)
        got, opt, _ = train(backend, mode, cfg=cfg, sched=True)
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != 3e-2
        assert_same(ref, got, exact_for(backend, mode))


def _poison_first_layer(model):
    """The first layer's weight gets an inf gradient: its hook is among the last of backward."""
    w = model[0].weight
    return w.register_hook(lambda g: torch.full_like(g, float("inf")))


def test_nonfinite_late_in_backward_skips_the_whole_step(backend):
    model = make_model()
    opt = make_opt(model, backend, granularity="group")
    overlap_backward(model, opt, mode="stats")
    xs = batches(2)
    loss_of(model, xs[0]).backward()
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    h = _poison_first_layer(model)
    loss_of(model, xs[1]).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    h.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    for k, st in state["state"].items():
        for name, t in st.items():
            assert torch.equal(t, after[k][name]), (k, name)
    assert int(opt.skipped_steps()) == 1


def test_step_mode_nonfinite_is_per_tensor():
    """What mode "step" promises: the bad tensor (and its state) is left alone, the others are
    updated (they were stepped before the bad tensor's hook ran)."""
    model = make_model()
    opt = make_opt(model, "torch", granularity="tensor")
    overlap_backward(model, opt, mode="step")
    before = [p.detach().clone() for p in model.parameters()]
    h = _poison_first_layer(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss_of(model, batches(1)[0]).backward()
    h.remove()
    opt.step()
    w = model[0].weight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (p is w)
    assert w not in opt.state and len(opt.state) == len(before) - 1
    assert int(opt.skipped_steps()) == 1


def test_step_mode_nonfinite_raise_leaves_backward():
    model = make_model()
    opt = make_opt(model, "torch", granularity="tensor", nonfinite="raise")
    overlap_backward(model, opt)
    _poison_first_layer(model)
    with pytest.raises(FloatingPointError, match="non-finite"):
        loss_of(model, batches(1)[0]).backward()


def test_step_mode_usable_after_a_raise():
    """After the documented FloatingPointError, opt.zero_grad() starts a new step: the next
    backward steps every tensor once, as an ordinary step on the state the hooks left (tensors
    stepped before the raise stay stepped). (A step() instead would meet the inf gradient again.)"""
    model = make_model()
    opt = make_opt(model, "torch", granularity="tensor", nonfinite="raise")
    overlap_backward(model, opt)
    hook = _poison_first_layer(model)
    xs = batches(2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        loss_of(model, xs[0]).backward()
    hook.remove()
    opt.zero_grad()
    ref = make_model()  # (a deepcopy would copy the hooks too)
    ref.load_state_dict(model.state_dict())
    ref_opt = make_opt(ref, "torch", granularity="tensor", nonfinite="raise")
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict shares the tensors)
    loss_of(model, xs[1]).backward()  # no "second backward" error
    opt.step()
    loss_of(ref, xs[1]).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert all(float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])
               for p, q in zip(model.parameters(), ref.parameters()))


# -- refusals and the handle ---------------------------------------------------------------------
def test_refuses_ddp_and_multiprocess(monkeypatch):
    model = make_model()
    opt = make_opt(model, "torch")
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        overlap_backward(ddp, opt)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="world size 2"):
        overlap_backward(model, opt)
    assert opt.overlap_handle is None


def test_refuses_dtensor_parameters(monkeypatch):
    model = make_model()
    opt = make_opt(model, "torch")
    w = model[0].weight
    monkeypatch.setattr(sgg_fast.distributed, "is_dtensor", lambda t: t is w)
    with pytest.raises(RuntimeError, match="FSDP2"):
        overlap_backward(model, opt)


@pytest.mark.parametrize("mode,gran", [("stats", "group"), ("step", "tensor")])
def test_refuses_grad_scaler(mode, gran):
    model = make_model()
    opt = make_opt(model, "torch", granularity=gran)
    overlap_backward(model, opt, mode=mode)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="SGGAdamW"):
        overlap_backward(model, torch.optim.AdamW(model.parameters()))
    opt = make_opt(model, "torch", granularity="group")
    with pytest.raises(ValueError, match="granularity='tensor'"):
        overlap_backward(model, opt, mode="step")
    with pytest.raises(ValueError, match="mode"):
        overlap_backward(model, opt, mode="fast")
    with pytest.raises(ValueError, match="not in the optimizer"):
        overlap_backward([torch.zeros(3, requires_grad=True)], opt)
    h = overlap_backward(model, opt)
    assert h.mode == "stats"
    with pytest.raises(RuntimeError, match="already has hooks"):
        overlap_backward(model, opt)


def test_remove_restores_the_ordinary_step_and_copies_drop_the_hooks():
    model = make_model()
    opt = make_opt(model, "torch", granularity="tensor")
    with overlap_backward(model, opt) as h:
        assert h.mode == "step" and opt._step_supports_amp_scaling
        clone = copy.deepcopy(opt)
        assert clone.overlap_handle is None and not getattr(clone, "_step_supports_amp_scaling", False)
    assert opt.overlap_handle is None and not hasattr(opt, "_step_supports_amp_scaling")
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())   # no hook ran
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))


def test_step_mode_steps_parameters_without_hooks():
    """A parameter added after the handle was made is stepped by opt.step() the ordinary way."""
    ref, ref_opt, _ = train("torch", cfg=dict(granularity="tensor"), steps=1)
    model = make_model()
    ps = list(model.parameters())
    opt = SGGAdamW([dict(params=ps[:2], lr=3e-2)], backend="torch", granularity="tensor", lr=1e-2)
    overlap_backward(model, opt)
    opt.add_param_group(dict(params=ps[2:]))
    loss_of(model, batches(1)[0]).backward()
    assert ps[0].grad is None and ps[2].grad is not None
    opt.step()
    assert_same(ref, model, True)
    assert opt.last_stats()["grad_norm"].shape == (len(ps),)
