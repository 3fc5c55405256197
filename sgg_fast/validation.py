"""Checks of hyper-parameters, references and loaded state: ``ValueError`` naming the bad value.

Every check here runs before anything is written (construction, ``add_param_group``,
``load_state_dict``, ``set_reference`` and, when a group's settings changed, ``step``), so a
rejected input leaves parameters and optimizer state bitwise unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import guidance
from .vocabulary import GRANULARITIES, MAG_MODES, NONFINITE, REFERENCES, is_dtensor  # noqa: E402

#: guidance settings, with their defaults (every one may be set per param_group)
GUIDANCE_DEFAULTS: dict[str, Any] = dict(
    lambda_dir=0.2,
    lambda_mag=1.0,
    lambda_align=1.0,
    mag_mode="relative",
    max_norm=1.0,
    mag_ratio=2.0,
    mag_beta=0.9,
    reference="momentum",
    ref_beta=0.9,
    granularity="group",
    nonfinite="skip",
)

#: settings that must agree between param groups sharing one "global" segment
SEGMENT_KEYS = guidance.GUIDANCE_KEYS + ("reference", "ref_beta", "nonfinite", "maximize")

_INF = float("inf")


def _value(name: str, value: Any) -> float:
    """The number behind a hyper-parameter: a Python real or a one-element real tensor (read on
    the host: one sync, only when the value changed)."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number, got {type(value).__name__})")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        if value.is_complex() or not (
            value.is_floating_point() or value.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        ):
            raise ValueError(f"Invalid {name}: a tensor of dtype {value.dtype} (expected a real number)")
        return float(value.detach().reshape(()).to("cpu", torch.float64))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)") from None


