"""The SGG step inside backward: :func:`overlap_backward`.

Two modes, chosen by ``mode=`` (``"auto"`` picks ``"step"`` when every group of the optimizer has
``granularity="tensor"``, else ``"stats"``):

``"stats"`` (any granularity)
    A post-accumulate-grad hook on every parameter computes that tensor's per-chunk statistics
    ``(gg, rr, gr, pp)`` as soon as its gradient is final, while backward is still running (on
    the current stream on CUDA; no host sync). ``opt.step()`` is then finalize + apply only: the
    engine runs with the precomputed partials (:meth:`StepEngine.run`'s ``partials=``). The step
    equals the ordinary one (bitwise on the ``cpu`` and ``torch`` backends: the same rows are
    summed in the same order), ``nonfinite="skip"`` skips the whole step as usual (a non-finite
    tensor late in backward is seen by finalize, which runs in ``step()``), and the gradients are
    held until ``step()`` as usual. Statistics are re-taken in ``step()`` for any tensor whose
    gradient, reference or parameter changed after its hook ran (in-place clipping, unscaling,
    ``load_state_dict``, ``set_reference``): the result stays exact, only the overlap is lost.

``"step"`` (``granularity="tensor"`` only)
    The hook runs the whole step of its tensor (statistics → finalize → apply, the engine on a
    one-tensor plan) and frees the gradient (``p.grad = None``), so the gradients of the whole
    model never exist at once (PyTorch's "optimizer step in backward" pattern). ``opt.step()``
    only steps tensors whose gradient is still there (hooks that did not fire) and clears the
    bookkeeping. Hyper-parameters are read from ``param_groups`` when the hook runs, so an LR
    scheduler stepped after ``opt.step()`` acts on the next backward, as in the ordinary loop.
    Bitwise equal to the ordinary step on the ``cpu`` backend. What ``nonfinite`` can promise
    here is per tensor: ``"skip"`` leaves a tensor with non-finite statistics (and its state)
    unchanged while the tensors updated before it in this backward stay updated (the ordinary
    step would skip them all), and ``skipped_steps()`` counts skipped tensor updates;
    ``"raise"`` raises ``FloatingPointError`` out of ``backward()``.

Rules common to both:

* **Gradient accumulation**: run every micro-batch's backward but the last inside
  ``with handle.accumulate():`` (alias ``no_sync()``); hooks do nothing there and gradients add
  up in ``.grad`` as usual. A hook that fires on a gradient already used since the last
  ``opt.step()`` (a second backward without ``accumulate()``) raises ``RuntimeError``.
* ``opt.zero_grad()`` works as usual; ``load_state_dict``/``state_dict`` and resuming work as
  usual (state lives in the optimizer as before).
* Refused with an error: DDP (its reducer averages gradients after these hooks run, so they would
  see the local gradient), any multi-process run (``torch.distributed`` with world size > 1),
  FSDP2 / DTensor parameters, ``process_group=``, and ``torch.amp.GradScaler`` (``scaler.step``
  raises: the hooks would use scaled gradients; in mode ``"step"`` the first backward has then
  already applied one scaled update, so stop there and restart from a checkpoint).
* Hooks are registered for the parameters that are in the optimizer when the handle is made;
  parameters added later are stepped by ``opt.step()`` the ordinary way.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from . import backends as _backends
from . import distributed as _distributed
from .plan import REF_MOMENTUM, Partials, Segment, StepCache, StepPlan, TensorPlanReuse, check_grad, describe
from .validation import REFERENCES

__all__ = ["overlap_backward", "OverlapHandle", "MODES"]

MODES = ("auto", "stats", "step")

#: backends whose stages after statistics take precomputed partials (``StepEngine.run``'s
#: ``partials=``) and need nothing else from their statistics stage. The triton backend's
#: statistics kernel also snapshots the step counters that its apply reads, so for it mode
#: "stats" takes the statistics in ``step()`` (exact, not overlapped; a warning says so once).
PRECOMPUTED_STATS_BACKENDS = frozenset({"cpu", "cuda", "torch"})


def _key(t: torch.Tensor | None):
    """What identifies the contents of ``t``: the object and its in-place version counter."""
    return None if t is None else (weakref.ref(t), t._version)


def _same(key, t: torch.Tensor | None) -> bool:
    if key is None or t is None:
        return key is None and t is None
    return key[0]() is t and key[1] == t._version


class _Stats:
    """Statistics rows of one tensor taken during backward, and what they were computed from."""

    __slots__ = ("backend", "values", "grad", "ref", "fresh_ref", "param", "settings")

    def __init__(self, backend, values, grad, ref, fresh_ref, param, settings):
        self.backend, self.values, self.grad, self.ref = backend, values, grad, ref
        self.fresh_ref, self.param, self.settings = fresh_ref, param, settings


class OverlapHandle:
    """The hooks of :func:`overlap_backward`. ``remove()`` restores the ordinary optimizer."""

    def __init__(self, model_or_params, optimizer, mode: str = "auto"):
        from .optimizer import SGGAdamW

        if not isinstance(optimizer, SGGAdamW):
            raise TypeError(
                f"overlap_backward needs an sgg_fast.SGGAdamW, got {type(optimizer).__name__}. For "
                "torch optimizers use PyTorch's optimizer-in-backward pattern (one optimizer per "
                "parameter stepped in register_post_accumulate_grad_hook)."
            )
        if mode not in MODES:
            raise ValueError(f"overlap_backward: mode must be one of {MODES}, got {mode!r}")
        if getattr(optimizer, "overlap_handle", None) is not None:
            raise RuntimeError(
                "overlap_backward: this optimizer already has hooks; call "
                ".remove() on the first handle before making another"
            )
        if optimizer.process_group is not None:
            raise ValueError(
                "overlap_backward does not support SGGAdamW(process_group=...): the statistics of "
                "sliced tensors are summed across ranks in step(); use the ordinary step."
            )
        self._refuse_distributed(model_or_params)
        groups = [g for g in optimizer.param_groups if g["params"]]
        if mode == "auto":
            mode = "step" if groups and all(g["granularity"] == "tensor" for g in groups) else "stats"
        if mode == "step":
            bad = [i for i, g in enumerate(optimizer.param_groups) if g["params"] and g["granularity"] != "tensor"]
            if bad:
                raise ValueError(
                    f"overlap_backward(mode='step') runs each tensor's whole step in its hook, which "
                    f"needs granularity='tensor' in every group; param_groups{bad} use "
                    f"{sorted({optimizer.param_groups[i]['granularity'] for i in bad})}. Use "
                    "mode='stats' (statistics in backward, finalize + apply in step())."
                )
        self.mode = mode
        self._opt = optimizer
        owned = {p: None for g in optimizer.param_groups for p in g["params"]}
        if isinstance(model_or_params, torch.nn.Module):
            candidates: list[torch.Tensor] = list(model_or_params.parameters())
        elif isinstance(model_or_params, torch.Tensor):
            candidates = [model_or_params]
        else:
            candidates = list(model_or_params)
        params, seen = [], set()
        for p in candidates:
            if isinstance(p, dict):
                raise TypeError(
                    "overlap_backward: pass a model or its parameters, not param_group "
                    "dicts (the groups are the optimizer's)"
                )
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p not in owned:
                if not isinstance(model_or_params, torch.nn.Module):
                    raise ValueError(
                        f"overlap_backward: a parameter ({describe(p)}) is not in the optimizer's param_groups"
                    )
                continue  # a model parameter that this optimizer does not train
            if _distributed.is_dtensor(p):
                raise RuntimeError(
                    "overlap_backward does not support FSDP2 / DTensor parameters: their "
                    "statistics are summed across the mesh in step() and FSDP2 reduce-scatters "
                    "gradients after these hooks would run. Use the ordinary opt.step()."
                )
            params.append(p)
        if not params:
            raise ValueError(
                "overlap_backward: none of the given parameters is trained by this optimizer (with requires_grad=True)"
            )
        self._accumulating = 0
        self._stats: dict[torch.Tensor, _Stats] = {}  # mode "stats"
        self._used: dict[torch.Tensor, Any] = {}  # mode "step": params stepped this step
        self._outs: list[tuple] = []  # mode "step": (position, finalize rows, label) of each hook
        self._caches: dict[torch.Tensor, StepCache] = {}
        #: each parameter's last checked one-tensor plan (plan.TensorPlanReuse)
        self._reuse: dict[torch.Tensor, TensorPlanReuse] = {}
        self._backend_cache: dict = {}
        self._warned_backend = False
        self._index: dict[torch.Tensor, tuple[int, int]] = {}
        # autograd runs the hooks of each device on that device's thread: one hook at a time
        self._lock = threading.Lock()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self._handles.append(optimizer.register_load_state_dict_post_hook(lambda opt: self._forget()))
        self._amp_attr = optimizer.__dict__.get("_step_supports_amp_scaling", _MISSING)
        # GradScaler.step(opt) then hands the scale over as opt.grad_scale, which step() refuses
        optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
        optimizer.overlap_handle = self  # type: ignore[assignment]

    # -- public API --------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self):
        """Backward passes inside only accumulate gradients (hooks do nothing); the first backward
        after the block (the last micro-batch) triggers the overlapped work."""
        self._accumulating += 1
        try:
            yield self
        finally:
            self._accumulating -= 1

    no_sync = accumulate

    def _forget(self) -> None:
        """After ``load_state_dict``: drop the statistics taken and the kept plans (they refer to
        the old state)."""
        self._stats.clear()
        self._reuse.clear()

    def remove(self) -> None:
        """Remove the hooks: the optimizer steps the ordinary way again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        opt = self._opt
        if opt.__dict__.get("overlap_handle") is self:
            del opt.overlap_handle
            if self._amp_attr is _MISSING:
                opt.__dict__.pop("_step_supports_amp_scaling", None)
            else:
                opt._step_supports_amp_scaling = self._amp_attr  # type: ignore[attr-defined]
        self._stats.clear()
        self._used.clear()
        self._outs.clear()
        self._reuse.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def _refuse_distributed(model) -> None:
        ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
        if ddp is not None and isinstance(model, ddp):
            raise RuntimeError(
                "overlap_backward does not support DistributedDataParallel: DDP averages the "
                "gradients across ranks after they are accumulated, so these hooks would see each "
                "rank's local gradient. Use the ordinary opt.step() with DDP."
            )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "overlap_backward does not support multi-process training (torch.distributed is "
                f"initialised with world size {dist.get_world_size()}): DDP / FSDP reduce the "
                "gradients after the post-accumulate-grad hooks run. Use the ordinary opt.step()."
            )

    # -- hooks -------------------------------------------------------------------------------
    def _where(self, p: torch.Tensor) -> tuple[int, int]:
        hit = self._index.get(p)
        groups = self._opt.param_groups
        if hit is not None and hit[0] < len(groups):
            ps = groups[hit[0]]["params"]
            if hit[1] < len(ps) and ps[hit[1]] is p:
                return hit
        self._index = {q: (gi, pi) for gi, g in enumerate(groups) for pi, q in enumerate(g["params"])}
        if p not in self._index:
            raise RuntimeError(
                "overlap_backward: a hooked parameter is no longer in the optimizer's "
                "param_groups; call handle.remove()"
            )
        return self._index[p]

    def _cache(self, p: torch.Tensor) -> StepCache:
        c = self._caches.get(p)
        if c is None:
            c = self._caches[p] = StepCache()
        return c

    def _reused(self, p: torch.Tensor, g: torch.Tensor) -> StepPlan | None:
        """``p``'s plan of the last step, if nothing it was built and checked from changed."""
        r = self._reuse.get(p)
        if r is None:
            return None
        plan = r.reuse(p, g, self._opt.param_groups, self._opt.state)
        if plan is None:
            del self._reuse[p]
        return plan

    def _remember(self, p: torch.Tensor, plan: StepPlan) -> None:
        if self._opt.reuse_plans:
            self._reuse[p] = TensorPlanReuse(plan, self._opt.param_groups, self._opt.state)

    def _one_plan(self, p: torch.Tensor, g: torch.Tensor) -> StepPlan:
        """The plan of tensor ``p`` alone (one segment), checked like ``build_plan`` checks."""
        gi, pi = self._where(p)
        group = self._opt.param_groups[gi]
        check_grad(self._opt.owner, gi, pi, p, g)
        plan = StepPlan(groups=self._opt.param_groups, cache=self._cache(p))
        plan.segments.append(
            Segment(
                0,
                f"param_groups[{gi}]['params'][{pi}]" if group["granularity"] == "tensor" else f"param_groups[{gi}]",
                group,
                p.device,
                0,
                1,
            )
        )
        plan.params.append(p)
        plan.grads.append(g)
        plan.group_index.append(gi)
        plan.param_index.append(pi)
        plan.seg_of_param.append(0)
        return plan

    def _check_used(self, p: torch.Tensor, g: torch.Tensor) -> None:
        used = self._used.get(p) if self.mode == "step" else self._stats.get(p)
        if used is None:
            return
        if self.mode == "step" or used.grad[0]() is g:
            gi, pi = self._where(p)
            raise RuntimeError(
                f"overlap_backward: a second backward reached param_groups[{gi}]['params'][{pi}] "
                "after its gradient was already used for this step (mode "
                f"{self.mode!r}), without opt.step() in between. For gradient accumulation run "
                "every micro-batch's backward except the last inside `with handle.accumulate():`. "
                "(If you zeroed the gradients in place to discard them, use opt.zero_grad().)"
            )

    def _hook(self, p: torch.Tensor) -> None:
        if self._accumulating:
            return
        g = p.grad
        if g is None:
            return
        with self._lock, torch.no_grad():
            self._check_used(p, g)
            if self.mode == "step":
                self._step_one(p, g)
            else:
                self._stats_one(p, g)

    def _backend(self, plan: StepPlan):
        engine = self._opt.engine
        key = (engine.backend, os.environ.get(_backends.ENV_VAR), plan.params[0].device, plan.params[0].dtype)
        b = self._backend_cache.get(key)
        if b is None:
            b = self._backend_cache[key] = _backends.resolve(engine.backend, plan, fused_only=engine.fused)
        return b

    def _stats_one(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """Mode "stats": this tensor's statistics rows, as the full step would compute them."""
        plan = kept = self._reused(p, g)
        try:
            if plan is not None and self._backend(plan) is not plan.checked_backend:
                del self._reuse[p]  # the backend changed (SGG_FAST_BACKEND): check again
                plan = None
            if plan is None:
                plan = self._new_stats_plan(p, g)
                if plan is None:
                    return  # step() takes these statistics itself
                self._remember(p, plan)
            self._take_stats(p, g, plan)
        finally:
            for q in (plan, kept):
                if q is not None:
                    q.grads = []  # a kept plan must not keep this gradient alive

    def _new_stats_plan(self, p: torch.Tensor, g: torch.Tensor) -> StepPlan | None:
        """A checked one-tensor statistics plan (its reference attached), or None when the
        statistics cannot be taken here (step() then takes them, or raises its error)."""
        plan = self._one_plan(p, g)
        group = plan.segments[0].group
        mode = REFERENCES.index(group["reference"])
        st = self._opt.state.get(p) or {}
        name = "exp_avg" if mode == REF_MOMENTUM else "ref"
        ref = st.get(name)
        if ref is None and group["reference"] == "source":
            return None  # step() raises its "no reference was set" error
        if ref is not None and (ref.shape != p.shape or ref.dtype != p.dtype or ref.device != p.device):
            return None  # step() raises its state-mismatch error
        plan.refs.append(ref)  # None: no state yet, the step starts from a zero reference
        backend = self._backend(plan)
        if backend.name not in PRECOMPUTED_STATS_BACKENDS:
            if not self._warned_backend:
                self._warned_backend = True
                warnings.warn(
                    f"overlap_backward(mode='stats'): backend {backend.name!r} cannot use statistics "
                    "taken during backward (its statistics stage also prepares its apply stage); "
                    "step() takes them itself, so the step is exact but not overlapped. Use "
                    f"backend='cpu', 'cuda' or 'torch' for the overlap.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        if backend.same_layout:  # its input_reasons for a statistics-only plan, inline
            st_ = p.stride()
            if (g.numel() > 1 and g.stride() != st_) or (ref is not None and ref.numel() > 1 and ref.stride() != st_):
                return None  # step() takes these statistics itself (and says why if it cannot)
        plan.checked_backend = backend
        return plan

    def _take_stats(self, p: torch.Tensor, g: torch.Tensor, plan: StepPlan) -> None:
        """The rows of a checked plan, on the backend it was checked for (plan.checked_backend)."""
        group = plan.segments[0].group
        ref = plan.refs[0]
        backend = plan.checked_backend
        values = backend.stats(plan).values
        want_pp = group["mag_mode"] == "param"
        self._stats[p] = _Stats(
            backend.name,
            values,
            _key(g),
            _key(ref),
            ref is None,
            _key(p) if want_pp else None,
            (group["reference"], want_pp),
        )

    def _step_one(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """Mode "step": the whole SGG step of this tensor, then its gradient is freed."""
        opt = self._opt
        if not self._used:  # the first hook of this step: settings cannot change during backward
            opt.check_settings()
        plan = self._reused(p, g)
        try:
            if plan is None:
                plan = self._one_plan(p, g)
            out, keep = opt.step_plan(plan)
            if keep:
                self._remember(p, plan)
        finally:
            if plan is not None:
                plan.grads = []  # a kept plan must not keep this gradient alive
        self._outs.append(((plan.group_index[0], plan.param_index[0]), out, plan.segments[0].label))
        self._used[p] = True
        p.grad = None

    # -- called by SGGAdamW.step -------------------------------------------------------------
    def before_step(self) -> None:
        opt = self._opt
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            raise RuntimeError(
                "overlap_backward does not support torch.amp.GradScaler: the hooks use the "
                "gradients as backward leaves them (scaled). Remove the GradScaler (bf16 autocast "
                "needs none) or call handle.remove() and step the ordinary way. In mode 'step' the "
                "hooks of this backward have already applied one scaled update: restart from a "
                "checkpoint."
            )

    def partials(self, plan: StepPlan, backend) -> Partials | None:
        """Mode "stats": the step's statistics from the rows taken in backward (tensors whose rows
        are missing or stale are computed now); None when no row can be used."""
        if self.mode != "stats" or not self._stats or backend.name not in PRECOMPUTED_STATS_BACKENDS:
            return None
        state = self._opt.state
        rows: list[torch.Tensor | None] = []
        for i, p in enumerate(plan.params):
            e = self._stats.get(p)
            ok = False
            if e is not None and e.backend == backend.name and _same(e.grad, plan.grads[i]):
                group = plan.segments[plan.seg_of_param[i]].group
                want_pp = group["mag_mode"] == "param"
                ref = plan.refs[i]
                if e.fresh_ref:
                    name = "exp_avg" if plan.ref_mode(i) == REF_MOMENTUM else "ref"
                    ref_ok = name not in (state.get(p) or {})  # the step made a zero reference
                else:
                    ref_ok = _same(e.ref, ref)
                ok = ref_ok and e.settings == (group["reference"], want_pp) and (not want_pp or _same(e.param, p))
            rows.append(e.values if ok and e is not None else None)
        if all(r is None for r in rows):
            return None
        home = plan.home
        done: list[torch.Tensor] = []
        for i, r in enumerate(rows):
            if r is None:
                sub, _ = _distributed._subplan(plan, [i], self._cache(plan.params[i]))
                r = backend.stats(sub).values
            done.append(r)
        rows_ = done
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows_) else torch.float32
        counts = [len(r) for r in rows_]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        offsets = [starts[s.start] for s in plan.segments] + [starts[-1]]
        values = torch.cat([r.to(device=home, dtype=dtype) for r in rows_])
        return Partials(values, offsets)

    def after_step(self, plan: StepPlan | None) -> None:
        """Clear the bookkeeping of this step. Mode "step": ``last_stats()`` has the rows of the
        hooks and of the tensors stepped by ``step()`` itself (``plan``), in param_groups order."""
        self._stats.clear()
        self._used.clear()
        if self.mode == "step" and self._outs:
            engine = self._opt.engine
            rows = list(self._outs)
            out = engine.last_out
            if plan is not None and plan.params and out is not None:
                for s, seg in enumerate(plan.segments):
                    i = seg.start
                    rows.append(((plan.group_index[i], plan.param_index[i]), out[s : s + 1], seg.label))
            rows.sort(key=lambda r: r[0])
            home = rows[0][1].device
            engine.last_out = torch.cat([r[1].to(home) for r in rows])
            engine.last_labels = [r[2] for r in rows]
        self._outs.clear()

    def zero_grad(self) -> None:
        """``opt.zero_grad()``: the gradients of this step are discarded, so is what the hooks
        kept of them; the next backward starts a new step (also after a hook raised, e.g.
        ``nonfinite="raise"``). Tensors a mode-"step" hook already stepped stay stepped."""
        self._stats.clear()
        self._used.clear()
        self._outs.clear()


_MISSING = object()


def overlap_backward(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor], optimizer, mode: str = "auto"
) -> OverlapHandle:
    """Run (part of) ``optimizer``'s SGG step inside backward; see :mod:`sgg_fast.overlap`.

    ``model_or_params``: the model (its parameters that ``optimizer`` trains get hooks) or the
    parameters. ``mode``: ``"stats"`` (statistics in backward, finalize + apply in
    ``opt.step()``), ``"step"`` (the whole step in backward, ``granularity="tensor"``, gradients
    freed as they are used) or ``"auto"`` (``"step"`` when every group is per-tensor).

    The training loop stays ``loss.backward(); opt.step(); opt.zero_grad()``; with gradient
    accumulation, every micro-batch's backward but the last goes inside
    ``with handle.accumulate():``. ``handle.remove()`` (or leaving ``with overlap_backward(...)``)
    restores the ordinary optimizer.
    """
    return OverlapHandle(model_or_params, optimizer, mode)
