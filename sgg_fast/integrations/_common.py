"""Framework-independent pieces of the integrations: finding the ``SGGAdamW`` behind a
framework's optimizer wrapper, reading its skip counter, and the double-clipping warning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..optimizer import SGGAdamW


def unwrap_optimizer(optimizer: Any) -> SGGAdamW | None:
    """The ``SGGAdamW`` inside ``optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer`` and Trainer's wrappers keep it in ``.optimizer`` or ``._optimizer``),
    or None when there is none."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, SGGAdamW):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def magnitude_control(opt: SGGAdamW) -> float:
    """The largest ``lambda_mag`` over ``opt``'s groups (0: SGG bounds no gradient norm)."""
    return max((float(g.get("lambda_mag", 0.0)) for g in opt.param_groups), default=0.0)


def clipping_message(who: str, max_norm: float, lambda_mag: float, fix: str) -> str:
    return (
        f"sgg_fast: {who} clips the gradient norm to {max_norm} before SGGAdamW's step, whose "
        f"magnitude control (lambda_mag={lambda_mag}) bounds the same norm: the gradient is clipped "
        "twice and SGG's statistics (last_stats(), its running norm) see the clipped gradient. "
        f"{fix} For the hard clip inside SGG use lambda_mag=1, mag_mode='absolute', "
        f"max_norm={max_norm}, granularity='global'; to keep {who}'s clipping alone use lambda_mag=0."
    )


def warn_double_clipping(who: str, max_norm: float | None, opt: SGGAdamW | None, fix: str, stacklevel: int = 3) -> bool:
    """Warn when ``who`` clips (``max_norm > 0``) before an ``SGGAdamW`` with magnitude control;
    returns whether it warned."""
    lam = magnitude_control(opt) if opt is not None else 0.0
    if not (max_norm and float(max_norm) > 0 and lam > 0):
        return False
    warnings.warn(clipping_message(who, float(max_norm), lam, fix), UserWarning, stacklevel=stacklevel)
    return True


class SkipTracker:
    """Reads ``opt.skipped_steps()`` when asked (one host sync per read: call at logging steps)
    and warns when the count grew since the last read."""

    def __init__(self, who: str):
        self.who = who
        self.last = 0

    def read(self, opt: SGGAdamW) -> int:
        n = int(opt.skipped_steps())
        if n > self.last:
            warnings.warn(
                f"sgg_fast: SGGAdamW skipped {n - self.last} step(s) for non-finite gradients "
                f"since the last {self.who} log ({n} in all): the parameters did not move on those "
                "steps (nonfinite='skip')",
                RuntimeWarning,
                stacklevel=3,
            )
        self.last = n
        return n


def skipped_steps(optimizer: Any) -> torch.Tensor | None:
    """``SGGAdamW.skipped_steps()`` of the SGGAdamW behind ``optimizer`` (None if there is none)."""
    opt = unwrap_optimizer(optimizer)
    return None if opt is None else opt.skipped_steps()


def lazy_class(module_globals: dict, name: str, mixin: type, base: Callable[[], type], doc: str) -> type:
    """``class <name>(mixin, base())`` built on first use and stored in the module's globals, for
    a module ``__getattr__``: the framework (``base()`` imports it) is imported only when the
    class is asked for, so importing the integration module imports no framework."""
    cls = type(name, (mixin, base()), {"__doc__": doc, "__module__": module_globals["__name__"]})
    module_globals[name] = cls
    return cls
