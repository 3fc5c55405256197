"""The step engine: plan → (cross-rank sync) → statistics → finalize → apply, for every backend.

``SGGAdamW.step`` and ``GradientGuidance.step`` are a few lines each: they check their state,
attach it to a :class:`~sgg_fast.plan.StepPlan` and call :meth:`StepEngine.run`. The engine owns
the rest of the way through a step, the same for every backend:

1. ``backend = resolve(plan)``: the named backend, or the best one for the tensors (``auto``);
2. ``partials = backend.stats(plan)`` — per-chunk ``(gg, rr, gr, pp)`` — summed across ranks by
   :mod:`sgg_fast.distributed` when parameters are sharded;
3. ``out = backend.finalize(plan, partials)`` — α, β, the global skip flag and the statistics
   row per segment; each segment's running norm ν is read from and written back to
   ``plan.seg_nus`` by the backend itself (DESIGN §1 C, §1.5);
4. ``backend.apply(plan, out)`` (SGGAdamW) or ``backend.guide(plan, out)`` (GradientGuidance).

It also keeps what a caller reads between steps: the last statistics (``last_stats``) and a
device-side count of skipped steps that costs no host sync.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import backends as _backends
from . import distributed as _distributed
from . import guidance as G
from .backends.base import Backend
from .plan import Partials, StepCache, StepPlan
from .vocabulary import is_dtensor

#: pending skip flags folded into the device counter once this many have accumulated
_SKIP_FOLD = 64


class StepEngine:
    """Drives the stages of a guided step for one optimizer (or guidance wrapper)."""

    def __init__(self, owner: str, backend: str = "auto", process_group=None, fused: bool = False):
        if not isinstance(backend, str):
            raise ValueError(f"Invalid backend: {backend!r} (a backend name, e.g. 'auto')")
        if backend != "auto":
            _backends.get_backend(backend)  # ValueError for an unknown name
        self.owner = owner
        self.backend = backend
        self.fused = fused
        self._scratch: dict = {}
        self.process_group = _distributed.check_process_group(process_group, owner)
        self.cache = StepCache()
        self.last_out: torch.Tensor | None = None
        self.last_labels: list[str] = []
        self._resolved_key: tuple | None = None
        self._resolved: Backend | None = None
        self._skip_total: torch.Tensor | None = None
        self._skip_pending: list[torch.Tensor] = []
        self._host_skips = 0
        self._warned_skip = False
        #: whether the last step was skipped, when the host knows it without a sync (CPU
        #: tensors, or a backend that synced for it); None otherwise
        self.last_host_skip: bool | None = None
        #: whether the last step ran without cross-rank statistics or DTensor shards (its plan
        #: is the caller's own and can be reused, plan.PlanReuse)
        self.last_local = False

    # -- backend choice ----------------------------------------------------------------------
    def resolve(self, plan: StepPlan) -> Backend:
        """The backend for this step. A reused plan (its fingerprint unchanged, plan.PlanReuse)
        runs on the backend it was checked against. A new plan is decided afresh: ``auto``
        picks the best backend that can serve it, so a step that needs a fallback does not pin
        the fallback for later steps; a named backend is checked against it (an error with the
        reasons when it cannot serve it)."""
        key = (self.backend, os.environ.get(_backends.ENV_VAR), tuple(plan.devices), tuple(plan.dtypes))
        if plan.reused and plan.checked_backend is not None and key == self._resolved_key:
            self._resolved = plan.checked_backend
            return self._resolved
        if key != self._resolved_key or self._resolved is None or self._auto():
            self._resolved = _backends.resolve(self.backend, plan, fused_only=self.fused)
            self._resolved_key = key
        else:
            reasons = self._resolved.input_reasons(plan)
            if reasons:
                _backends.resolve(self._resolved.name, plan)  # raises with the reasons
        plan.checked_backend = self._resolved
        return self._resolved

    def _auto(self) -> bool:
        return self.backend == "auto" and (os.environ.get(_backends.ENV_VAR) or "auto") == "auto"

    def scratch_nu(self, s: int, device: torch.device) -> torch.Tensor:
        """A ``[2]`` ν slot for a segment that keeps no running norm (finalize leaves it alone)."""
        key = (s, device)
        t = self._scratch.get(key)
        if t is None:
            t = self._scratch[key] = torch.zeros(2, dtype=torch.float32, device=device)
        return t

    # -- one step ----------------------------------------------------------------------------
    def run(self, plan: StepPlan, stage: str, partials: Partials | None = None) -> torch.Tensor:
        """Statistics → (all-reduce) → finalize → ``stage`` (``"apply"`` or ``"guide"``).

        Returns the finalize output ``[S, len(guidance.OUT_COLS)]``. DTensors in the plan are
        replaced by their local shards first. ``partials``: statistics computed earlier (e.g.
        during backward, as each gradient became final); then the statistics pass is skipped.
        """
        if not plan.reused:
            # a plan with DTensors is rewritten to local shards below: it cannot be reused
            self.last_local = self.process_group is None and not any(map(is_dtensor, plan.params))
        # a local step (one process, DDP) never enters the distributed layer
        sync = None if plan.reused or self.last_local else _distributed.prepare(plan, self.process_group, self.owner)
        backend = self.resolve(plan)
        if partials is None:
            partials = backend.stats(plan) if sync is None else sync.stats(plan, backend)
        out = backend.finalize(plan, partials)
        self._check_finite(plan, out)
        if stage == "apply":
            backend.apply(plan, out)
        else:
            backend.guide(plan, out)
        self.last_out, self.last_labels = out, [s.label for s in plan.segments]
        self._count_skip(out, backend)
        return out

    def idle(self, plan: StepPlan) -> None:
        """A step with no gradient here: take part in the other ranks' collectives."""
        _distributed.idle_step(plan, self.process_group, self.owner)

    def _check_finite(self, plan: StepPlan, out: torch.Tensor) -> None:
        """``nonfinite="raise"``: FloatingPointError naming the first bad segment (syncs)."""
        if not plan.needs("nonfinite", "raise"):
            return
        bad = out[:, G.O_BAD].tolist()
        for seg, b in zip(plan.segments, bad):
            if b:
                raise FloatingPointError(
                    f"{self.owner}: non-finite gradient statistics in {seg.label} "
                    f"(tensors {plan.label(seg.start)} … {plan.label(seg.stop - 1)}); the step was "
                    "not applied. Find where the inf/NaN comes from (lower the lr, use a GradScaler "
                    "for fp16), or pass nonfinite='skip' to skip such steps."
                )

    # -- skipped steps -----------------------------------------------------------------------
    def _count_skip(self, out: torch.Tensor, backend) -> None:
        flag = out[0:1, G.O_SKIP]
        if out.device.type == "cpu" or not backend.device_skip:
            # the flag is on the host already (CPU tensors, or a backend that synced for it)
            self.last_host_skip = bool(flag.item())
            if self.last_host_skip:
                self._host_skips += 1
                self._warn_skip()
            return
        self.last_host_skip = None
        self._skip_pending.append(flag)
        if len(self._skip_pending) >= _SKIP_FOLD:
            self._fold()

    def _fold(self) -> None:
        if not self._skip_pending:
            return
        total = torch.cat(self._skip_pending).sum().to(torch.int64)
        self._skip_total = total if self._skip_total is None else self._skip_total.add_(total)
        self._skip_pending = []

    def _warn_skip(self) -> None:
        if self._warned_skip:
            return
        self._warned_skip = True
        warnings.warn(
            f"{self.owner}: a step was skipped because the gradient statistics are not finite "
            "(inf/NaN gradients); parameters and state were left unchanged. Skips are counted in "
            "opt.skipped_steps(); this warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )

    def skipped_steps(self) -> torch.Tensor:
        """Number of skipped steps so far, as an int64 tensor (on the device of the steps when
        they ran on CUDA; reading it there is the only sync)."""
        self._fold()
        dev = self._skip_total.device if self._skip_total is not None else torch.device("cpu")
        host = torch.tensor(self._host_skips, dtype=torch.int64)
        if self._skip_total is None:
            return host
        return self._skip_total + host.to(dev)

    def reset_last(self) -> None:
        self.last_out, self.last_labels = None, []

    def stats_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.last_out is None else G.stats_dict(self.last_out)
