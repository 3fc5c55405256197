"""Edits between steps: a long-lived optimizer equals a freshly built one, bitwise, after every step.

The optimizer under test ("live") keeps whatever it keeps between steps (its reused plan, the
backends' tables and lists, the engine's backend choice). Before every step a random edit from
:data:`EDITS` is applied to it — the ones users and libraries make: ``.data`` swaps and retyping
of parameters, gradients and state tensors, ``resize_``, ``t_()``, in-place ``fill_`` of tensor
settings, writes through ``.data`` to gradients and tensor lr, group edits, ``add_param_group``,
``load_state_dict``, ``set_reference``, None gradients. The reference is a new ``SGGAdamW`` built
from the live one's parameters, groups and state as they are after the edit (exact copies:
values, dtypes and strides), so it has nothing cached. Both step; the parameters, every state
entry (dtype, shape, strides, values), the groups' settings and running norms, and the exception
if any must be equal, bitwise. A step that raises must also leave the live optimizer bitwise
unchanged (every check before the first write).

``make test`` runs a fixed set of seeds; ``-m slow`` runs many more (``SGG_FAST_EDIT_EPISODES``).
The defects found by the adversarial run of 2026-12-07 are named cases (:data:`DEFECTS`).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from sgg_fast import SGGAdamW

SHAPES = [(), (1,), (97,), (5, 7), (4, 4), (3, 2, 2, 2)]
STEPS = 10


# -- exact copies ------------------------------------------------------------------------------
def _clone(t):
    """A copy with the same dtype, shape, strides and values (and requires_grad)."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.layout != torch.strided:
        c = t.detach().clone()
    else:
        c = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        c.copy_(t.detach())
    return c.requires_grad_(t.requires_grad) if t.is_leaf and t.requires_grad else c


def _clone_setting(v):
    if isinstance(v, tuple):
        return tuple(_clone_setting(x) for x in v)
    if isinstance(v, list):
        return [_clone_setting(x) for x in v]
    return _clone(v)


def _all_params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def fresh_copy(opt: SGGAdamW, backend: str) -> SGGAdamW:
    """A new SGGAdamW with nothing cached, whose parameters (with their gradients), groups and
    state are exact copies of ``opt``'s."""
    mapping = {}
    for p in _all_params(opt):
        if id(p) not in mapping:
            q = _clone(p)
            if p.grad is not None:
                g = _clone(p.grad)
                try:
                    q.grad = g
                except RuntimeError:  # a gradient retyped through .data: copy it the same way
                    q.grad = torch.zeros_like(q)
                    q.grad.data = g
            mapping[id(p)] = q
    new = SGGAdamW([torch.zeros(1, requires_grad=True)], backend=backend)
    new.defaults = {k: _clone_setting(v) for k, v in opt.defaults.items()}
    new.param_groups = [
        {**{k: _clone_setting(v) for k, v in g.items() if k != "params"},
         "params": [mapping[id(p)] for p in g["params"]]}
        for g in opt.param_groups
    ]
    new.state.clear()
    for p, st in opt.state.items():
        if id(p) in mapping:
            new.state[mapping[id(p)]] = {k: _clone(v) for k, v in st.items()} if isinstance(st, dict) else st
    return new


# -- what is compared --------------------------------------------------------------------------
def _tensor_fact(t):
    if not isinstance(t, torch.Tensor):
        return ("value", repr(t))
    if t.layout != torch.strided:
        return ("sparse", t.dtype, tuple(t.shape))
    flat = t.detach().cpu().reshape(-1)  # values in index order, whatever the strides
    bits = flat.view(torch.uint8).tolist() if flat.numel() and flat.dtype != torch.bool else flat.tolist()
    return (t.dtype, tuple(t.shape), t.stride(), bits)


def snapshot(opt: SGGAdamW) -> list:
    """Everything a user can observe, in param_groups order, compared bitwise."""
    out = []
    for g in opt.param_groups:
        out.append(sorted((k, _tensor_fact(v) if isinstance(v, torch.Tensor) else
                           (tuple(map(_tensor_fact, v)) if isinstance(v, (tuple, list)) else repr(v)))
                          for k, v in g.items() if k != "params"))
        for p in g["params"]:
            st = opt.state.get(p)
            out.append((_tensor_fact(p), None if p.grad is None else _tensor_fact(p.grad),
                        None if st is None else (sorted((k, _tensor_fact(v)) for k, v in st.items())
                                                 if isinstance(st, dict) else repr(st))))
    return out


def _step(opt):
    try:
        opt.step()
        return None
    except Exception as e:  # noqa: BLE001 - the exception itself is compared
        return (type(e).__name__, str(e))


