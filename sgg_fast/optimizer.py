"""``SGGAdamW``: AdamW with Structured Gradient Guidance, a drop-in for ``torch.optim.AdamW``."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import backends as _backends
from . import distributed as _distributed
from . import guidance as G
from .plan import (GRANULARITIES, MAG_MODES, NONFINITE, REF_EMA, REF_MOMENTUM, REF_SOURCE,
                   REFERENCES, SEGMENT_KEYS, StepPlan, build_plan)

GUIDANCE_DEFAULTS: dict[str, Any] = dict(
    lambda_dir=0.2, lambda_mag=1.0, lambda_align=1.0,
    mag_mode="relative", max_norm=1.0, mag_ratio=2.0, mag_beta=0.9,
    reference="momentum", ref_beta=0.9, granularity="group", nonfinite="skip",
)


def _check_number(name: str, value: Any, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        return  # tensor hyper-parameters (e.g. lr for capturable schedules) are taken as given
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and in {rng})")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose one of {', '.join(map(repr, choices))})")


def validate_guidance(group: dict) -> None:
    """Check the guidance settings of a param_group-like dict; ``ValueError`` names the bad one."""
    inf = float("inf")
    for k in ("lambda_dir", "lambda_mag", "lambda_align"):
        _check_number(k, group[k], 0.0, 1.0)
    _check_choice("mag_mode", group["mag_mode"], MAG_MODES)
    _check_number("max_norm", group["max_norm"], 0.0, inf, lo_open=True, hi_open=True)
    _check_number("mag_ratio", group["mag_ratio"], 0.0, inf, lo_open=True, hi_open=True)
    _check_number("mag_beta", group["mag_beta"], 0.0, 1.0, hi_open=True)
    _check_choice("reference", group["reference"], REFERENCES)
    _check_number("ref_beta", group["ref_beta"], 0.0, 1.0, hi_open=True)
    _check_choice("granularity", group["granularity"], GRANULARITIES)
    _check_choice("nonfinite", group["nonfinite"], NONFINITE)


def validate_adamw(group: dict) -> None:
    inf = float("inf")
    _check_number("lr", group["lr"], 0.0, inf, hi_open=True)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    _check_number("beta parameter at index 0", betas[0], 0.0, 1.0, hi_open=True)
    _check_number("beta parameter at index 1", betas[1], 0.0, 1.0, hi_open=True)
    _check_number("eps", group["eps"], 0.0, inf, hi_open=True)
    _check_number("weight_decay", group["weight_decay"], 0.0, inf, hi_open=True)


def check_reference_shapes(params: list[torch.Tensor], refs: Any, owner: str) -> dict[torch.Tensor, torch.Tensor | None]:
    """Turn ``set_reference``'s list or dict into {param: tensor or None}, checking shapes."""
    ids = {id(p): i for i, p in enumerate(params)}
    if isinstance(refs, dict):
        items = []
        for key, value in refs.items():
            if not isinstance(key, torch.Tensor) or id(key) not in ids:
                raise ValueError(f"{owner}.set_reference: a key of the dict is not a parameter of this "
                                 "optimizer; key the dict by the parameter tensors themselves")
            items.append((ids[id(key)], key, value))
    else:
        refs = list(refs)
        if len(refs) != len(params):
            raise ValueError(f"{owner}.set_reference: got {len(refs)} references for {len(params)} "
                             "parameters; pass one per parameter, in param_groups order (None for none)")
        items = [(i, p, r) for i, (p, r) in enumerate(zip(params, refs))]
    out = {}
    for i, p, r in items:
        if r is not None:
            if not isinstance(r, torch.Tensor):
                raise ValueError(f"{owner}.set_reference: reference #{i} is a {type(r).__name__}, not a tensor")
            if r.shape != p.shape:
                raise ValueError(f"{owner}.set_reference: reference #{i} has shape {tuple(r.shape)} but its "
                                 f"parameter has shape {tuple(p.shape)}")
            if torch.is_complex(r) or r.is_sparse:
                raise ValueError(f"{owner}.set_reference: reference #{i} must be a dense real tensor")
        out[p] = r
    return out


