"""The paper's regularised objective, by double backward (DESIGN §1.8; research mode).

:class:`~sgg_fast.SGGAdamW` applies the guidance to the gradient inside the optimizer step (one
extra reduction pass, no second backward). The paper states it as penalty terms on the loss; this
module builds exactly those terms so that the two formulations can be compared:

.. math::
    P(\\theta) = \\lambda_1\\,\\bigl(1 - \\cos(\\nabla L, r)\\bigr)
               + \\lambda_2\\,\\tfrac12\\,\\max\\bigl(0,\\ \\lVert\\nabla L\\rVert - \\tau\\bigr)^2

with ``∇L = ∂loss/∂params`` (all given parameters as one vector), ``r`` a fixed reference direction
(e.g. :func:`sgg_fast.source_gradients`), ``cos(a, b) = a·b / (‖a‖‖b‖)`` and ``τ = max_norm``.
``∇L`` is built with ``create_graph=True``, so ``(loss + P).backward()`` differentiates through it
(a Hessian-vector product per term): training then follows ``∇L + ∇P``. It costs roughly one more
backward pass per step, which is why it is not the fast path.

Conventions at the edges (the same as ``last_stats()``, DESIGN §1.6): ``cos = 0`` when ``‖∇L‖ = 0``
or ``‖r‖ = 0``, so the direction term is then the constant ``λ1`` (no gradient); the magnitude term
is exactly 0, with a zero gradient, while ``‖∇L‖ ≤ τ``. Square roots are taken on guarded
arguments so that no NaN reaches the gradient at ``∇L = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .validation import check_reference_shapes


def _check_weight(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_penalty: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"guidance_penalty: {name} must be finite and >= 0, got {value!r}")
    return v


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in at least float32 (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``√x`` with a zero (not NaN) gradient at ``x = 0``."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def guidance_penalty(
    loss: torch.Tensor,
    params: Iterable[torch.Tensor],
    reference: Any = None,
    lambda_dir: float = 0.0,
    lambda_mag: float = 0.0,
    max_norm: float = 1.0,
) -> torch.Tensor:
    """``λ1·(1 - cos(∇L, r)) + λ2·½·max(0, ‖∇L‖ - τ)²`` with ``∇L`` kept in the graph.

    Use as ``(loss + guidance_penalty(loss, params, ref, λ1, λ2, τ)).backward()``.

    Args:
        loss: scalar loss, still attached to the graph of ``params``.
        params: the parameters ``∇L`` is taken with respect to (all of them form one vector).
            A parameter the loss does not depend on contributes a zero gradient.
        reference: the direction ``r``: a list with one tensor (or ``None`` for zero) per
            parameter, or a dict ``{param: tensor}`` (missing parameters: zero). Detached: it is a
            constant of the objective. May be ``None`` only when ``lambda_dir == 0``.
        lambda_dir: λ1 ≥ 0, weight of the direction term.
        lambda_mag: λ2 ≥ 0, weight of the magnitude term.
        max_norm: τ ≥ 0, the gradient norm above which the magnitude term acts.

    Returns:
        A 0-dim tensor (dtype: that of ``loss``, at least float32) that carries the graph.
    """
    l1 = _check_weight("lambda_dir", lambda_dir)
    l2 = _check_weight("lambda_mag", lambda_mag)
    tau = _check_weight("max_norm", max_norm)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("guidance_penalty: `loss` must be a scalar tensor (reduce it first, e.g. .mean())")
    if not loss.requires_grad:
        raise ValueError(
            "guidance_penalty: `loss` does not require grad; compute it from the parameters "
            "with autograd enabled (not under torch.no_grad())"
        )
    params = list(params)
    if not params:
        raise ValueError("guidance_penalty: `params` is empty")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"guidance_penalty: params[{i}] is not a tensor that requires grad")
    if reference is None:
        if l1 > 0:
            raise ValueError(
                "guidance_penalty: lambda_dir > 0 needs a `reference` direction "
                "(e.g. sgg_fast.source_gradients(...)); pass one or set lambda_dir=0"
            )
        refs: list[torch.Tensor | None] = [None] * len(params)
    else:
        checked = check_reference_shapes(params, reference, "guidance_penalty")
        refs = [checked.get(p) for p in params]

    out_dtype = _acc_dtype(loss)
    if l1 == 0 and l2 == 0:
        return loss.new_zeros((), dtype=out_dtype)

    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    gg = gr = rr = None
    for g, r in zip(grads, refs):
        if g is None:
            continue
        acc = _acc_dtype(g)
        g = g.to(acc)
        term = (g * g).sum()
        gg = term if gg is None else gg + term
        if r is not None:
            r = r.detach().to(device=g.device, dtype=acc)
            term = (g * r).sum()
            gr = term if gr is None else gr + term
            term = (r * r).sum()
            rr = term if rr is None else rr + term
    if gg is None:  # the loss depends on none of the params: ∇L = 0
        gg = loss.new_zeros((), dtype=out_dtype)
    gg = gg.to(out_dtype)
    zero = gg.new_zeros(())
    gr = zero if gr is None else gr.to(out_dtype)
    rr = zero if rr is None else rr.to(out_dtype)

    n = _safe_sqrt(gg)
    penalty = zero
    if l1 > 0:
        den = n * rr.sqrt()
        ok = den > 0
        cos = torch.where(ok, gr / torch.where(ok, den, torch.ones_like(den)), zero)
        penalty = penalty + l1 * (1 - cos)
    if l2 > 0:
        penalty = penalty + l2 * 0.5 * torch.clamp_min(n - tau, 0) ** 2
    return penalty


__all__ = ["guidance_penalty"]
