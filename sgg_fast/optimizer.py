"""``SGGAdamW``: AdamW with Structured Gradient Guidance, a drop-in for ``torch.optim.AdamW``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from . import distributed as _distributed
from .engine import StepEngine
from .plan import REF_EMA, REF_MOMENTUM, REF_SOURCE, PlanReuse, StepPlan, build_plan, describe
from .validation import (
    GUIDANCE_DEFAULTS,
    PARAM_SHAPED,
    check_loaded_state,
    check_reference_shapes,
    nu_problem,
    settings_key,
    step_problem,
    validate_adamw,
    validate_global_groups,
    validate_guidance,
)

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = ["SGGAdamW", "GUIDANCE_DEFAULTS", "GuidedOptimizerMixin", "nu_storage_tensor"]


def nu_storage_tensor(device: torch.device) -> torch.Tensor:
    """A segment's fresh running-norm storage: ``[ν, initialised] = [0, 0]``."""
    return torch.zeros(2, dtype=torch.float32, device=device)


def _as_nu(value: Any, device: torch.device) -> torch.Tensor | None:
    """A stored ν in the ``[ν, initialised]`` form on ``device`` (None: no entry). ``ValueError``
    for a value that breaks :func:`validation.nu_problem`'s rules (checked before any write)."""
    if value is None:
        return None
    problem = nu_problem(value)
    if problem:
        raise ValueError(f"a running norm 'norm_ema' {problem}; drop it to restart the running norm")
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(2).to(device=device, dtype=torch.float32, copy=True)
    return torch.tensor([float(x) for x in value], dtype=torch.float32, device=device)


#: key of ``pending`` (``_init_group``) under which new group-level running norms wait for the commit
_GROUP_NUS = object()

#: the state entries torch's AdamW keeps for every stepped parameter (all or none of them)
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def as_step(step: Any, device: torch.device) -> torch.Tensor:
    """A valid step count (:func:`step_problem`) as torch keeps it: a float32 0-dim tensor."""
    if isinstance(step, torch.Tensor):
        return step.detach().reshape(()).to(device=device, dtype=torch.float32, copy=True)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _is_step(value: Any, device: torch.device) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.float32
        and value.numel() == 1
        and value.device == device
    )


def _is_nu(value: Any, device: torch.device) -> TypeIs[torch.Tensor]:
    return (
        isinstance(value, torch.Tensor)
        and value.shape == (2,)
        and value.dtype == torch.float32
        and value.device == device
    )