# -- the model and the edits -------------------------------------------------------------------
def make_live(backend: str, seed: int) -> SGGAdamW:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).requires_grad_(True) for s in SHAPES]
    src = torch.randn(3, 3, generator=gen).requires_grad_(True)
    groups = [
        {"params": ps[:2], "lr": torch.tensor(0.02)},
        {"params": ps[2:4], "lr": 3e-3, "weight_decay": 0.1, "betas": (torch.tensor(0.9), torch.tensor(0.99)),
         "eps": torch.tensor(1e-8), "amsgrad": True, "reference": "ema", "ref_beta": torch.tensor(0.8)},
        {"params": ps[4:], "granularity": "tensor", "mag_mode": "absolute", "max_norm": 0.5},
        {"params": [src], "reference": "source"},
    ]
    opt = SGGAdamW(groups, backend=backend, lr=1e-2, lambda_dir=0.3, lambda_mag=0.5, lambda_align=0.5)
    opt.set_reference([None] * 6 + [torch.randn(3, 3, generator=gen)])
    return opt


def set_grads(opt: SGGAdamW, rng: random.Random, step: int) -> None:
    gen = torch.Generator().manual_seed(10_000 + step)
    for p in _all_params(opt):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) * rng.choice([1.0, 1e-3, 30.0])


def _pick(opt, rng, pred=lambda p: True):
    cands = [p for p in _all_params(opt) if pred(p)]
    return rng.choice(cands) if cands else None


def _state_tensor(opt, rng, key, pred=lambda t: True):
    cands = [st[key] for st in opt.state.values() if isinstance(st, dict) and isinstance(st.get(key), torch.Tensor)
             and pred(st[key])]
    return rng.choice(cands) if cands else None


def _e_lr(opt, rng):
    opt.param_groups[1]["lr"] = rng.choice([1e-3, 5e-3, 2e-2])


def _e_tensor_lr_fill(opt, rng):
    opt.param_groups[0]["lr"].fill_(rng.choice([0.01, 0.05]))


def _e_tensor_lr_data(opt, rng):
    opt.param_groups[0]["lr"].data = torch.tensor(rng.choice([0.03, float("nan"), -1.0]))


def _e_tensor_betas_fill(opt, rng):
    b1, b2 = opt.param_groups[1]["betas"]
    rng.choice([b1, b2]).fill_(rng.choice([0.5, 0.8, 0.95]))


def _e_tensor_eps_ref_beta(opt, rng):
    g = opt.param_groups[1]
    g["eps"].fill_(rng.choice([1e-6, 1e-3]))
    g["ref_beta"].data.fill_(rng.choice([0.5, 0.7]))


def _e_lambdas(opt, rng):
    g = rng.choice(opt.param_groups)
    g.update(lambda_dir=rng.choice([0.0, 0.5]), lambda_mag=rng.choice([0.0, 1.0]), lambda_align=rng.choice([0.0, 1.0]))


def _e_structure(opt, rng):
    g = rng.choice(opt.param_groups[:3])
    key, value = rng.choice([("granularity", "tensor"), ("granularity", "group"), ("reference", "ema"),
                             ("reference", "momentum"), ("amsgrad", True), ("amsgrad", False),
                             ("mag_mode", "param"), ("mag_mode", "relative")])
    g[key] = value


def _e_grad_none(opt, rng):
    _pick(opt, rng).grad = None


def _e_grad_data_inplace(opt, rng):
    p = _pick(opt, rng, lambda p: p.grad is not None)
    if p is not None:
        rng.choice([lambda: p.grad.data.clamp_(-0.01, 0.01), lambda: p.grad.data.mul_(3.0)])()


def _e_grad_retype(opt, rng):
    p = _pick(opt, rng, lambda p: p.grad is not None)
    if p is not None:
        p.grad.data = p.grad.to(rng.choice([torch.bfloat16, torch.float64, torch.int64]))


def _e_grad_strides(opt, rng):
    p = _pick(opt, rng, lambda p: p.grad is not None and p.dim() == 2)
    if p is not None:
        p.grad = p.grad.t().contiguous().t()


def _e_param_data(opt, rng):
    p = _pick(opt, rng, lambda p: p.dim() >= 1)
    kind = rng.choice(["clone", "transposed", "retype"])
    if kind == "clone":
        p.data = p.detach().clone()
    elif kind == "transposed" and p.dim() == 2:
        p.data = p.detach().t().contiguous().t()
    elif kind == "retype":
        p.data = p.detach().to(torch.float64)


