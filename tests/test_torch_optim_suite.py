"""SGGAdamW held to what PyTorch's own optimizer suite holds ``torch.optim.AdamW`` to.

The data come from ``torch.testing._internal.common_optimizers`` (shipped in the torch wheel):
AdamW's ``optim_inputs_func`` configurations and its ``optim_error_inputs_func`` error inputs
(the generic ones of every optimizer plus AdamW's own). With every guidance λ = 0, SGGAdamW is
AdamW (DESIGN §1.7): each configuration is stepped next to ``torch.optim.AdamW`` with the same
gradients, on every backend that serves CPU tensors here, and must agree within the rounding
bound derived in ``tests/_adamw_ref.py``. The error inputs must raise (or warn) with the same
exception type and message.

The CUDA-only configurations (``capturable=True``, tensor lr / betas) are run on CPU too with
``capturable`` dropped (AdamW's capturable path needs a CUDA device; the tensor hyperparameters
are what they exercise), and lr tensors of shape [1] and [1, 1] are added (accepted by AdamW).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("expecttest")  # imported by torch.testing._internal.common_utils
from torch.testing._internal import common_optimizers as co  # noqa: E402

from _adamw_ref import assert_matches_adamw, step_pair  # noqa: E402
from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.backends import all_backends  # noqa: E402

ZERO = dict(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0)
SHAPES = [(), (1,), (97,), (7, 11), (0,), (2, 3, 4)]
STEPS = 6

ADAMW_INFO = next(o for o in co.optim_db if o.optim_cls is torch.optim.AdamW)


def _cpu_configs() -> list[tuple[str, dict]]:
    out = [(oi.desc, oi.kwargs) for oi in ADAMW_INFO.optim_inputs_func("cpu", torch.float32)]
    cuda = ADAMW_INFO.optim_inputs_func("cuda", torch.float32)
    have = {d for d, _ in out}
    for oi in cuda:
        if oi.desc in have or not oi.kwargs.get("capturable"):
            continue
        kw = {k: v for k, v in oi.kwargs.items() if k != "capturable"}
        out.append((f"{oi.desc} (capturable dropped)", kw))
    out.append(("Tensor lr of shape [1]", {"lr": torch.tensor([0.01])}))
    out.append(("Tensor lr of shape [1, 1]", {"lr": torch.tensor([[0.01]]), "weight_decay": 0.1}))
    return out


CONFIGS = _cpu_configs()


def test_configs_premise():
    """The torch data are what this file relies on: the CPU configurations, the CUDA ones."""
    descs = [d for d, _ in CONFIGS]
    for want in ("default", "non-default lr", "nonzero weight_decay", "maximize", "amsgrad"):
        assert want in descs
    assert sum("capturable dropped" in d for d in descs) >= 4
    assert any(isinstance(kw.get("betas", (0,))[0], torch.Tensor) for _, kw in CONFIGS)


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    return ps, [p.detach().clone().requires_grad_() for p in ps]


def _kw(kw):
    # fresh tensors per optimizer (a tensor lr is the group's own object, as in AdamW)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                tuple(b.clone() if isinstance(b, torch.Tensor) else b for b in v) if isinstance(v, tuple) else v)
            for k, v in kw.items()}


def _xfail_unsupported(backend, kw):
    be = all_backends()[backend]
    if kw.get("amsgrad") and not be.amsgrad:
        pytest.xfail(f"backend {backend!r} does not implement amsgrad=True yet (its kernels keep no "
                     "max_exp_avg_sq; backend='torch' and 'auto' do)")


@pytest.mark.parametrize("desc,kw", CONFIGS, ids=[d for d, _ in CONFIGS])
def test_adamw_config(backend, desc, kw):
    ps, qs = _params()
    _xfail_unsupported(backend, kw)
    # two groups: the second overrides lr (a float, also where the default lr is a tensor)
    half = 0.5 * float(kw.get("lr", 1e-3))
    split = 3
    opt = SGGAdamW([{"params": ps[:split]}, {"params": ps[split:], "lr": half}], backend=backend, **_kw(kw), **ZERO)
    ref = torch.optim.AdamW([{"params": qs[:split]}, {"params": qs[split:], "lr": half}], foreach=False, **_kw(kw))
    bounds = step_pair(opt, ref, ps, qs, STEPS)
    worst = assert_matches_adamw(opt, ref, ps, qs, bounds)
    assert worst <= 1.0
    assert set(ref.state[qs[2]]) <= set(opt.state[ps[2]]), "torch's state names are all there"


def test_bound_is_not_vacuous(backend):
    """The tolerance detects a real difference: SGG with its default λs is not AdamW, and its
    difference from AdamW exceeds the bound on most elements."""
    ps, qs = _params()
    opt = SGGAdamW(ps, backend=backend, lr=1e-2, lambda_dir=0.2, lambda_mag=1.0, lambda_align=1.0,
                   mag_mode="absolute", max_norm=0.1)
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    bounds = step_pair(opt, ref, ps, qs, STEPS)
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        assert_matches_adamw(opt, ref, ps, qs, bounds)
    big = ps[2]
    frac = float(((big - qs[2]).abs().double() > bounds[2].param()).double().mean())
    assert frac > 0.5, frac


def test_adamw_state_dict_loads_into_sggadamw(backend):
    """A checkpoint of torch's AdamW continues in SGGAdamW (λ = 0) as AdamW would."""
    ps, qs = _params()
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, amsgrad=False)
    warm = torch.optim.AdamW([p for p in ps], lr=1e-2, weight_decay=0.1)
    bounds = step_pair(warm, ref, ps, qs, 3)
    opt = SGGAdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend, **ZERO)
    opt.load_state_dict(copy.deepcopy(warm.state_dict()))
    assert opt.param_groups[0]["lambda_dir"] == 0.0  # SGG's own settings survive AdamW's groups
    bounds = step_pair(opt, ref, ps, qs, 3, seed=1, bounds=bounds)
    assert assert_matches_adamw(opt, ref, ps, qs, bounds) <= 1.0