class _GuidedMixin:
    """What SGGAdamW and GradientGuidance share: planning, backend choice, the guided stages."""

    _owner = "SGGAdamW"

    def _init_guided(self, backend: str, process_group=None) -> None:
        if backend != "auto":
            _backends.get_backend(backend)  # ValueError for an unknown name
        self.backend = backend
        self.process_group = _distributed.check_process_group(process_group, self._owner)
        self._cache: dict[str, Any] = {}
        self._last_out: torch.Tensor | None = None
        self._last_labels: list[str] = []   # labels only: the plan would keep last step's grads alive
        self._backend_key = None
        self._backend_obj = None

    def _guide_groups(self) -> list[dict]:
        return self.param_groups

    def _resolve(self, plan: StepPlan):
        import os

        key = (self.backend, os.environ.get(_backends.ENV_VAR), tuple(plan.devices), tuple(plan.dtypes))
        if key != self._backend_key:
            self._backend_obj = _backends.resolve(self.backend, plan)
            self._backend_key = key
        return self._backend_obj

    def _check_finite(self, plan: StepPlan, out: torch.Tensor) -> None:
        """``nonfinite="raise"``: FloatingPointError naming the first bad segment (syncs)."""
        if not plan.needs("nonfinite", "raise"):
            return
        bad = out[:, G.O_BAD].tolist()
        for seg, b in zip(plan.segments, bad):
            if b:
                raise FloatingPointError(
                    f"{self._owner}: non-finite gradient statistics in {seg.label} "
                    f"(tensors {plan.labels[seg.start]} … {plan.labels[seg.stop - 1]}); the step was "
                    "not applied. Find where the inf/NaN comes from (lower the lr, use a GradScaler "
                    "for fp16), or pass nonfinite='skip' to skip such steps.")

    def _gather_nu(self, plan: StepPlan) -> torch.Tensor:
        """``[S]`` norm_ema of each segment: that of its first tensor (0 where unused)."""
        S = plan.num_segments
        if not plan.needs("mag_mode", "relative"):
            return torch.zeros(S, device=plan.home)
        vals = [plan.norm_emas[s.start] if plan.norm_emas[s.start] is not None
                else torch.zeros((), device=s.device) for s in plan.segments]
        return torch.stack([v.to(plan.home) for v in vals])

    def _scatter_nu(self, plan: StepPlan, out: torch.Tensor) -> None:
        idx = [i for i, t in enumerate(plan.norm_emas) if t is not None]
        if not idx:
            return
        nu = out[:, G.O_NU]
        by_dev: dict[torch.device, list[int]] = {}
        for i in idx:
            by_dev.setdefault(plan.norm_emas[i].device, []).append(i)
        for dev, ii in by_dev.items():
            segs = tuple(plan.seg_of_param[i] for i in ii)
            # cached across steps: building a device index every step would be a blocking copy
            seg = plan._cached(f"nu_index:{dev}", (segs, plan.home),
                               lambda: torch.tensor(segs, device=plan.home))
            vals = nu[seg].to(dev)
            torch._foreach_copy_([plan.norm_emas[i] for i in ii], list(vals.unbind()))

    def _run_guided(self, plan: StepPlan, stage: str) -> torch.Tensor:
        """Statistics → (all-reduce across ranks) → finalize → ``stage`` ("apply" or "guide");
        returns the finalize output. DTensors in the plan are replaced by their local shards."""
        sync = _distributed.prepare(plan, self.process_group, self._owner)
        backend = self._resolve(plan)
        owns_nu = getattr(backend, "owns_norm_ema", False)  # reads/writes norm_ema itself
        partials = backend.stats(plan) if sync is None else sync.stats(plan, backend)
        nu = None if owns_nu else self._gather_nu(plan)
        out = backend.finalize(plan, partials, plan.hyper(partials.values.dtype), nu)
        self._check_finite(plan, out)
        getattr(backend, stage)(plan, out)
        if not owns_nu:
            self._scatter_nu(plan, out)
        self._last_out, self._last_labels = out, [s.label for s in plan.segments]
        return out

    @staticmethod
    def _closure_loss(closure: Callable[[], Any] | None):
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
        return {} if self._last_out is None else G.stats_dict(self._last_out)

    def segment_labels(self) -> list[str]:
        """What each row of ``last_stats()`` refers to (e.g. "param_groups[0]")."""
        return list(self._last_labels)


