"""``SGGAdamW`` with Hugging Face accelerate.

``accelerator.prepare(model, opt, loader)`` wraps the optimizer in an ``AcceleratedOptimizer``
whose ``step()`` is a no-op on the micro-batches of ``accelerator.accumulate`` that do not sync
gradients, so SGG runs once per optimizer step on the accumulated gradient (as AdamW does).
``accelerator.save_state`` / ``load_state`` save SGGAdamW's ``state_dict`` (moments, SGG's
running statistics, the skip counter) like any optimizer's.

**Clipping.** Do not call ``accelerator.clip_grad_norm_`` before the step when SGG's magnitude
control is on (``lambda_mag > 0``, the default): it would clip twice and SGG would see clipped
gradients. ``clip_grad_norm_`` here is a drop-in for it that warns once in that case (and
clips, as asked); SGG's own hard clip is ``lambda_mag=1, mag_mode="absolute", max_norm=...,
granularity="global"``.

**Logging.** ``log_sgg(accelerator, opt, step)`` logs ``sgg_skipped_steps`` through
``accelerator.log`` (one host sync: call it at logging steps) and warns when it grew.
"""

from __future__ import annotations

import weakref
from typing import Any

from ._common import SkipTracker, magnitude_control, unwrap_optimizer, warn_double_clipping

_trackers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_warned: weakref.WeakSet = weakref.WeakSet()


def unwrap(optimizer: Any):
    """The ``SGGAdamW`` inside accelerate's ``AcceleratedOptimizer`` (or the argument itself)."""
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"no SGGAdamW inside {type(optimizer).__name__}")
    return opt


def sgg_logs(optimizer: Any) -> dict[str, int]:
    """``{"sgg_skipped_steps": n}`` for ``optimizer`` (one host sync); warns when ``n`` grew."""
    opt = unwrap(optimizer)
    tracker = _trackers.setdefault(opt, SkipTracker("accelerate"))
    return {"sgg_skipped_steps": tracker.read(opt)}


def log_sgg(accelerator: Any, optimizer: Any, step: int | None = None) -> dict[str, int]:
    """``accelerator.log(sgg_logs(optimizer), step=step)``; returns what it logged."""
    logs = sgg_logs(optimizer)
    accelerator.log(logs, step=step)
    return logs


def clip_grad_norm_(accelerator: Any, parameters, max_norm: float, optimizer: Any, norm_type: float = 2.0):
    """``accelerator.clip_grad_norm_(parameters, max_norm, norm_type)``, warning once per
    optimizer when ``optimizer`` is an SGGAdamW with magnitude control (double clipping)."""
    opt = unwrap(optimizer)
    if opt not in _warned and magnitude_control(opt) > 0:
        _warned.add(opt)
        warn_double_clipping(
            "accelerator.clip_grad_norm_", max_norm, opt, "Drop the clip_grad_norm_ call.", stacklevel=3
        )
    return accelerator.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


__all__ = ["clip_grad_norm_", "log_sgg", "sgg_logs", "unwrap"]
