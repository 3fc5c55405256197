"""``SGGAdamW`` with ``transformers.Trainer``: the shortest correct way.

Either build the optimizer and hand it over::

    from sgg_fast.integrations.transformers import create_sgg_optimizer
    args = TrainingArguments(output_dir="out", learning_rate=2e-5, weight_decay=0.01)
    opt = create_sgg_optimizer(model, args, lambda_dir=0.2)       # Trainer's decay groups
    trainer = Trainer(model=model, args=args, optimizers=(opt, None), train_dataset=...)

or let Trainer build it (it then makes its decay / no-decay groups itself)::

    from sgg_fast.integrations.transformers import sgg_optimizer_cls_and_kwargs
    trainer = Trainer(model=model, args=args, train_dataset=...,
                      optimizer_cls_and_kwargs=sgg_optimizer_cls_and_kwargs(args, lambda_dir=0.2))

Both give the optimizer Trainer builds for ``optim="adamw_torch"``: ``lr``, ``betas``, ``eps``
from ``args``; parameters named by ``Trainer.get_decay_parameter_names`` (no biases, no
LayerNorm/RMSNorm weights) get ``args.weight_decay``, the others 0 — with SGGAdamW's guidance
settings (``**sgg_kwargs``) on top. Trainer's LR scheduler then drives ``group["lr"]`` as usual.

**Clipping.** Trainer clips with ``clip_grad_norm_(max_grad_norm)`` (default 1.0) *before*
``optimizer.step()``. SGGAdamW's magnitude control (``lambda_mag > 0``) bounds the same norm
inside the step. Doing both would clip twice: SGG would see already-clipped gradients (its
``mag_mode="relative"`` running norm would track the clipped norm, and its ``last_stats()``
would report clipped norms). So, with ``trainer_clipping="auto"`` (default), when
``lambda_mag > 0`` and ``args.max_grad_norm > 0`` the helpers set ``args.max_grad_norm = 0``
(Trainer then only *measures* the norm for its logs) and warn. With ``lambda_mag = 0`` Trainer's
clipping is kept: it is then the only magnitude control. ``"keep"`` leaves ``args`` alone (both
act, knowingly) and ``"error"`` raises instead. To reproduce Trainer's hard clip inside SGG, use
``lambda_mag=1, mag_mode="absolute", max_norm=args.max_grad_norm, granularity="global"``: that is
exactly ``clip_grad_norm_`` followed by AdamW (DESIGN §1.7, tested).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..optimizer import GUIDANCE_DEFAULTS, SGGAdamW

TRAINER_CLIPPING = ("auto", "keep", "error")


def _trainer_cls():
    try:
        from transformers import Trainer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sgg_fast.integrations.transformers needs `transformers` (and `accelerate` for "
                          "Trainer): pip install 'sgg_fast[eval]'") from e
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


def resolve_trainer_clipping(args: Any, lambda_mag: float, trainer_clipping: str = "auto") -> None:
    """Apply the clipping policy (module docstring) to ``args`` (a ``TrainingArguments``)."""
    if trainer_clipping not in TRAINER_CLIPPING:
        raise ValueError(f"trainer_clipping={trainer_clipping!r}; choose one of {TRAINER_CLIPPING}")
    max_grad_norm = getattr(args, "max_grad_norm", 0) or 0
    if not (float(lambda_mag) > 0 and max_grad_norm > 0) or trainer_clipping == "keep":
        return
    if trainer_clipping == "error":
        raise ValueError(
            f"SGGAdamW's magnitude control (lambda_mag={lambda_mag}) and Trainer's clipping "
            f"(max_grad_norm={max_grad_norm}) would both clip the gradient. Set "
            "TrainingArguments(max_grad_norm=0) or lambda_mag=0, or pass trainer_clipping='auto'.")
    warnings.warn(
        f"sgg_fast: set TrainingArguments.max_grad_norm from {max_grad_norm} to 0: SGGAdamW's "
        f"magnitude control (lambda_mag={lambda_mag}) bounds the gradient norm, and Trainer's "
        "clip_grad_norm_ before it would clip twice. For Trainer's hard clip inside SGG use "
        f"lambda_mag=1, mag_mode='absolute', max_norm={max_grad_norm}, granularity='global'; to keep "
        "Trainer's clipping use lambda_mag=0. Set max_grad_norm=0 yourself to silence this.",
        UserWarning, stacklevel=3)
    args.max_grad_norm = 0.0


def sgg_optimizer_kwargs(args: Any, trainer_clipping: str = "auto", **sgg_kwargs: Any) -> dict[str, Any]:
    """``SGGAdamW`` keyword arguments from ``TrainingArguments`` (lr, betas, eps, weight_decay)
    plus ``sgg_kwargs`` (which win); applies the clipping policy to ``args``."""
    unknown = set(sgg_kwargs) - set(GUIDANCE_DEFAULTS) - {"lr", "betas", "eps", "weight_decay", "backend"}
    if unknown:
        raise TypeError(f"unknown SGGAdamW arguments {sorted(unknown)}")
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
              "weight_decay": args.weight_decay, **sgg_kwargs}
    resolve_trainer_clipping(args, kwargs.get("lambda_mag", GUIDANCE_DEFAULTS["lambda_mag"]), trainer_clipping)
    return kwargs


def create_sgg_optimizer(model: torch.nn.Module, args: Any, trainer: Any = None,
                         trainer_clipping: str = "auto", **sgg_kwargs: Any) -> SGGAdamW:
    """The optimizer ``Trainer.create_optimizer`` would build for AdamW, as an ``SGGAdamW``.

    Use as ``Trainer(model, args, optimizers=(create_sgg_optimizer(model, args, ...), None))``.

    Args:
        model: the model Trainer trains.
        args: its ``TrainingArguments`` (``max_grad_norm`` may be set to 0: see the module doc).
        trainer: optional Trainer (sub)class instance whose ``get_decay_parameter_names`` to use.
        trainer_clipping: ``"auto" | "keep" | "error"`` (module docstring).
        **sgg_kwargs: any ``SGGAdamW`` argument (``lambda_dir``, ``mag_mode``, ``reference``, …).
    """
    kwargs = sgg_optimizer_kwargs(args, trainer_clipping, **sgg_kwargs)
    return SGGAdamW(decay_parameter_groups(model, args.weight_decay, trainer), **kwargs)


def sgg_optimizer_cls_and_kwargs(args: Any, trainer_clipping: str = "auto",
                                 **sgg_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(SGGAdamW, kwargs)`` for ``Trainer(..., optimizer_cls_and_kwargs=...)``; Trainer then
    builds its own decay / no-decay groups (whose ``weight_decay`` wins over the default here)."""
    return SGGAdamW, sgg_optimizer_kwargs(args, trainer_clipping, **sgg_kwargs)


__all__ = ["create_sgg_optimizer", "sgg_optimizer_cls_and_kwargs", "sgg_optimizer_kwargs",
           "decay_parameter_groups", "decay_parameter_names", "resolve_trainer_clipping"]
