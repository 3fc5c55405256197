"""``SGGAdamW`` with Lightning (``lightning.pytorch`` or ``pytorch_lightning``).

Return it from ``configure_optimizers`` as any optimizer, and add the callback::

    from sgg_fast.integrations.lightning import SGGCallback
    trainer = L.Trainer(..., callbacks=[SGGCallback()])     # no gradient_clip_val

**Clipping.** Lightning clips (``gradient_clip_val``) after ``on_before_optimizer_step`` and
before ``optimizer.step()``, so with SGG's magnitude control on (``lambda_mag > 0``, the
default) the gradient would be clipped twice and SGG would see ‖g‖ ≤ gradient_clip_val on every
step. ``SGGCallback`` warns at ``fit`` start when that is configured; leave
``gradient_clip_val`` unset (or use SGG's own hard clip: ``lambda_mag=1, mag_mode="absolute",
max_norm=..., granularity="global"``).

**Skipped steps.** The callback logs ``sgg_skipped_steps`` (``self.log``, on step; the value
stays a device tensor until Lightning's logger reads it) and warns, at most once per
``log_every_n_steps``, when it grew.
"""

from __future__ import annotations

from typing import Any

from ._common import SkipTracker, lazy_class, unwrap_optimizer, warn_double_clipping


def _pl():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("sgg_fast.integrations.lightning needs `lightning` (pip install lightning)") from e
    return pl


def sgg_optimizers(trainer: Any) -> list:
    """The ``SGGAdamW`` instances among ``trainer.optimizers``."""
    return [o for o in (unwrap_optimizer(x) for x in getattr(trainer, "optimizers", []) or []) if o is not None]


class _SGGCallbackMixin:
    def __init__(self, warn_clipping: bool = True, log_skipped: bool = True):
        super().__init__()
        self.warn_clipping = warn_clipping
        self.log_skipped = log_skipped
        self.skips = SkipTracker("Lightning")

    def on_fit_start(self, trainer, pl_module):
        if not self.warn_clipping:
            return
        for opt in sgg_optimizers(trainer):
            if warn_double_clipping(
                "Lightning (Trainer(gradient_clip_val=...))",
                trainer.gradient_clip_val,
                opt,
                "Leave gradient_clip_val unset.",
                stacklevel=2,
            ):
                break

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.log_skipped:
            return
        opts = sgg_optimizers(trainer)
        if not opts:
            return
        total = sum(o.skipped_steps() for o in opts)
        pl_module.log("sgg_skipped_steps", total.float(), on_step=True, on_epoch=False, prog_bar=False)
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
        if trainer.global_step % every == 0:
            for o in opts:
                self.skips.read(o)  # one host sync per log interval


def __getattr__(name: str):
    # built on first use (derives from Lightning's Callback), so importing this module imports
    # no Lightning
    if name == "SGGCallback":
        doc = "Lightning ``Callback`` for ``SGGAdamW`` (module docstring)."
        return lazy_class(globals(), name, _SGGCallbackMixin, lambda: _pl().Callback, doc)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# SGGCallback is provided by the module __getattr__ above
__all__ = [  # noqa: F822
    "SGGCallback",
    "sgg_optimizers",
]
