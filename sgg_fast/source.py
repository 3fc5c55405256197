"""``source_gradients``: the mean gradient of a source task, for ``reference="source"``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def source_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    params: Iterable[torch.Tensor] | None = None,
) -> dict[torch.Tensor, torch.Tensor]:
    """Mean gradient of ``loss_fn(model, batch)`` over ``batches``, keyed by parameter.

    Pass the result to ``opt.set_reference(...)`` for ``reference="source"``: the source-task
    direction the target-task gradients are aligned with (λ3) and blended towards (λ1).

    The gradients accumulate in each parameter's ``.grad`` as ``backward()`` always does
    (no extra copy per batch), are divided by the number of batches, and returned as new
    tensors; every parameter's previous ``.grad`` is restored afterwards. Parameters that get
    no gradient from the source task get a zero reference.

    Args:
        model: the module whose parameters are optimized.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batches: an iterable of batches of the source task (at least one).
        params: the parameters to return (default: those of ``model`` that require grad).
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    saved = [p.grad for p in params]
    n = 0
    try:
        for p in params:
            p.grad = None
        for batch in batches:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("source_gradients: loss_fn(model, batch) must return a scalar tensor")
            loss.backward()
            n += 1
        if n == 0:
            raise ValueError("source_gradients: `batches` is empty; pass at least one source batch")
        return {p: (p.grad.detach() / n if p.grad is not None else torch.zeros_like(p)) for p in params}
    finally:
        for p, g in zip(params, saved):
            p.grad = g
