"""``SGGAdamW`` with ``transformers.Trainer``: the shortest correct way.

Either build the optimizer and hand it over::

    from sgg_fast.integrations.transformers import SGGCallback, create_sgg_optimizer, sgg_training_args
    args = TrainingArguments(output_dir="out", learning_rate=2e-5, weight_decay=0.01)
    sgg_args = sgg_training_args(args)                             # a copy, max_grad_norm=0
    opt = create_sgg_optimizer(model, sgg_args, lambda_dir=0.2)   # Trainer's decay groups
    trainer = Trainer(model=model, args=sgg_args, optimizers=(opt, None), train_dataset=...,
                      callbacks=[SGGCallback()])

or let Trainer build it (it then makes its decay / no-decay groups itself)::

    from sgg_fast.integrations.transformers import sgg_optimizer_cls_and_kwargs
    trainer = Trainer(model=model, args=sgg_args, train_dataset=..., callbacks=[SGGCallback()],
                      optimizer_cls_and_kwargs=sgg_optimizer_cls_and_kwargs(sgg_args, lambda_dir=0.2))

Both give the optimizer Trainer builds for ``optim="adamw_torch"``: ``lr``, ``betas``, ``eps``
from ``args``; parameters named by ``Trainer.get_decay_parameter_names`` (no biases, no
LayerNorm/RMSNorm weights) get ``args.weight_decay``, the others 0 — with SGGAdamW's guidance
settings (``**sgg_kwargs``) on top. Trainer's LR scheduler then drives ``group["lr"]`` as usual.

**Clipping.** Trainer clips with ``clip_grad_norm_(max_grad_norm)`` (default 1.0) *before*
``optimizer.step()``. SGGAdamW's magnitude control (``lambda_mag > 0``, the default) bounds the
same norm inside the step: both would clip twice, and SGG would see (and report) clipped
gradients. Nothing here changes the caller's ``TrainingArguments``: build Trainer with
``args=sgg_training_args(args)``, a copy with ``max_grad_norm=0`` (Trainer then only *measures*
the norm for its logs). ``create_sgg_optimizer`` / ``sgg_optimizer_kwargs`` warn when ``args``
would clip twice (``trainer_clipping="warn"``, the default), ``"error"`` raises instead and
``"keep"`` accepts it silently. With ``lambda_mag = 0`` Trainer's clipping is the only magnitude
control and is left alone. To reproduce Trainer's hard clip inside SGG use ``lambda_mag=1,
mag_mode="absolute", max_norm=args.max_grad_norm, granularity="global"``: that is exactly
``clip_grad_norm_`` followed by AdamW (DESIGN §1.7, tested).

**Callback.** ``Trainer(..., callbacks=[SGGCallback()])`` warns at the start of training when
Trainer would clip before SGG (whatever route built the optimizer, ``optimizers=`` included),
and adds ``sgg_skipped_steps`` (steps skipped for non-finite gradients) to every log, warning
when it grew: a run stuck on NaN gradients otherwise looks like a flat loss.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch

from ..optimizer import GUIDANCE_DEFAULTS, SGGAdamW
from ..validation import validate_adamw, validate_guidance
from ._common import SkipTracker, clipping_message, lazy_class, unwrap_optimizer, warn_double_clipping

TRAINER_CLIPPING = ("warn", "keep", "error")


def _trainer_cls():
    try:
        from transformers import Trainer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sgg_fast.integrations.transformers needs `transformers` (and `accelerate` for "
            "Trainer): pip install 'sgg_fast[eval]'"
        ) from e
    return Trainer


def decay_parameter_names(model: torch.nn.Module, trainer: Any = None) -> list[str]:
    """Names of the parameters Trainer applies weight decay to (Trainer's own rule:
    ``Trainer.get_decay_parameter_names``). Pass ``trainer`` to use a subclass's override."""
    if trainer is not None:
        return list(trainer.get_decay_parameter_names(model))
    Trainer = _trainer_cls()
    # the method is an instance method that reads nothing from the instance; call it on a bare one
    return list(Trainer.get_decay_parameter_names(object.__new__(Trainer), model))


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float, trainer: Any = None) -> list[dict]:
    """``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``,
    as ``Trainer.create_optimizer`` builds them (parameters with ``requires_grad`` only)."""
    names = set(decay_parameter_names(model, trainer))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in names], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in names], "weight_decay": 0.0},
    ]