class SGGAdamW(_GuidedMixin, Optimizer):
    r"""AdamW with Structured Gradient Guidance (SGG, arXiv 2506.00726), fused.

    Parameters are split into segments (``granularity``: one per param_group, per tensor, or
    one global). Per segment, with raw gradient ``g``, reference direction ``r`` and the
    statistics :math:`gg=\sum g^2,\ rr=\sum r^2,\ gr=\sum g\,r` (and :math:`pp=\sum p^2`):

    .. math::
        c &= -\lambda_3\,gr/rr \ \text{ if } rr>0,\ gr<0 \text{ else } 0, \qquad g_1 = g + c\,r \\
        g_2 &= n_1\,\frac{w}{\lVert w\rVert},\quad w = (1-\lambda_1)\frac{g_1}{n_1} + \lambda_1\frac{r}{n_r}
              \quad(\text{else } g_2 = g_1) \\
        s &= 1 - \lambda_2\,(1 - \tau/n_2) \ \text{ if } n_2 > \tau \text{ else } 1, \qquad u = s\,g_2
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

    Args:
        params: iterable of parameters or param_group dicts; every argument below except
            ``backend`` may be set per group.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
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

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (torch's names, so a
    ``torch.optim.AdamW`` state dict loads both ways), ``ref`` (ema/source) and ``norm_ema``
    (relative mode; 0 means "not initialised").
    """

    _owner = "SGGAdamW"

    def __init__(self, params: Iterable, lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 lambda_dir: float = 0.2, lambda_mag: float = 1.0, lambda_align: float = 1.0,
                 mag_mode: str = "relative", max_norm: float = 1.0, mag_ratio: float = 2.0,
                 mag_beta: float = 0.9, reference: str = "momentum", ref_beta: float = 0.9,
                 granularity: str = "group", nonfinite: str = "skip", backend: str = "auto",
                 process_group=None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, lambda_dir=lambda_dir, lambda_mag=lambda_mag,
                        lambda_align=lambda_align, mag_mode=mag_mode, max_norm=max_norm,
                        mag_ratio=mag_ratio, mag_beta=mag_beta, reference=reference,
                        ref_beta=ref_beta, granularity=granularity, nonfinite=nonfinite)
        validate_adamw(defaults)
        validate_guidance(defaults)
        self._init_guided(backend, process_group)
        super().__init__(params, defaults)

    # -- param_groups ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        full = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        validate_adamw(full)
        validate_guidance(full)
        if full["granularity"] == "global":
            for i, g in enumerate(self.param_groups):
                if g["granularity"] == "global":
                    diff = [k for k in SEGMENT_KEYS if g[k] != full[k]]
                    if diff:
                        raise ValueError(
                            f"SGGAdamW: the new param_group and param_groups[{i}] both use "
                            f"granularity='global' but differ in {diff}; one global segment has "
                            "one setting. Make them equal or use granularity='group'.")
        super().add_param_group(param_group)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- reference ---------------------------------------------------------------------------
    def set_reference(self, refs) -> None:
        """Set the fixed source-task direction ``r`` for ``reference="source"`` groups.

        ``refs``: a list with one tensor (or None: zero reference) per parameter, in
        param_groups order, or a dict ``{param: tensor}``. Copied into ``state[p]["ref"]``
        (the parameter's dtype and device). See :func:`sgg_fast.source_gradients`.
        """
        checked = check_reference_shapes(self._all_params(), refs, "SGGAdamW")
        for p, r in checked.items():
            st = self.state[p]
            if r is None:
                st["ref"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                st["ref"] = _distributed.like_param(r, p)

    # -- the step ----------------------------------------------------------------------------
    def _prepare(self) -> StepPlan:
        """Plan the step, check every input, then create missing state. Mutates nothing before
        every check has passed."""
        plan = build_plan(self.param_groups, "SGGAdamW", self._cache)
        for g in self.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("SGGAdamW does not implement amsgrad or maximize (found in a loaded "
                                 "param_group); set them to False")
        for i, p in enumerate(plan.params):
            mode = plan.ref_mode(i)
            st = self.state.get(p, {})
            if mode == REF_SOURCE:
                ref = st.get("ref")
                if ref is None:
                    raise RuntimeError(
                        f"SGGAdamW: {plan.labels[i]} is in a reference='source' group but no reference "
                        "was set; call opt.set_reference(...) before step() (see "
                        "sgg_fast.source_gradients), with None for a zero reference.")
            if mode != REF_MOMENTUM and "ref" in st and st["ref"].shape != p.shape:
                raise RuntimeError(
                    f"SGGAdamW: state['ref'] of {plan.labels[i]} has shape {tuple(st['ref'].shape)}, "
                    f"its parameter {tuple(p.shape)}; call set_reference again with matching shapes.")
        for i, p in enumerate(plan.params):
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            mode = plan.ref_mode(i)
            if mode == REF_EMA and "ref" not in st:
                st["ref"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            seg_group = plan.segments[plan.seg_of_param[i]].group
            if seg_group["mag_mode"] == "relative" and "norm_ema" not in st:
                st["norm_ema"] = torch.zeros((), dtype=torch.float32, device=p.device)
            plan.steps.append(st["step"])
            plan.exp_avgs.append(st["exp_avg"])
            plan.exp_avg_sqs.append(st["exp_avg_sq"])
            plan.refs.append(st["exp_avg"] if mode == REF_MOMENTUM else st["ref"])
            plan.norm_emas.append(st.get("norm_ema") if seg_group["mag_mode"] == "relative" else None)
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One SGG-AdamW step. ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        plan = self._prepare()
        if not plan.params:
            _distributed.idle_step(plan, self.process_group, self._owner)
            return loss
        self._run_guided(plan, "apply")
        return loss

    # -- state dict --------------------------------------------------------------------------
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in {**GUIDANCE_DEFAULTS, **{k: self.defaults[k] for k in GUIDANCE_DEFAULTS
                                                  if k in self.defaults}}.items():
                group.setdefault(k, v)
        if not hasattr(self, "backend"):
            self._init_guided("auto")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ``SGGAdamW`` or ``torch.optim.AdamW`` state dict (same state names).

        ``step`` and ``norm_ema`` are kept as float32 on the parameter's device; missing
        guidance settings in the loaded groups take this optimizer's defaults.
        """
        # torch casts every floating state tensor to the parameter's dtype; norm_ema is fp32
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        nus = {pid: st["norm_ema"] for pid, st in state_dict["state"].items()
               if isinstance(st, dict) and "norm_ema" in st}
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, self._all_params()):
            if pid in nus:
                self.state[p]["norm_ema"] = torch.as_tensor(nus[pid]).detach().to(
                    device=p.device, dtype=torch.float32, copy=True)
        for group in self.param_groups:
            validate_adamw(group)
            validate_guidance(group)
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st:
                    step = st["step"]
                    st["step"] = (step.detach().to(device=p.device, dtype=torch.float32, copy=True)
                                  if torch.is_tensor(step) else
                                  torch.tensor(float(step), dtype=torch.float32, device=p.device))
        self._last_out = None
        self._last_labels = []