def check_number(
    name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, key: str | None = None
) -> None:
    """``value`` (a number or a one-element tensor) is finite and in the interval. ``name`` is
    the wording of the message (torch's, where torch has one), ``key`` the setting's name."""
    key = key or name
    v = _value(key, value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        shown = v if isinstance(value, torch.Tensor) else value
        raise ValueError(f"Invalid {name}: {shown!r} ({key} must be finite and in {rng})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose one of {', '.join(map(repr, choices))})")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def validate_guidance(group: dict) -> None:
    """Check the guidance settings of a param_group-like dict."""
    for k in GUIDANCE_DEFAULTS:
        if k not in group:
            raise ValueError(f"param_group is missing the guidance setting {k!r}")
    for k in ("lambda_dir", "lambda_mag", "lambda_align"):
        check_number(k, group[k], 0.0, 1.0)
    check_choice("mag_mode", group["mag_mode"], MAG_MODES)
    check_number("max_norm", group["max_norm"], 0.0, _INF, lo_open=True, hi_open=True)
    check_number("mag_ratio", group["mag_ratio"], 0.0, _INF, lo_open=True, hi_open=True)
    check_number("mag_beta", group["mag_beta"], 0.0, 1.0, hi_open=True)
    check_choice("reference", group["reference"], REFERENCES)
    check_number("ref_beta", group["ref_beta"], 0.0, 1.0, hi_open=True)
    check_choice("granularity", group["granularity"], GRANULARITIES)
    check_choice("nonfinite", group["nonfinite"], NONFINITE)


def validate_adamw(group: dict) -> None:
    """Check AdamW's settings as ``torch.optim.AdamW`` does (its messages where it has them)."""
    for k in ("lr", "betas", "eps", "weight_decay"):
        if k not in group:
            raise ValueError(f"param_group is missing the AdamW setting {k!r}")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    check_number("learning rate", lr, 0.0, _INF, hi_open=True, key="lr")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    b1, b2 = betas
    if isinstance(b1, torch.Tensor) != isinstance(b2, torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        check_number(f"beta parameter at index {i}", b, 0.0, 1.0, hi_open=True, key=f"betas[{i}]")
    check_number("epsilon value", group["eps"], 0.0, _INF, hi_open=True, key="eps")
    check_number("weight_decay value", group["weight_decay"], 0.0, _INF, hi_open=True, key="weight_decay")
    for k in ("amsgrad", "maximize", "capturable", "differentiable"):
        check_flag(k, group.get(k, False))
    for k in ("foreach", "fused"):
        if group.get(k) is not None:
            check_flag(k, group[k])
    # the key torch's AdamW keeps in its groups (Adam's with decoupled_weight_decay=True)
    check_flag("decoupled_weight_decay", group.get("decoupled_weight_decay", True))
    if not group.get("decoupled_weight_decay", True):
        raise ValueError(
            "SGGAdamW's weight decay is decoupled (AdamW's); decoupled_weight_decay=False, "
            "Adam's L2 penalty added to the gradient, is not supported"
        )
    # torch.optim.AdamW's own restrictions, kept so that code written for it behaves the same
    if group.get("fused") and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("foreach") and not group.get("capturable"):
        if isinstance(lr, torch.Tensor):
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if isinstance(b1, torch.Tensor):
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")


def validate_global_groups(groups: list[dict], owner: str) -> None:
    """Groups with ``granularity="global"`` share one segment and so one setting."""
    first = None
    for gi, g in enumerate(groups):
        if g.get("granularity") != "global":
            continue
        if first is None:
            first = gi
            continue
        for k in SEGMENT_KEYS:
            if g.get(k, False) != groups[first].get(k, False):
                raise ValueError(
                    f"{owner}: param_groups[{first}] and param_groups[{gi}] both use "
                    f"granularity='global' but differ in {k!r} ({groups[first].get(k)!r} vs "
                    f"{g.get(k)!r}); one global segment has one setting. Make them equal or use "
                    "granularity='group'."
                )


def setting_key(v: Any) -> Any:
    """What one setting is now, for a cache key. A number is itself. A tensor on the CPU is its
    value (read every time: a ``fill_`` or a write through ``.data`` changes the key, and reading
    a CPU tensor is no sync) with its dtype, shape and address. A tensor on another device is its
    object, dtype, device, shape and address, not its value: reading that would be a host sync on
    every step, so an in-place write to it is not re-validated (the kernels read it on the
    device; DESIGN §2)."""
    if isinstance(v, torch.Tensor):
        meta = (id(v), v.dtype, v.device, tuple(v.shape), v.data_ptr())
        if v.device.type == "cpu" and v.numel() == 1 and not v.is_complex():
            return meta + (v.item(),)
        return meta
    if isinstance(v, (tuple, list)):
        return tuple(map(setting_key, v))
    return v if isinstance(v, (int, float, str, bool, type(None))) else id(v)


def settings_key(group: dict) -> tuple:
    """What a group's settings are now (:func:`setting_key` of each): a change of any value, a
    replaced object or an in-place write to a CPU tensor setting changes the key."""
    return tuple((k, setting_key(v)) for k, v in group.items() if k != "params")


def step_problem(step: Any) -> str | None:
    """What is wrong with a step count (None: nothing): a non-negative finite number, as a Python
    number or a one-element real tensor (its value is read only on the CPU: no sync)."""
    if isinstance(step, bool) or not isinstance(step, (int, float, torch.Tensor)):
        return f"is {step!r} ({type(step).__name__}); it must be a number or a one-element tensor"
    if isinstance(step, torch.Tensor):
        step = step.to_local() if is_dtensor(step) else step
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool or step.device.type == "meta":
            return (
                f"is a tensor of shape {tuple(step.shape)} and dtype {step.dtype}; it must be a one-element real tensor"
            )
        if step.device.type != "cpu":
            return None
        step = step.item()
    if not math.isfinite(step) or step < 0:
        return f"is {step!r}; it must be finite and >= 0"
    return None


def nu_problem(value: Any) -> str | None:
    """What is wrong with a saved running norm ``[ν, initialised]`` (None: nothing): two real
    numbers (a tensor or a sequence), ν finite and >= 0, the flag 0 or 1."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 2 or value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            return (
                f"is a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; it must hold [norm, initialised]"
            )
        vals = value.detach().reshape(2).to("cpu", torch.float64).tolist()
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        vals = [float(x) for x in value]
    else:
        return f"is {value!r}; it must be [norm, initialised], two numbers"
    nu, flag = vals
    if not math.isfinite(nu) or nu < 0 or flag not in (0.0, 1.0):
        return f"is {vals}; the norm must be finite and >= 0 and the flag 0 or 1"
    return None


#: what SGGAdamW keeps per parameter; other keys in a loaded state dict are another optimizer's
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ref", "norm_ema")
#: per-parameter tensors shaped like their parameter
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ref")
_NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")


def check_loaded_state(owner: str, state: dict, groups: list[dict], params: list[torch.Tensor]) -> list[str]:
    """Check a state dict's ``state`` and the groups' running norms before anything is loaded:
    the rules of the constructor and of a step (``ValueError`` naming the entry). Returns the
    keys that are not SGGAdamW's (another optimizer's state), for a warning."""
    where = f"{owner}.load_state_dict"
    for k, g in enumerate(groups):
        if "norm_ema" in g and g["norm_ema"] is not None:
            problem = nu_problem(g["norm_ema"])
            if problem:
                raise ValueError(f"{where}: param_groups[{k}]['norm_ema'] {problem}")
    ids = [i for g in groups for i in g["params"]]
    foreign: set[str] = set()
    checks: list[tuple[str, torch.Tensor, bool]] = []  # (entry, tensor, must be >= 0)
    for pid, p in zip(ids, params):
        if pid not in state:
            continue
        st = state[pid]
        if not isinstance(st, dict):
            raise ValueError(f"{where}: state[{pid!r}] is a {type(st).__name__}, not a dict of state entries")
        foreign.update(str(k) for k in st if k not in STATE_KEYS)
        for key in PARAM_SHAPED:
            t = st.get(key)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{where}: state[{key!r}] of parameter {pid} has shape {shape}, the parameter "
                    f"{tuple(p.shape)}; this state dict belongs to another model (or parameters are in "
                    "another order)."
                )
            if not t.is_floating_point() or t.layout != torch.strided or t.device.type == "meta":
                raise ValueError(
                    f"{where}: state[{key!r}] of parameter {pid} is a {t.dtype} {t.layout} tensor on "
                    f"{t.device}; it must be a dense floating tensor with data"
                )
            # a DTensor (FSDP2) is checked on this rank's shard
            checks.append(
                (f"state[{key!r}] of parameter {pid}", t.to_local() if is_dtensor(t) else t, key in _NONNEGATIVE)
            )
        moments = [k for k in ("exp_avg", "exp_avg_sq") if k in st]
        if moments and "step" not in st:
            raise ValueError(
                f"{where}: the state of parameter {pid} has moments but no 'step'; the state dict is incomplete"
            )
        if "step" in st:
            problem = step_problem(st["step"])
            step = st["step"]
            if problem is None and isinstance(step, torch.Tensor) and (is_dtensor(step) or step.device.type != "cpu"):
                step = step.to_local() if is_dtensor(step) else step
                problem = step_problem(step.detach().cpu())
            if problem:
                raise ValueError(f"{where}: state['step'] of parameter {pid} {problem}")
        if "norm_ema" in st and st["norm_ema"] is not None:
            problem = nu_problem(st["norm_ema"])
            if problem:
                raise ValueError(f"{where}: state['norm_ema'] of parameter {pid} {problem}")
    if checks:
        # one host read for all of them (loading is not on the step's path)
        flags = torch.stack(
            [
                torch.stack(
                    [
                        (~torch.isfinite(t)).any(),
                        (t < 0).any() if nonneg else torch.zeros((), dtype=torch.bool, device=t.device),
                    ]
                ).cpu()
                for _, t, nonneg in checks
            ]
        ).tolist()
        for (name, _, _), (nonfinite, negative) in zip(checks, flags):
            if nonfinite:
                raise ValueError(
                    f"{where}: {name} contains inf or NaN (the saved run diverged?); loading it would make "
                    "every later step skip or give non-finite parameters. Load an earlier checkpoint, or drop "
                    "this parameter's entry from the state dict to restart its state."
                )
            if negative:
                raise ValueError(f"{where}: {name} has negative entries; a second moment is >= 0")
    return sorted(foreign)


def check_reference_shapes(
    params: list[torch.Tensor], refs: Any, owner: str
) -> dict[torch.Tensor, torch.Tensor | None]:
    """Turn ``set_reference``'s list or dict into {param: tensor or None}, checking every entry
    (shape, real dense, finite) before the caller writes any of them."""
    ids = {id(p): i for i, p in enumerate(params)}
    if isinstance(refs, dict):
        items = []
        for key, value in refs.items():
            if not isinstance(key, torch.Tensor) or id(key) not in ids:
                raise ValueError(
                    f"{owner}.set_reference: a key of the dict is not a parameter of this "
                    "optimizer; key the dict by the parameter tensors themselves"
                )
            items.append((ids[id(key)], key, value))
    else:
        if refs is None or isinstance(refs, (str, bytes, torch.Tensor)) or not hasattr(refs, "__iter__"):
            raise ValueError(
                f"{owner}.set_reference: expected a list with one tensor (or None) per parameter, in "
                f"param_groups order, or a dict {{param: tensor}}; got {type(refs).__name__}"
            )
        refs = list(refs)
        if len(refs) != len(params):
            raise ValueError(
                f"{owner}.set_reference: got {len(refs)} references for {len(params)} "
                "parameters; pass one per parameter, in param_groups order (None for none)"
            )
        items = [(i, p, r) for i, (p, r) in enumerate(zip(params, refs))]
    out = {}
    nonfinite = []
    for i, p, r in items:
        if r is not None:
            if not isinstance(r, torch.Tensor):
                raise ValueError(f"{owner}.set_reference: reference #{i} is a {type(r).__name__}, not a tensor")
            if r.shape != p.shape:
                raise ValueError(
                    f"{owner}.set_reference: reference #{i} has shape {tuple(r.shape)} but its "
                    f"parameter has shape {tuple(p.shape)}"
                )
            if torch.is_complex(r) or r.layout != torch.strided or not r.is_floating_point():
                raise ValueError(
                    f"{owner}.set_reference: reference #{i} must be a dense real floating "
                    f"tensor, got {r.dtype} ({r.layout})"
                )
            if r.device.type == "meta":
                raise ValueError(
                    f"{owner}.set_reference: reference #{i} is a meta tensor (it has no data); pass a "
                    "tensor with values, e.g. the source gradient computed on the model's device"
                )
            nonfinite.append((i, r))
        out[p] = r
    if nonfinite:
        # one host read for all of them (set_reference is not on the step's path)
        flags = torch.stack(
            [(~torch.isfinite(r.to_local() if is_dtensor(r) else r)).any().cpu() for _, r in nonfinite]
        ).tolist()
        bad = [i for (i, _), f in zip(nonfinite, flags) if f]
        if bad:
            raise ValueError(
                f"{owner}.set_reference: reference #{bad[0]} contains inf or NaN"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "; every later step would be skipped. Pass finite references (e.g. recompute the "
                "source gradients with a smaller loss scale)."
            )
    return out
