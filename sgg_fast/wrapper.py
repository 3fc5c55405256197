"""``GradientGuidance``: SGG for any torch optimizer, by rewriting ``.grad`` in place."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from . import distributed as _distributed
from . import guidance as G
from .engine import StepEngine
from .optimizer import GuidedOptimizerMixin, _as_nu, _is_nu, nu_storage_tensor
from .plan import REF_EMA, REF_MOMENTUM, REF_SOURCE, StepPlan, build_plan
from .validation import GUIDANCE_DEFAULTS, SEGMENT_KEYS, check_reference_shapes, validate_guidance


class GradientGuidance(GuidedOptimizerMixin, Optimizer):
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

    A wrapped optimizer with ``maximize=True`` gets the guidance of ``-grad`` (the rewritten
    ``.grad`` is negated again by the wrapped step). The running norms of ``mag_mode="relative"``
    are kept per segment (``guide_state[p]["norm_ema"]`` for ``granularity="tensor"``, else in
    this wrapper's ``segment_state``), saved by :meth:`state_dict`.
    """

    _owner = "GradientGuidance"

    def __init__(self, optimizer: Optimizer, backend: str = "auto", process_group=None, **guidance_kwargs: Any):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"GradientGuidance wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        unknown = set(guidance_kwargs) - set(GUIDANCE_DEFAULTS)
        if unknown:
            raise TypeError(
                f"GradientGuidance got unknown settings {sorted(unknown)}; known: {sorted(GUIDANCE_DEFAULTS)}"
            )
        settings = {**GUIDANCE_DEFAULTS, **guidance_kwargs}
        validate_guidance(settings)
        self.optimizer = optimizer
        self.settings = settings
        self._check_settings([self._merged(g) for g in optimizer.param_groups])
        if (
            settings["reference"] == "momentum"
            and isinstance(optimizer, torch.optim.SGD)
            and all(g.get("momentum", 0) == 0 for g in optimizer.param_groups)
        ):
            raise ValueError(
                "GradientGuidance(reference='momentum') needs a momentum buffer, but this SGD "
                "has momentum=0; give SGD momentum>0 or use reference='ema' or 'source'."
            )
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
        self.segment_state: dict[str, torch.Tensor] = {}
        self._engine = StepEngine(self._owner, backend, process_group)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        validate_guidance(self._merged(param_group))
        self.optimizer.add_param_group(param_group)

    def _merged(self, group: dict) -> dict:
        merged = {k: group.get(k, v) for k, v in self.settings.items()}
        merged["maximize"] = bool(group.get("maximize", False))
        merged["params"] = group["params"]
        return merged

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_reference(self, refs) -> None:
        """As :meth:`SGGAdamW.set_reference`; stored in ``guide_state[p]["ref"]``."""
        checked = check_reference_shapes(self._all_params(), refs, "GradientGuidance")
        new = {
            p: (
                torch.zeros_like(p, memory_format=torch.preserve_format) if r is None else _distributed.like_param(r, p)
            )
            for p, r in checked.items()
        }
        for p, r in new.items():
            self.guide_state[p]["ref"] = r

    def _momentum(self, p: torch.Tensor, label: str) -> torch.Tensor | None:
        st = self.optimizer.state.get(p, {})
        for key in ("exp_avg", "momentum_buffer"):
            buf = st.get(key)
            if isinstance(buf, torch.Tensor):
                return buf
        if any(isinstance(v, torch.Tensor) and v.shape == p.shape for v in st.values()):
            raise RuntimeError(
                f"GradientGuidance(reference='momentum'): {type(self.optimizer).__name__} keeps no "
                f"'exp_avg' or 'momentum_buffer' for {label}; use reference='ema' or 'source'."
            )
        return None  # not stepped yet: r = 0, as for SGGAdamW's first step

    def _prepare(self) -> StepPlan:
        groups = [self._merged(g) for g in self.param_groups]
        self._check_settings(groups)
        plan = build_plan(groups, self._owner, self._engine.cache, rewrite_grad=True)
        for i, p in enumerate(plan.params):
            if plan.ref_mode(i) == REF_SOURCE and "ref" not in self.guide_state.get(p, {}):
                raise RuntimeError(
                    f"GradientGuidance: {plan.label(i)} uses reference='source' but no reference was "
                    "set; call set_reference(...) before step()."
                )
            ref = self.guide_state.get(p, {}).get("ref")
            if ref is not None and (ref.shape != p.shape or ref.device != p.device):
                raise RuntimeError(
                    f"GradientGuidance: the reference of {plan.label(i)} has shape "
                    f"{tuple(ref.shape)} on {ref.device}, its parameter {tuple(p.shape)} on "
                    f"{p.device}; call set_reference again with matching tensors."
                )
        moms = [
            self._momentum(p, plan.label(i)) if plan.ref_mode(i) == REF_MOMENTUM else None
            for i, p in enumerate(plan.params)
        ]
        for i, p in enumerate(plan.params):
            st = self.guide_state[p]
            mode = plan.ref_mode(i)
            if mode == REF_EMA and "ref" not in st:
                st["ref"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            plan.refs.append(moms[i] if mode == REF_MOMENTUM else st["ref"])
        plan.seg_nus = [self._segment_nu(plan, s) for s in range(plan.num_segments)]
        return plan

    def _segment_nu(self, plan: StepPlan, s: int) -> torch.Tensor:
        seg = plan.segments[s]
        home = plan.home
        if seg.group["mag_mode"] != "relative":
            return self._engine.scratch_nu(s, home)
        if seg.group["granularity"] == "tensor":
            holder, key = self.guide_state[plan.params[seg.start]], "norm_ema"
        else:
            holder = self.segment_state
            key = "global" if seg.group["granularity"] == "global" else f"group:{plan.group_index[seg.start]}"
        nu = holder.get(key)
        if not _is_nu(nu, home):
            nu = _as_nu(nu, home)
            holder[key] = nu if nu is not None else nu_storage_tensor(home)
        return holder[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = self._closure_loss(closure)
        plan = self._prepare()
        if plan.params:
            out = self._engine.run(plan, "guide")
            skipped = self._engine.last_host_skip
            if skipped is None:  # host sync: whether to call the wrapped step
                skipped = bool(out[0, G.O_SKIP].item())
            if skipped:
                return loss
        else:
            self._engine.idle(plan)
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
            "segments": dict(self.segment_state),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        guide = state_dict.pop("guidance", None)
        params = self._all_params()
        new_state: defaultdict[torch.Tensor, dict] = defaultdict(dict)
        segments: dict[str, torch.Tensor] = {}
        if guide:
            for i, st in guide["state"].items():
                if not 0 <= int(i) < len(params):
                    raise ValueError(
                        f"GradientGuidance.load_state_dict: guidance state for parameter "
                        f"{i}, but this optimizer has {len(params)} parameters"
                    )
                p = params[int(i)]
                entry = {}
                for k, v in st.items():
                    if k == "norm_ema":
                        nu = _as_nu(v, p.device)
                        if nu is not None:
                            entry[k] = nu
                    else:
                        if v.shape != p.shape:
                            raise ValueError(
                                f"GradientGuidance.load_state_dict: guidance {k!r} of parameter "
                                f"{i} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}"
                            )
                        entry[k] = v.detach().to(device=p.device, dtype=p.dtype, copy=True)
                new_state[p] = entry
            for k, v in guide.get("segments", {}).items():
                nu = _as_nu(v, v.device)
                if nu is not None:
                    segments[k] = nu
        self.optimizer.load_state_dict(state_dict)
        self.guide_state, self.segment_state = new_state, segments
        self._settings_keys = None
        self._engine.reset_last()


__all__ = ["GradientGuidance", "SEGMENT_KEYS"]