# -- error inputs ----------------------------------------------------------------------------
def _error_inputs():
    out = []
    for ei in ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        out.append(pytest.param(ei, id=ei.optimizer_error_input.desc))
    return out


ERROR_INPUTS = _error_inputs()
def _construct(cls, ei, **extra):
    oi = ei.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.nn.Parameter(torch.randn(1, 1))]
    return cls(params, **oi.kwargs, **extra)


def _outcome(cls, ei, **extra):
    """('raise', type, message) | ('warn', type, message) | ('ok', None, '') at construction,
    or at the first step for step errors."""
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            opt = _construct(cls, ei, **extra)
            if ei.error_on == co.OptimizerErrorEnum.STEP_ERROR:
                for g in opt.param_groups:
                    for p in g["params"]:
                        p.grad = torch.rand_like(p)
                opt.step()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return ("raise", type(e), str(e))
    mine = [x for x in w if issubclass(x.category, ei.error_type)] if issubclass(ei.error_type, Warning) else []
    if mine:
        return ("warn", ei.error_type, str(mine[0].message))
    return ("ok", None, "")


def test_error_inputs_premise():
    assert len(ERROR_INPUTS) >= 8
    assert any(issubclass(p.values[0].error_type, Warning) for p in ERROR_INPUTS)


@pytest.mark.parametrize("ei", ERROR_INPUTS)
def test_error_input(ei):
    import re
    want = _outcome(torch.optim.AdamW, ei)
    assert want[0] != "ok" and issubclass(want[1], ei.error_type), ("torch's data describe AdamW", want)
    got = _outcome(SGGAdamW, ei, **ZERO)
    assert got[0] == want[0] and got[1] is want[1], (got, want)
    assert re.search(ei.error_regex, got[2]), (ei.error_regex, got[2])


# -- signature and param-group keys ----------------------------------------------------------
def test_signature_covers_adamw():
    """Every parameter of torch's AdamW, with its default and kind; every key of its groups."""
    import inspect
    mine = inspect.signature(SGGAdamW).parameters
    for name, par in inspect.signature(torch.optim.AdamW).parameters.items():
        assert name in mine, name
        assert mine[name].kind == par.kind, (name, mine[name].kind, par.kind)
        if par.default is not inspect.Parameter.empty:
            assert mine[name].default == par.default, (name, mine[name].default, par.default)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    assert set(torch.optim.AdamW([q]).param_groups[0]) <= set(SGGAdamW([p]).param_groups[0])
    assert SGGAdamW([p]).param_groups[0]["decoupled_weight_decay"] is True


def test_decoupled_weight_decay():
    ps, qs = _params()
    # torch's Adam with decoupled weight decay is AdamW: its checkpoint continues in SGGAdamW (λ = 0)
    adam = torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=False)
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, foreach=False)
    bounds = step_pair(adam, ref, ps, qs, 2)
    opt = SGGAdamW(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, backend="torch", **ZERO)
    opt.load_state_dict(copy.deepcopy(adam.state_dict()))
    bounds = step_pair(opt, ref, ps, qs, 2, seed=1, bounds=bounds)
    assert assert_matches_adamw(opt, ref, ps, qs, bounds) <= 1.0
    # Adam's L2 penalty is another optimizer: refused, in the constructor and in a loaded group
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        SGGAdamW(ps, decoupled_weight_decay=False)
    l2 = torch.optim.Adam(qs, weight_decay=0.1)
    for q in qs:
        q.grad = torch.ones_like(q)
    l2.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        opt.load_state_dict(l2.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    torch.testing.assert_close(opt.state_dict()["state"], before["state"], rtol=0, atol=0)