class GuidedOptimizerMixin:
    """What SGGAdamW and GradientGuidance share: the engine, settings checks, statistics."""

    _owner = "SGGAdamW"
    _engine: StepEngine
    #: settings_key of each group when they were last validated (None: validate on the next step)
    _settings_keys: list[tuple] | None = None

    def _check_settings(self, groups: list[dict]) -> None:
        """Re-validate the groups whose settings changed since they were last checked (edits of
        ``param_groups`` after construction), with the constructor's errors."""
        keys = [settings_key(g) for g in groups]
        if keys == self._settings_keys:
            return
        for g in groups:
            self._validate_group(g)
        validate_global_groups(groups, self._owner)
        self._settings_keys = keys

    def _validate_group(self, group: dict) -> None:
        validate_guidance(group)

    def _closure_loss(self, closure: Callable[[], Any] | None):
        """Evaluate ``step(closure)``'s closure with grad enabled (as torch.optim does)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def last_stats(self) -> dict[str, torch.Tensor]:
        """Per-segment statistics of the last step (DESIGN §1.6), device tensors of shape [S].

        Keys: grad_norm, ref_norm, cos, conflict, guided_norm, mag_scale, dir_penalty,
        mag_penalty, skipped. No host sync. Empty before the first step.
        """
        return self._engine.stats_dict()

    def segment_labels(self) -> list[str]:
        """What each row of ``last_stats()`` refers to (e.g. "param_groups[0]")."""
        return list(self._engine.last_labels)

    def skipped_steps(self) -> torch.Tensor:
        """How many steps were skipped for non-finite gradients (``nonfinite="skip"``), as an
        int64 tensor; kept on the device without a sync (reading its value syncs)."""
        return self._engine.skipped_steps()

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def process_group(self):
        return self._engine.process_group

    @property
    def _last_out(self) -> torch.Tensor | None:
        return self._engine.last_out


class SGGAdamW(GuidedOptimizerMixin, Optimizer):
    r"""AdamW with Structured Gradient Guidance (SGG, arXiv 2506.00726), fused.

    Parameters are split into segments (``granularity``: one per param_group, per tensor, or
    one global). Per segment, with raw gradient ``g``, reference direction ``r`` and the
    statistics :math:`gg=\sum g^2,\ rr=\sum r^2,\ gr=\sum g\,r` (and :math:`pp=\sum p^2`):

    .. math::
        c &= -\lambda_3\,gr/rr \ \text{ if } rr>0,\ gr<0 \text{ else } 0, \qquad g_1 = g + c\,r \\
        g_2 &= n_1\,\frac{w}{\lVert w\rVert},\quad w = (1-\lambda_1)\frac{g_1}{n_1} + \lambda_1\frac{r}{n_r}
              \quad(\text{else } g_2 = g_1) \\
        s &= (1 - \lambda_2) + \lambda_2\,\tau/n_2 \ \text{ if } n_2 > \tau \text{ else } 1, \qquad u = s\,g_2
             = \alpha\,g + \beta\,r \\
        m &\leftarrow \beta_1 m + (1-\beta_1)u,\quad v \leftarrow \beta_2 v + (1-\beta_2)u^2 \\
        p &\leftarrow p\,(1-\eta\,wd) - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}+\epsilon}

    ``τ`` is ``max_norm`` (``mag_mode="absolute"``), ``mag_ratio·ν`` with ``ν`` a running mean
    of the controlled norm (``"relative"``; no control on its first step) or
    ``mag_ratio·max(‖p‖, 1e-3)`` (``"param"``). ``r`` is ``exp_avg`` before the step
    (``reference="momentum"``), an EMA of raw gradients (``"ema"``) or a fixed source-task
    direction set with :meth:`set_reference` (``"source"``). ``u`` is never stored: a step is
    three launches (statistics, finalize, apply) on the fused backends.

    With every λ = 0 this is ``torch.optim.AdamW``. Non-finite statistics skip the whole step
    (``nonfinite="skip"``, decided on the device by fused backends) or raise
    ``FloatingPointError`` (``"raise"``).

    The full contract (math, numerics, API) is ``docs/DESIGN.md`` in the repository.

    Args:
        params: iterable of parameters or param_group dicts; every argument below except
            ``backend``, ``fused`` and ``process_group`` may be set per group.
        lr, betas, eps, weight_decay, amsgrad, maximize: exactly as ``torch.optim.AdamW``
            (same defaults; decoupled weight decay; ``amsgrad`` keeps ``max_exp_avg_sq``). With
            ``maximize`` the guidance acts on ``-grad``; references set with
            :meth:`set_reference` and the ``"ema"`` reference are kept in ``.grad``'s sign.
        foreach, capturable: accepted for compatibility (every backend is multi-tensor; the
            fused backends never sync the host).
        differentiable: ``True`` raises ``NotImplementedError``.
        fused: ``True`` asks for a fused backend (``RuntimeError`` with the reasons when none
            can serve a step); ``None``/``False``: ``backend`` decides.
        decoupled_weight_decay: ``True`` only (``False``, Adam's L2 penalty, raises
            ``ValueError``): the key torch's AdamW keeps in its param groups, accepted so that
            ``torch.optim.Adam(..., decoupled_weight_decay=True)`` code and its state dicts carry
            over; not in AdamW's own signature.
        lambda_dir (λ1), lambda_mag (λ2), lambda_align (λ3): guidance strengths in [0, 1].
        mag_mode: ``"absolute" | "relative" | "param"``; max_norm, mag_ratio, mag_beta: its τ.
        reference: ``"momentum" | "ema" | "source"``; ref_beta: the EMA's decay.
        granularity: ``"group" | "tensor" | "global"``.
        nonfinite: ``"skip" | "raise"``.
        backend: ``"auto" | "torch" | "triton" | "cuda" | "cpu"`` (``SGG_FAST_BACKEND``
            overrides ``"auto"``); see :func:`sgg_fast.available_backends`.
        process_group: for tensors sliced across processes by hand (each rank holds a slice of
            every segment): the segment statistics are summed over this group each step (one
            all-reduce of ``[segments, 4]``). Not needed for DDP (whole, averaged gradients) nor
            FSDP2 / DTensor parameters (summed over their mesh automatically); see
            :mod:`sgg_fast.distributed`.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``
    (torch's names, so a ``torch.optim.AdamW`` state dict loads both ways) and ``ref``
    (ema/source). The running norm ν of ``mag_mode="relative"`` is one value per segment,
    a float32 tensor ``[ν, initialised]``: in ``param_groups[i]["norm_ema"]`` for
    ``granularity="group"``, in the first global group's ``"norm_ema"`` for ``"global"``, and
    in ``state[p]["norm_ema"]`` for ``"tensor"``; it does not depend on the order of the
    parameters nor on which of them have a gradient, and it is saved by :meth:`state_dict`.
    """

    _owner = "SGGAdamW"
    #: the hooks of sgg_fast.overlap_backward, when installed (they run part of the step in backward)
    overlap_handle = None
    #: last step's plan, reused while its tensors, state and layout are unchanged (plan.PlanReuse)
    _reuse: PlanReuse | None = None
    #: set False to build and check the plan from scratch every step (tests compare the two)
    reuse_plans = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = True,
        lambda_dir: float = 0.2,
        lambda_mag: float = 1.0,
        lambda_align: float = 1.0,
        mag_mode: str = "relative",
        max_norm: float = 1.0,
        mag_ratio: float = 2.0,
        mag_beta: float = 0.9,
        reference: str = "momentum",
        ref_beta: float = 0.9,
        granularity: str = "group",
        nonfinite: str = "skip",
        backend: str = "auto",
        process_group=None,
    ):
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if differentiable:
            raise NotImplementedError(
                "SGGAdamW does not support differentiable=True (its fused steps are not "
                "differentiable); use torch.optim.AdamW(differentiable=True), or "
                "sgg_fast.losses.guidance_penalty for a differentiable form of the guidance."
            )
        if fused and backend == "torch":
            raise ValueError(
                "SGGAdamW(fused=True) asks for a fused backend but backend='torch' is "
                "not one; drop fused=True or use backend='auto'"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            lambda_dir=lambda_dir,
            lambda_mag=lambda_mag,
            lambda_align=lambda_align,
            mag_mode=mag_mode,
            max_norm=max_norm,
            mag_ratio=mag_ratio,
            mag_beta=mag_beta,
            reference=reference,
            ref_beta=ref_beta,
            granularity=granularity,
            nonfinite=nonfinite,
        )
        self._validate_group(defaults)
        self._engine = StepEngine(self._owner, backend, process_group, fused=bool(fused))
        super().__init__(params, defaults)
        validate_global_groups(self.param_groups, self._owner)

    def _validate_group(self, group: dict) -> None:
        validate_adamw(group)
        validate_guidance(group)

    # -- param_groups ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        full = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if isinstance(full.get("betas"), list):
            full["betas"] = tuple(full["betas"])
        self._validate_group(full)
        others = getattr(self, "param_groups", [])
        validate_global_groups(list(others) + [full], self._owner)
        super().add_param_group(param_group)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- reference ---------------------------------------------------------------------------
    def set_reference(self, refs) -> None:
        """Set the fixed source-task direction ``r`` for ``reference="source"`` groups.

        ``refs``: a list with one tensor (or None: zero reference) per parameter, in
        param_groups order, or a dict ``{param: tensor}``. Copied into ``state[p]["ref"]``
        (the parameter's dtype, device and layout). All entries are checked (shape, finite)
        before any is written. See :func:`sgg_fast.source_gradients`.
        """
        checked = check_reference_shapes(self._all_params(), refs, self._owner)
        new = {
            p: (
                torch.zeros_like(p, memory_format=torch.preserve_format) if r is None else _distributed.like_param(r, p)
            )
            for p, r in checked.items()
        }
        for p, r in new.items():
            self.state[p]["ref"] = r

    # -- the step ----------------------------------------------------------------------------
    def _check_state(self, plan: StepPlan) -> None:
        """Every existing state entry fits its parameter; "source" references are set."""
        for i, p in enumerate(plan.params):
            st = self.state.get(p)
            mode = plan.ref_mode(i)
            if mode == REF_SOURCE and (not st or st.get("ref") is None):
                raise RuntimeError(
                    f"{self._owner}: {plan.label(i)} is in a reference='source' group but no reference "
                    "was set; call opt.set_reference(...) before step() (see "
                    "sgg_fast.source_gradients), with None for a zero reference."
                )
            if not st:
                continue
            for k in PARAM_SHAPED:
                t = st.get(k)
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                    what = describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise RuntimeError(
                        f"{self._owner}: state[{k!r}] of {plan.label(i)} is {what}, its parameter "
                        f"{describe(p)}. The optimizer state does not match this model (a checkpoint "
                        "of another model or a corrupted one): load the state saved with this model, "
                        f"or drop this parameter's state with `del opt.state[p]` to restart it."
                    )
            have = [k for k in ADAMW_STATE if k in st]
            if have and len(have) != len(ADAMW_STATE):
                missing = [k for k in ADAMW_STATE if k not in st]
                raise RuntimeError(
                    f"{self._owner}: the state of {plan.label(i)} has {', '.join(map(repr, have))} but "
                    f"no {', '.join(map(repr, missing))}; the checkpoint is incomplete. Load a complete "
                    "optimizer state, or drop this parameter's state with `del opt.state[p]` to restart it."
                )
            if "step" in st:
                problem = step_problem(st["step"])
                if problem:
                    raise RuntimeError(
                        f"{self._owner}: state['step'] of {plan.label(i)} {problem}. Load a valid "
                        "checkpoint, or drop this parameter's state with `del opt.state[p]` to restart it."
                    )

    def _init_group(self, plan: StepPlan) -> dict:
        """Attach the state of every tensor (new entries are made but not yet stored: they are
        committed after the step, and dropped when a CPU step is skipped)."""
        pending: dict[torch.Tensor, dict] = {}
        for i, p in enumerate(plan.params):
            st = self.state.get(p)
            group = plan.groups[plan.group_index[i]]
            mode = plan.ref_mode(i)
            if not st or "step" not in st:
                new = pending[p] = dict(st or {})
                new["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                new["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                new["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st = new
            elif not _is_step(st["step"], p.device):
                # a step count of another dtype or device (a hand-made or converted checkpoint):
                # a float32 copy on the parameter's device, stored only if the step succeeds
                st = pending.setdefault(p, dict(st))
                st["step"] = as_step(st["step"], p.device)
            if group["amsgrad"] and "max_exp_avg_sq" not in st:
                st = pending.setdefault(p, dict(st))
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if mode == REF_EMA and "ref" not in st:
                st = pending.setdefault(p, dict(st))
                st["ref"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            plan.steps.append(st["step"])
            plan.exp_avgs.append(st["exp_avg"])
            plan.exp_avg_sqs.append(st["exp_avg_sq"])
            plan.max_exp_avg_sqs.append(st["max_exp_avg_sq"] if group["amsgrad"] else None)
            plan.refs.append(st["exp_avg"] if mode == REF_MOMENTUM else st["ref"])
        plan.seg_nus = [self._segment_nu(plan, s, pending) for s in range(plan.num_segments)]
        return pending

    def _segment_nu(self, plan: StepPlan, s: int, pending: dict) -> torch.Tensor:
        """Segment ``s``'s ``[ν, initialised]`` storage (DESIGN §1 C; see the class docstring).
        New or converted storage waits in ``pending`` and is stored only if the step succeeds."""
        seg = plan.segments[s]
        home = plan.home
        if seg.group["mag_mode"] != "relative":
            return self._engine.scratch_nu(s, home)
        if seg.group["granularity"] == "tensor":
            p = plan.params[seg.start]
            st = pending.get(p) or self.state.get(p) or {}
            nu, new = self._checked_nu(st.get("norm_ema"), home, seg.label)
            if new:
                pending.setdefault(p, dict(self.state.get(p, {})))["norm_ema"] = nu
            return nu
        group = seg.group
        if seg.group["granularity"] == "global":
            group = next(g for g in self.param_groups if g["granularity"] == "global")
        made = pending.setdefault(_GROUP_NUS, {})
        if id(group) in made:
            return made[id(group)][1]
        nu, new = self._checked_nu(group.get("norm_ema"), home, seg.label)
        if new:
            made[id(group)] = (group, nu)
        return nu

    def _checked_nu(self, value: Any, home: torch.device, where: str) -> tuple[torch.Tensor, bool]:
        """(the running norm's storage, whether it is new). A stored value is used in place when
        it is a float32 ``[2]`` on ``home`` (its value checked where that costs no sync: on the
        CPU); another valid value is converted, an invalid one is a ``ValueError``."""
        if _is_nu(value, home) and (home.type != "cpu" or nu_problem(value) is None):
            return value, False
        try:
            nu = _as_nu(value, home)
        except ValueError as e:
            raise ValueError(f"{self._owner}: {where}: {e}") from None
        return (nu if nu is not None else nu_storage_tensor(home)), True

    def _commit(self, pending: dict, skipped: bool) -> None:
        """Store the state made for this step, unless the step was skipped (then it leaves no
        trace, new state included)."""
        made = pending.pop(_GROUP_NUS, {})
        if not skipped:
            self.state.update(pending)
            for group, nu in made.values():
                group["norm_ema"] = nu

    def _prepare(self) -> StepPlan:
        """The checked plan of this step with its state attached (tests and tools use it)."""
        plan, pending = self._plan()
        self._commit(pending, False)
        return plan

    def _plan(self) -> tuple[StepPlan, dict]:
        self._check_settings(self.param_groups)
        if self._reuse is not None:
            plan = self._reuse.reuse(self.param_groups, self.state)
            if plan is not None:
                return plan, {}  # last step's checked plan; its state exists (nothing pending)
            self._reuse = None
        plan = build_plan(self.param_groups, self._owner, self._engine.cache)
        self._check_state(plan)
        return plan, self._init_group(plan)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One SGG-AdamW step. ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        overlap = self.overlap_handle
        if overlap is not None:
            overlap.before_step()
        plan, pending = self._plan()  # every check happens here, before any write
        try:
            if not plan.params:
                self._engine.idle(plan)
            else:
                # statistics taken during backward by overlap_backward(mode="stats"), if any
                partials = None if overlap is None else overlap.partials(plan, self._engine.resolve(plan))
                self._engine.run(plan, "apply", partials)
                skipped = self._engine.last_host_skip is True
                self._commit(pending, skipped)
                if self.reuse_plans and not plan.reused and not (skipped and pending) and self._engine.last_local:
                    if overlap is None or overlap.mode != "step":
                        self._reuse = PlanReuse(plan, self.param_groups, self.state)
            if overlap is not None:
                overlap.after_step(plan)
        finally:
            plan.grads = []  # a kept plan must not keep this step's gradients alive
        return loss

    # -- a step taken in parts (sgg_fast.overlap: one tensor at a time, inside backward) ------
    @property
    def engine(self) -> StepEngine:
        """The step engine (backend choice, caches, last statistics) this optimizer drives."""
        return self._engine

    @property
    def owner(self) -> str:
        """The name error messages give this optimizer ("SGGAdamW")."""
        return self._owner

    def check_settings(self) -> None:
        """Re-validate the param groups edited since they were last checked (as ``step()`` does)."""
        self._check_settings(self.param_groups)

    def step_plan(self, plan: StepPlan) -> tuple[torch.Tensor, bool]:
        """The whole SGG step of ``plan``, a checked plan of some of this optimizer's tensors
        (``build_plan``'s checks done; a plan handed out again by ``plan.TensorPlanReuse`` has
        its state attached): the state is checked and attached, the engine runs statistics,
        finalize and apply, and state made for the step is stored unless it was skipped.
        Returns the finalize output and whether the plan may be kept for the next step."""
        pending: dict = {}
        if not plan.reused:
            self._check_state(plan)
            pending = self._init_group(plan)
        out = self._engine.run(plan, "apply")
        skipped = self._engine.last_host_skip is True
        self._commit(pending, skipped)
        return out, not plan.reused and not (skipped and pending)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.overlap_handle is not None:
            self.overlap_handle.zero_grad()

    # -- state dict, pickling ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_sgg_backend"] = self._engine.backend
        state["_sgg_fused"] = self._engine.fused
        if self._engine.process_group is not None:
            raise TypeError(
                f"{self._owner} with process_group= cannot be pickled or deep-copied (a process "
                "group is a live connection); checkpoint with state_dict() instead, and pass "
                "process_group= again when you build the new optimizer."
            )
        state.pop("_engine", None)
        state.pop("_settings_keys", None)
        state.pop("overlap_handle", None)  # hooks belong to the live model, not to a copy
        state.pop("_reuse", None)  # refers to this optimizer's own plan and state objects
        state.pop("_step_supports_amp_scaling", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        backend = state.pop("_sgg_backend", "auto")
        fused = state.pop("_sgg_fused", False)
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in GUIDANCE_DEFAULTS.items():
                group.setdefault(k, self.defaults.get(k, v))
            for k in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"):
                group.setdefault(k, self.defaults.get(k, None if k in ("foreach", "fused") else False))
        if "_engine" not in self.__dict__:
            self._engine = StepEngine(self._owner, backend, None, fused=fused)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ``SGGAdamW`` or ``torch.optim.AdamW`` state dict (same state names).

        Everything is checked first, with the rules of the constructor and of a step
        (:func:`validation.check_loaded_state`: group settings; every state entry a dict; moments
        shaped like their parameter, floating, finite, second moments >= 0; ``step`` a finite
        number >= 0; running norms finite and >= 0), so a bad dict raises ``ValueError`` naming
        the entry and leaves this optimizer unchanged. ``step`` is kept as a float32 0-dim tensor
        on the parameter's device (torch's form: a float64 or int64 count converts) and the
        running norms as float32 ``[ν, initialised]``; guidance settings missing in the loaded
        groups take this optimizer's defaults. Entries that are not AdamW's (e.g. SGD's
        ``momentum_buffer``) are kept, unused, with a warning.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError(
                f"{self._owner}.load_state_dict: expected a dict with 'state' and "
                "'param_groups' (from optimizer.state_dict())"
            )
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for k, (g, ng) in enumerate(zip(self.param_groups, groups)):
            if len(g["params"]) != len(ng["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match "
                    f"the size of optimizer's group (param_groups[{k}])"
                )
        merged = []
        for k, ng in enumerate(groups):
            full = {**self.defaults, **{key: v for key, v in ng.items() if key != "params"}}
            if isinstance(full.get("betas"), list):
                full["betas"] = tuple(full["betas"])
            try:
                self._validate_group(full)
            except ValueError as e:
                raise ValueError(f"{self._owner}.load_state_dict: param_groups[{k}]: {e}") from None
            merged.append(full)
        validate_global_groups(merged, self._owner)
        params = self._all_params()
        ids = [i for g in groups for i in g["params"]]
        foreign = check_loaded_state(self._owner, state_dict["state"], groups, params)
        if foreign:
            warnings.warn(
                f"{self._owner}.load_state_dict: the state holds entries that are not AdamW's "
                f"({', '.join(foreign[:6])}): a state dict of another optimizer? They are kept but "
                "not used; the AdamW moments start from zero where they are missing.",
                UserWarning,
                stacklevel=2,
            )
        nus = {
            pid: st["norm_ema"] for pid, st in state_dict["state"].items() if isinstance(st, dict) and "norm_ema" in st
        }
        group_nus = [ng.get("norm_ema") for ng in groups]
        super().load_state_dict(state_dict)
        for group, full in zip(self.param_groups, merged):
            for key, v in full.items():
                group.setdefault(key, v)
        for group, nu in zip(self.param_groups, group_nus):
            group.pop("norm_ema", None)
            home = group["params"][0].device if group["params"] else torch.device("cpu")
            nu = _as_nu(nu, home)
            if nu is not None:
                group["norm_ema"] = nu
        for pid, p in zip(ids, params):
            st = self.state.get(p)
            if not st:
                continue
            st.pop("norm_ema", None)
            nu = _as_nu(nus.get(pid), p.device)
            if nu is not None:
                st["norm_ema"] = nu
            if "step" in st:
                st["step"] = as_step(st["step"], p.device)
        self._settings_keys = None
        self._engine.reset_last()