def _e_state_data(opt, rng):
    key = rng.choice(["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ref"])
    t = _state_tensor(opt, rng, key)
    if t is None:
        return
    kind = rng.choice(["bf16", "resize0", "t_", "clone", "fill"])
    if kind == "bf16":
        t.data = t.to(torch.bfloat16)
    elif kind == "resize0":
        t.resize_(0)
    elif kind == "t_" and t.dim() == 2:
        t.t_()
    elif kind == "clone":
        t.data = t.clone()
    else:
        t.data.fill_(0.25)


def _e_state_replace_or_delete(opt, rng):
    p = _pick(opt, rng, lambda p: p in opt.state)
    if p is None:
        return
    if rng.random() < 0.5:
        del opt.state[p]
    else:
        st = opt.state[p]
        if "exp_avg" in st:
            st["exp_avg"] = st["exp_avg"] * 0.5


def _e_step_retype(opt, rng):
    t = _state_tensor(opt, rng, "step")
    if t is not None:
        t.data = t.to(rng.choice([torch.float64, torch.int64]))


def _e_norm_ema(opt, rng):
    g = rng.choice(opt.param_groups)
    if "norm_ema" in g and rng.random() < 0.5:
        g.pop("norm_ema")
    elif "norm_ema" in g:
        g["norm_ema"].data = g["norm_ema"].clone()


def _e_add_group(opt, rng):
    if len(opt.param_groups) > 5:
        return
    p = torch.randn(rng.choice([(3,), (2, 5)])).requires_grad_(True)
    opt.add_param_group({"params": [p], "lr": 4e-3})


def _e_load_state_dict(opt, rng):
    opt.load_state_dict(opt.state_dict())


def _e_set_reference(opt, rng):
    params = _all_params(opt)
    opt.set_reference([torch.randn(p.shape) if i == 6 else None for i, p in enumerate(params)])


def _e_nonfinite_grad(opt, rng):
    p = _pick(opt, rng, lambda p: p.grad is not None and p.numel() > 0 and p.grad.is_floating_point())
    if p is not None:
        p.grad.view(-1)[0] = float("inf")


EDITS = {f.__name__[3:]: f for f in (
    _e_lr, _e_tensor_lr_fill, _e_tensor_lr_data, _e_tensor_betas_fill, _e_tensor_eps_ref_beta, _e_lambdas,
    _e_structure, _e_grad_none, _e_grad_data_inplace, _e_grad_retype, _e_grad_strides, _e_param_data,
    _e_state_data, _e_state_replace_or_delete, _e_step_retype, _e_norm_ema, _e_add_group, _e_load_state_dict,
    _e_set_reference, _e_nonfinite_grad,
)}


# -- the episode -------------------------------------------------------------------------------
def run_episode(backend: str, seed: int, script: list[str | None] | None = None, steps: int = STEPS) -> int:
    """Random (or scripted: one edit name or None per step) edits, each step compared with a
    fresh copy. Returns how many steps raised on both."""
    rng = random.Random(seed)
    opt = make_live(backend, seed)
    raised = 0
    plan = script if script is not None else [None] + [rng.choice([None, *EDITS]) for _ in range(steps - 1)]
    for t, edit in enumerate(plan):
        set_grads(opt, rng, t)
        for name in ([edit] if edit else []):
            try:
                EDITS[name](opt, rng)
            except Exception:  # noqa: BLE001 - an edit a user cannot make here (refused by the API)
                pass
        ref = fresh_copy(opt, backend)
        assert snapshot(ref) == snapshot(opt)  # the copy is exact
        before = snapshot(opt)
        got, want = _step(opt), _step(ref)
        where = f"backend={backend} seed={seed} step={t} edit={edit}"
        assert got == want, f"{where}: live {got} vs fresh {want}"
        if got is not None:
            raised += 1
            assert snapshot(opt) == before, f"{where}: the failed step changed the optimizer"
            # go on with a valid optimizer (the edit may be one no later step can undo)
            opt = make_live(backend, seed * 1000 + t)
        else:
            assert snapshot(opt) == snapshot(ref), where
    return raised


def _backends():
    from conftest import CPU_BACKENDS

    out = list(CPU_BACKENDS)
    if "cpu" in out and "auto" not in out and not os.environ.get("SGG_FAST_TEST_BACKENDS"):
        out.append("auto")
    return out


@pytest.mark.parametrize("seed", range(8))
def test_random_edits_match_a_fresh_optimizer(backend, seed):
    raised = run_episode(backend, seed)
    assert raised < STEPS  # the premise: most steps ran


