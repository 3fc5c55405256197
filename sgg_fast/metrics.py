"""Run-level gradient metrics from ``last_stats()``: stability and directional alignment.

The paper reports "gradient stability" (0.78 against 0.61-0.71) and "directional alignment"
(0.73 against 0.52-0.61) without defining them. **The definitions below are this project's**, chosen
to be computable from the per-step statistics that every backend already produces
(``opt.last_stats()``, DESIGN §1.6), without another pass over the gradients and without a host
sync during training. Their values are not comparable with the paper's numbers.

Per step ``t`` the per-segment rows of ``last_stats()`` are first combined into whole-model
quantities (segments partition the parameters, so this is exact):

* raw gradient norm    ``G_t = √(Σ_s grad_norm_s²)``
* guided update norm   ``U_t = √(Σ_s guided_norm_s²)``  (``‖u‖``, what the optimizer applies)
* reference norm       ``R_t = √(Σ_s ref_norm_s²)``
* cosine               ``c_t = Σ_s cos_s·grad_norm_s·ref_norm_s / (G_t·R_t)``  (``g·r/(‖g‖‖r‖)``)

Over the ``T`` steps of a run that were not skipped (``skipped`` is false):

* **stability** ``= 1 / (1 + CV(U))``, ``CV = std(U_t)/mean(U_t)`` (population std): 1 when every
  update has the same norm, → 0 as the norms fluctuate. Clipping raises it by construction.
* **raw stability** ``= 1 / (1 + CV(G))``: the same for the raw gradient (the loss landscape seen
  along the trajectory, not what the optimizer does with it).
* **alignment** ``= mean_t c_t`` over the steps with ``G_t > 0`` and ``R_t > 0``: the mean cosine
  between the raw gradient and the reference direction (``reference="source"``: the source-task
  gradient; ``"momentum"``: the running update direction, i.e. gradient consistency).
* also ``conflict_rate`` (share of those steps with ``g·r < 0``), ``clip_rate`` (share of steps in
  which some segment's magnitude control acted, ``mag_scale < 1``), mean norms.

Usage::

    tracker = GuidanceMetrics()
    tracker.attach(opt)        # or call tracker.update(opt) after each opt.step()
    ...train...
    tracker.report()           # the one host sync
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

#: slots of the on-device accumulator (float64)
_SLOTS = (
    "steps",
    "skipped",
    "sum_u",
    "sum_u2",
    "sum_g",
    "sum_g2",
    "n_align",
    "sum_cos",
    "sum_cos2",
    "n_conflict",
    "n_clipped",
)
(_N, _SKIP, _SU, _SU2, _SG, _SG2, _NA, _SC, _SC2, _NCONF, _NCLIP) = range(len(_SLOTS))


class GuidanceMetrics:
    """Accumulates ``last_stats()`` of an SGG optimizer on its device; reports per run.

    :meth:`update` costs a handful of tiny tensor ops on the statistics' device and never syncs
    with the host; :meth:`report` syncs once. Works with :class:`~sgg_fast.SGGAdamW` and
    :class:`~sgg_fast.GradientGuidance` (for a baseline optimizer, wrap it in
    ``GradientGuidance(opt, lambda_dir=0, lambda_mag=0, lambda_align=0)``: the update is then
    unchanged and the statistics are still produced).
    """

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None

    def reset(self) -> None:
        self._acc = None

    def update(self, source: Any) -> None:
        """Add one step: ``source`` is an optimizer with ``last_stats()`` or that dict itself.

        Does nothing before the optimizer's first step (empty statistics).
        """
        stats: Mapping[str, torch.Tensor] = source.last_stats() if hasattr(source, "last_stats") else source
        if not stats:
            return
        f64 = torch.float64
        gn = stats["grad_norm"].to(f64)
        rn = stats["ref_norm"].to(f64)
        un = stats["guided_norm"].to(f64)
        gr = (stats["cos"].to(f64) * gn * rn).sum()
        G = gn.square().sum().sqrt()
        R = rn.square().sum().sqrt()
        U = un.square().sum().sqrt()
        valid = ~stats["skipped"].any()
        has = valid & (G > 0) & (R > 0)
        den = torch.where(has, G * R, torch.ones_like(G))
        c = torch.where(has, gr / den, torch.zeros_like(G))
        clipped = (stats["mag_scale"] < 1).any()
        zero = torch.zeros_like(G)
        one = torch.ones_like(G)
        vec = torch.stack(
            [
                torch.where(valid, one, zero),
                torch.where(valid, zero, one),
                torch.where(valid, U, zero),
                torch.where(valid, U * U, zero),
                torch.where(valid, G, zero),
                torch.where(valid, G * G, zero),
                has.to(f64),
                c,
                c * c,
                (has & (gr < 0)).to(f64),
                (valid & clipped).to(f64),
            ]
        )
        if self._acc is None or self._acc.device != vec.device:
            self._acc = torch.zeros(len(_SLOTS), dtype=f64, device=vec.device)
        self._acc += vec

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`update` after every ``optimizer.step()`` (a step post-hook); returns the
        hook's handle (``.remove()`` detaches)."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update(opt))

    def totals(self) -> dict[str, float]:
        """The raw accumulator (syncs)."""
        if self._acc is None:
            return {k: 0.0 for k in _SLOTS}
        return dict(zip(_SLOTS, self._acc.tolist()))

    def report(self) -> dict[str, float]:
        """Per-run metrics (module docstring; this project's definitions). Syncs once.

        Keys: ``steps``, ``skipped_steps``, ``stability``, ``raw_stability``, ``alignment``,
        ``alignment_std``, ``align_steps``, ``conflict_rate``, ``clip_rate``,
        ``mean_grad_norm``, ``mean_guided_norm``. A metric without the steps it needs is NaN.
        """
        t = self.totals()
        n, na = t["steps"], t["n_align"]
        nan = float("nan")

        def inv_1p_cv(s, s2):
            if n == 0:
                return nan
            mean = s / n
            if mean <= 0:
                return nan
            std = math.sqrt(max(s2 / n - mean * mean, 0.0))
            return 1.0 / (1.0 + std / mean)

        align = t["sum_cos"] / na if na else nan
        return {
            "steps": n,
            "skipped_steps": t["skipped"],
            "stability": inv_1p_cv(t["sum_u"], t["sum_u2"]),
            "raw_stability": inv_1p_cv(t["sum_g"], t["sum_g2"]),
            "alignment": align,
            "alignment_std": math.sqrt(max(t["sum_cos2"] / na - align * align, 0.0)) if na else nan,
            "align_steps": na,
            "conflict_rate": t["n_conflict"] / na if na else nan,
            "clip_rate": t["n_clipped"] / n if n else nan,
            "mean_grad_norm": t["sum_g"] / n if n else nan,
            "mean_guided_norm": t["sum_u"] / n if n else nan,
        }


__all__ = ["GuidanceMetrics"]