def _lambda_mag(sgg_kwargs: dict[str, Any]) -> float:
    return float(sgg_kwargs.get("lambda_mag", GUIDANCE_DEFAULTS["lambda_mag"]))


def resolve_trainer_clipping(args: Any, lambda_mag: float, trainer_clipping: str = "warn") -> None:
    """Check ``args`` (a ``TrainingArguments``) against the clipping policy (module docstring);
    never changes ``args``."""
    if trainer_clipping not in TRAINER_CLIPPING:
        raise ValueError(f"trainer_clipping={trainer_clipping!r}; choose one of {TRAINER_CLIPPING}")
    max_grad_norm = getattr(args, "max_grad_norm", 0) or 0
    if not (float(lambda_mag) > 0 and max_grad_norm > 0) or trainer_clipping == "keep":
        return
    fix = "Pass args=sgg_training_args(args) to Trainer (a copy with max_grad_norm=0)."
    if trainer_clipping == "error":
        raise ValueError(
            clipping_message("Trainer (TrainingArguments.max_grad_norm)", max_grad_norm, lambda_mag, fix)
            + " (trainer_clipping='error'; both clip)"
        )
    warnings.warn(
        clipping_message("Trainer (TrainingArguments.max_grad_norm)", max_grad_norm, lambda_mag, fix),
        UserWarning,
        stacklevel=3,
    )


def _sgg_signature() -> dict[str, Any]:
    """``SGGAdamW``'s keyword arguments (everything but ``params``) with their defaults."""
    sig = inspect.signature(SGGAdamW.__init__)
    return {n: p.default for n, p in sig.parameters.items() if n not in ("self", "params")}