def test_random_edits_auto(seed_list=range(4)):
    if "cpu" not in _backends():
        pytest.skip("backend='auto' is tested here where the cpu backend serves CPU tensors")
    for seed in seed_list:
        run_episode("auto", seed)


@pytest.mark.slow
def test_random_edits_many(request, backend):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("long variant: run with -m slow")
    n = int(os.environ.get("SGG_FAST_EDIT_EPISODES", "200"))
    names = [backend] + (["auto"] if backend == "cpu" and "auto" in _backends() else [])
    total_raised = 0
    for b in names:
        for seed in range(100, 100 + n):
            total_raised += run_episode(b, seed, steps=12)
    print(f"edit episodes: {n} per backend × {names}, {n * 12 * len(names)} steps, {total_raised} refused on both")


#: the defects of the adversarial run of 2026-12-07 (issue 23), each a scripted episode
DEFECTS = {
    "exp_avg_sq_data_bf16": ["state_data:bf16:exp_avg_sq"],
    "max_exp_avg_sq_resize_0": ["state_data:resize0:max_exp_avg_sq"],
    "exp_avg_t_": ["state_data:t_:exp_avg"],
    "grad_data_bf16": ["grad:bf16"],
    "grad_data_int64": ["grad:int64"],
    "tensor_betas_fill": ["tensor_betas_fill"],
    "tensor_eps_ref_beta_fill": ["tensor_eps_ref_beta"],
    "tensor_lr_data_nan": ["lr_data:nan"],
}


def _scripted(opt, name):
    """Deterministic forms of the edits for the named cases."""
    params = _all_params(opt)
    amsgrad_p = params[2]  # group 1: amsgrad, ema reference, tensor settings
    if name.startswith("state_data:"):
        _, kind, key = name.split(":")
        t = opt.state[params[3]][key]  # (5, 7): non-square
        if kind == "bf16":
            t.data = t.to(torch.bfloat16)
        elif kind == "resize0":
            t.resize_(0)
        else:
            t.t_()
    elif name.startswith("grad:"):
        amsgrad_p.grad.data = amsgrad_p.grad.to(torch.bfloat16 if name.endswith("bf16") else torch.int64)
    elif name == "tensor_betas_fill":
        opt.param_groups[1]["betas"][0].fill_(0.5)
    elif name == "tensor_eps_ref_beta":
        opt.param_groups[1]["eps"].fill_(1e-3)
        opt.param_groups[1]["ref_beta"].fill_(0.3)
    elif name == "lr_data:nan":
        opt.param_groups[0]["lr"].data = torch.tensor(float("nan"))


@pytest.mark.parametrize("case", list(DEFECTS))
def test_named_defect(backend, case):
    rng = random.Random(0)
    opt = make_live(backend, 0)
    for t in range(2):  # two ordinary steps: the live optimizer has its caches
        set_grads(opt, rng, t)
        assert _step(opt) is None
    for t, edit in enumerate(DEFECTS[case], start=2):
        set_grads(opt, rng, t)
        if edit is not None:
            _scripted(opt, edit)
        ref = fresh_copy(opt, backend)
        before = snapshot(opt)
        got, want = _step(opt), _step(ref)
        assert got == want, f"{case} step {t}: live {got} vs fresh {want}"
        if got is None:
            assert snapshot(opt) == snapshot(ref), f"{case} step {t}"
        else:
            assert snapshot(opt) == before, f"{case} step {t}: the failed step changed the optimizer"
            break


def test_auto_fallback_does_not_pin_the_fallback():
    """backend="auto": a step the cpu backend cannot take (a contiguous gradient for a
    channels_last weight) runs on the torch backend; the next step, whose gradient has the
    weight's layout again, runs on the cpu backend, as a fresh optimizer's does."""
    if "cpu" not in _backends():
        pytest.skip("needs the cpu backend")
    rng = random.Random(0)
    opt = make_live("auto", 0)
    p = _all_params(opt)[5]  # (3, 2, 2, 2), granularity="tensor" group
    cl = torch.channels_last
    for t in range(4):
        set_grads(opt, rng, t)
        if t == 1:  # the weight becomes channels_last, its state too; the gradient stays contiguous
            p.data = p.detach().contiguous(memory_format=cl)
            st = opt.state[p]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    st[k] = v.contiguous(memory_format=cl)
        elif t > 1:
            p.grad = p.grad.contiguous(memory_format=cl)
        ref = fresh_copy(opt, "auto")
        assert _step(opt) is None and _step(ref) is None
        assert opt._engine._resolved.name == ref._engine._resolved.name == ("torch" if t == 1 else "cpu"), t
        assert snapshot(opt) == snapshot(ref), t
