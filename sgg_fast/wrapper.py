"""``GradientGuidance``: SGG for any torch optimizer, by rewriting ``.grad`` in place."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from . import distributed as _distributed
from . import guidance as G
from .optimizer import GUIDANCE_DEFAULTS, _GuidedMixin, check_reference_shapes, validate_guidance
from .plan import REF_EMA, REF_MOMENTUM, REF_SOURCE, SEGMENT_KEYS, StepPlan, build_plan


class GradientGuidance(_GuidedMixin, Optimizer):
    """Structured Gradient Guidance in front of any ``torch.optim`` optimizer.

    ``step()`` computes the per-segment statistics (one pass over ``g`` and ``r``), rewrites
    every ``.grad`` in place to the guided gradient ``u = α·g + β·r`` (one pass; no gradient
    copy is kept), then calls the wrapped optimizer's ``step()``. The math is DESIGN §1 A-C,
    the same as :class:`~sgg_fast.SGGAdamW`; only the optimizer applied to ``u`` differs.

    ``reference="momentum"`` uses the wrapped optimizer's ``exp_avg`` (Adam family) or
    ``momentum_buffer`` (SGD with momentum) as it stands before the step; an optimizer that
    keeps neither raises. ``"ema"`` and ``"source"`` keep their ``ref`` in this wrapper's
    state (saved by :meth:`state_dict`).

    Guidance settings (``lambda_dir`` … ``nonfinite``) are given as keyword arguments; a
    param_group of the wrapped optimizer may override any of them with a key of the same name.

    ``param_groups`` and ``state`` are the wrapped optimizer's, so LR schedulers and
    ``zero_grad`` work on the wrapper. Skipping a non-finite step needs the host to know
    whether to call the wrapped ``step()``: one sync per step.

    ``process_group``: as for :class:`~sgg_fast.SGGAdamW`, for tensors sliced across processes
    by hand; DTensor (FSDP2) parameters and DDP need none.
    """

    _owner = "GradientGuidance"

    def __init__(self, optimizer: Optimizer, backend: str = "auto", process_group=None,
                 **guidance_kwargs: Any):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"GradientGuidance wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        unknown = set(guidance_kwargs) - set(GUIDANCE_DEFAULTS)
        if unknown:
            raise TypeError(f"GradientGuidance got unknown settings {sorted(unknown)}; "
                            f"known: {sorted(GUIDANCE_DEFAULTS)}")
        settings = {**GUIDANCE_DEFAULTS, **guidance_kwargs}
        validate_guidance(settings)
        self.optimizer = optimizer
        self.settings = settings
        for g in optimizer.param_groups:
            validate_guidance(self._merged(g))
        if settings["reference"] == "momentum" and isinstance(optimizer, torch.optim.SGD) and \
                all(g.get("momentum", 0) == 0 for g in optimizer.param_groups):
            raise ValueError("GradientGuidance(reference='momentum') needs a momentum buffer, but this SGD "
                             "has momentum=0; give SGD momentum>0 or use reference='ema' or 'source'.")
        # Optimizer bookkeeping without re-adding (copying) the wrapped optimizer's groups
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.guide_state: defaultdict[torch.Tensor, dict] = defaultdict(dict)
        self._init_guided(backend, process_group)

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        validate_guidance(self._merged(param_group))
        self.optimizer.add_param_group(param_group)

    def _merged(self, group: dict) -> dict:
        merged = {k: group.get(k, v) for k, v in self.settings.items()}
        merged["params"] = group["params"]
        return merged

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_reference(self, refs) -> None:
        """As :meth:`SGGAdamW.set_reference`; stored in ``guide_state[p]["ref"]``."""
        for p, r in check_reference_shapes(self._all_params(), refs, "GradientGuidance").items():
            self.guide_state[p]["ref"] = (torch.zeros_like(p) if r is None else
                                          _distributed.like_param(r, p))

    def _momentum(self, p: torch.Tensor, label: str) -> torch.Tensor | None:
        st = self.optimizer.state.get(p, {})
        for key in ("exp_avg", "momentum_buffer"):
            buf = st.get(key)
            if isinstance(buf, torch.Tensor):
                return buf
        if any(isinstance(v, torch.Tensor) and v.shape == p.shape for v in st.values()):
            raise RuntimeError(
                f"GradientGuidance(reference='momentum'): {type(self.optimizer).__name__} keeps no "
                f"'exp_avg' or 'momentum_buffer' for {label}; use reference='ema' or 'source'.")
        return None  # not stepped yet: r = 0, as for SGGAdamW's first step

    def _prepare(self) -> StepPlan:
        groups = [self._merged(g) for g in self.param_groups]
        plan = build_plan(groups, "GradientGuidance", self._cache)
        for i, p in enumerate(plan.params):
            if plan.ref_mode(i) == REF_SOURCE and "ref" not in self.guide_state.get(p, {}):
                raise RuntimeError(
                    f"GradientGuidance: {plan.labels[i]} uses reference='source' but no reference was "
                    "set; call set_reference(...) before step().")
        moms = [self._momentum(p, plan.labels[i]) if plan.ref_mode(i) == REF_MOMENTUM else None
                for i, p in enumerate(plan.params)]
        for i, p in enumerate(plan.params):
            st = self.guide_state[p]
            mode = plan.ref_mode(i)
            if mode == REF_EMA and "ref" not in st:
                st["ref"] = torch.zeros_like(p)
            relative = plan.segments[plan.seg_of_param[i]].group["mag_mode"] == "relative"
            if relative and "norm_ema" not in st:
                st["norm_ema"] = torch.zeros((), dtype=torch.float32, device=p.device)
            plan.refs.append(moms[i] if mode == REF_MOMENTUM else st["ref"])
            plan.norm_emas.append(st["norm_ema"] if relative else None)
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = self._closure_loss(closure)
        plan = self._prepare()
        if plan.params:
            out = self._run_guided(plan, "guide")
            if bool(out[0, G.O_SKIP].item()):  # host sync: whether to call the wrapped step
                return loss
        else:
            _distributed.idle_step(plan, self.process_group, self._owner)
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"guidance"`` (per-parameter ref/norm_ema)."""
        sd = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        sd["guidance"] = {
            "settings": dict(self.settings),
            "state": {index[id(p)]: dict(st) for p, st in self.guide_state.items() if id(p) in index},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        guide = state_dict.pop("guidance", None)
        self.optimizer.load_state_dict(state_dict)
        self.guide_state = defaultdict(dict)
        if guide:
            params = self._all_params()
            for i, st in guide["state"].items():
                p = params[int(i)]
                self.guide_state[p] = {
                    k: v.detach().to(device=p.device, dtype=torch.float32 if k == "norm_ema" else p.dtype,
                                     copy=True) for k, v in st.items()}
        self._last_out, self._last_labels = None, []


__all__ = ["GradientGuidance", "SEGMENT_KEYS"]