def check_sgg_kwargs(sgg_kwargs: dict[str, Any]) -> None:
    """``sgg_kwargs`` are ``SGGAdamW`` arguments (its signature: ``TypeError`` naming the unknown
    ones) with values the constructor accepts (its ``ValueError``), checked before anything is
    built or copied."""
    allowed = _sgg_signature()
    unknown = sorted(set(sgg_kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unknown SGGAdamW arguments {unknown}; SGGAdamW takes {', '.join(sorted(allowed))}")
    group = {**allowed, **sgg_kwargs}
    if isinstance(group.get("betas"), list):
        group["betas"] = tuple(group["betas"])
    validate_adamw(group)
    validate_guidance(group)


def sgg_training_args(args: Any, **sgg_kwargs: Any) -> Any:
    """A copy of ``args`` (``TrainingArguments``) for a Trainer driving ``SGGAdamW(**sgg_kwargs)``:
    ``max_grad_norm=0`` when SGG's magnitude control is on (``lambda_mag > 0``, the default), so
    Trainer does not clip before it; otherwise an unchanged copy. ``args`` itself is not changed.
    ``sgg_kwargs`` are checked as ``SGGAdamW`` would (:func:`check_sgg_kwargs`)."""
    check_sgg_kwargs(sgg_kwargs)
    new = copy.copy(args)
    if _lambda_mag(sgg_kwargs) > 0 and (getattr(args, "max_grad_norm", 0) or 0) > 0:
        new.max_grad_norm = 0.0
    return new


def sgg_optimizer_kwargs(args: Any, trainer_clipping: str = "warn", **sgg_kwargs: Any) -> dict[str, Any]:
    """``SGGAdamW`` keyword arguments from ``TrainingArguments`` (lr, betas, eps, weight_decay)
    plus ``sgg_kwargs`` (any ``SGGAdamW`` argument; they win); checks them
    (:func:`check_sgg_kwargs`) and ``args`` against the clipping policy."""
    check_sgg_kwargs(sgg_kwargs)
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **sgg_kwargs,
    }
    resolve_trainer_clipping(args, _lambda_mag(kwargs), trainer_clipping)
    return kwargs


def create_sgg_optimizer(
    model: torch.nn.Module, args: Any, trainer: Any = None, trainer_clipping: str = "warn", **sgg_kwargs: Any
) -> SGGAdamW:
    """The optimizer ``Trainer.create_optimizer`` would build for AdamW, as an ``SGGAdamW``.

    Use as ``Trainer(model, args, optimizers=(create_sgg_optimizer(model, args, ...), None))``.

    Args:
        model: the model Trainer trains.
        args: its ``TrainingArguments`` (read only; see ``sgg_training_args`` for clipping).
        trainer: optional Trainer (sub)class instance whose ``get_decay_parameter_names`` to use.
        trainer_clipping: ``"warn" | "keep" | "error"`` (module docstring).
        **sgg_kwargs: any ``SGGAdamW`` argument (``lambda_dir``, ``mag_mode``, ``reference``,
            ``amsgrad``, ``weight_decay``, …); an explicit ``weight_decay`` is that of the decay
            group (instead of ``args.weight_decay``).
    """
    kwargs = sgg_optimizer_kwargs(args, trainer_clipping, **sgg_kwargs)
    # an explicit weight_decay wins over args.weight_decay, as in Trainer.get_optimizer_cls_and_kwargs
    return SGGAdamW(decay_parameter_groups(model, kwargs["weight_decay"], trainer), **kwargs)


def sgg_optimizer_cls_and_kwargs(
    args: Any, trainer_clipping: str = "warn", **sgg_kwargs: Any
) -> tuple[type, dict[str, Any]]:
    """``(SGGAdamW, kwargs)`` for ``Trainer(..., optimizer_cls_and_kwargs=...)``; Trainer then
    builds its own decay / no-decay groups (whose ``weight_decay`` wins over the default here)."""
    return SGGAdamW, sgg_optimizer_kwargs(args, trainer_clipping, **sgg_kwargs)


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SGGCallback needs `transformers`: pip install 'sgg_fast[eval]'") from e
    return TrainerCallback


class _SGGCallbackMixin:
    """The body of ``SGGCallback`` (the class itself derives from ``TrainerCallback``)."""

    def __init__(self, warn_clipping: bool = True, log_skipped: bool = True):
        self.warn_clipping = warn_clipping
        self.log_skipped = log_skipped
        self.skips = SkipTracker("Trainer")
        self.warned_clipping = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if self.warn_clipping and not self.warned_clipping:
            self.warned_clipping = warn_double_clipping(
                "Trainer (TrainingArguments.max_grad_norm)",
                getattr(args, "max_grad_norm", 0),
                opt,
                "Pass args=sgg_training_args(args) to Trainer (a copy with max_grad_norm=0).",
                stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if not self.log_skipped or opt is None or logs is None:
            return
        n = self.skips.read(opt)  # one host sync per log
        logs["sgg_skipped_steps"] = n
        # Trainer appended {**logs, "step": ...} to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sgg_skipped_steps"] = n


def __getattr__(name: str):
    # SGGCallback derives from transformers.TrainerCallback: built on first use, so importing
    # this module does not import transformers
    if name == "SGGCallback":
        doc = "``transformers.TrainerCallback`` for ``SGGAdamW`` (module docstring: Callback)."
        return lazy_class(globals(), name, _SGGCallbackMixin, _callback_base, doc)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# SGGCallback is provided by the module __getattr__ above
__all__ = [  # noqa: F822
    "SGGCallback",
    "create_sgg_optimizer",
    "sgg_training_args",
    "sgg_optimizer_cls_and_kwargs",
    "sgg_optimizer_kwargs",
    "decay_parameter_groups",
    "decay_parameter_names",
    "resolve_trainer_clipping",
    "check_sgg_kwargs",
]
