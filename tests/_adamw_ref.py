"""Comparing an optimizer with ``torch.optim.AdamW`` to float rounding, with a tolerance derived
from an error bound rather than picked.

The bound. Two implementations of the same AdamW recurrences in precision ``u`` (unit roundoff,
2⁻²⁴ for float32) differ only by the order and number of their roundings. Per element, step t:

    m_t = β1·m + (1-β1)·g            v_t = β2·v + (1-β2)·g²         (v → max(v_max, v_t) for amsgrad)
    r_t = (m_t / c1_t) / (sqrt(v_t / c2_t) + eps)                  c_i = 1 - β_i^t
    p_t = p·(1 - lr·wd) - lr·r_t

* ``p·(1 - lr·wd)`` and the subtraction: a few roundings relative to ``|p_{t-1}|·(1 + lr·wd)``.
* ``m_t``: each step adds ≤ 3u relative to ``β1|m| + (1-β1)|g|``, which is at most ``mabs_t``,
  the same EMA of ``|g|``; errors carried from earlier steps decay by β1, so after t steps
  the error of m is ≤ 3u·t·mabs_t. ``v_t`` has no cancellation (all terms ≥ 0): ≤ 4u·t relative,
  hence ≤ 2u·t relative on its square root. So the error of ``r_t`` is ≤ (5t + 3)·u·A_t with
  ``A_t = (mabs_t / c1_t) / (sqrt(v_t / c2_t) + eps)``, the ratio with |g| in place of g.
* ``c_i = 1 - β_i^t`` computed in float32 from a float32 β (the fused kernels do) is
  ill-conditioned for small t: its relative error is ≤ u·(t + β_i^t / (1 - β_i^t)), which enters
  r_t with weight 1 (c1) and ½ (c2): ``κ_t = β1^t/c1_t + β2^t/(2·c2_t) + 2t``.
* An error made in p at step s is carried unchanged (times 1 - lr·wd ≤ 1) to step T.

Summing, with C = 4 covering the few roundings per operation counted once above:

    |p_T − q_T| ≤ C·u·Σ_t [ |q_{t-1}|·(1 + lr_t·wd) + lr_t·A_t·(5t + 3 + κ_t) ]

and the moments: |m_T − m'_T| ≤ C·u·3T·mabs_T, |v_T − v'_T| ≤ C·u·4T·v_T. ``AdamWBound`` tracks
these sums in float64 from the reference's own gradients and hyperparameters.
"""

from __future__ import annotations

import torch

#: roundings per counted operation (see the module docstring)
C = 4.0


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class AdamWBound:
    """Per-element rounding bounds for one parameter stepped by AdamW (module docstring)."""

    def __init__(self, p: torch.Tensor, u: float):
        self.u = u
        z = torch.zeros(p.shape, dtype=torch.float64)
        self.mabs, self.v, self.vmax = z.clone(), z.clone(), z.clone()
        self.acc = z.clone()  # Σ_t [...] of the parameter bound
        self.t = 0

    def record(self, q_prev: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        """One step: ``q_prev`` the reference parameter before it, ``g`` the gradient given."""
        self.t += 1
        t = self.t
        b1, b2 = (_f(b) for b in group["betas"])
        lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
        g = g.detach().to(torch.float64)
        self.mabs.mul_(b1).add_(g.abs(), alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        torch.maximum(self.vmax, self.v, out=self.vmax)
        v = self.vmax if group.get("amsgrad") else self.v
        c1, c2 = 1 - b1**t, 1 - b2**t
        A = (self.mabs / c1) / ((v / c2).sqrt() + eps)
        kappa = b1**t / c1 + b2**t / (2 * c2) + 2 * t
        self.acc += q_prev.detach().to(torch.float64).abs() * (1 + lr * wd) + lr * A * (5 * t + 3 + kappa)

    def param(self) -> torch.Tensor:
        return C * self.u * self.acc

    def exp_avg(self) -> torch.Tensor:
        return C * self.u * 3 * self.t * self.mabs

    def exp_avg_sq(self, amsgrad_max: bool = False) -> torch.Tensor:
        return C * self.u * 4 * self.t * (self.vmax if amsgrad_max else self.v)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> float:
    """``|actual - expected| ≤ bound`` elementwise; returns max(|diff| / bound) (0 when equal)."""
    actual, expected = actual.detach(), expected.detach()
    diff = (actual.to(torch.float64) - expected.detach().to(torch.float64)).abs()
    bad = diff > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {diff.numel()} elements beyond the rounding bound; "
                             f"first at flat index {i}: |diff| = {float(diff.flatten()[i]):.3e} > "
                             f"bound {float(bound.flatten()[i]):.3e} (actual {float(actual.flatten()[i])!r}, "
                             f"expected {float(expected.flatten()[i])!r})")
    nz = bound > 0
    return float((diff[nz] / bound[nz]).max()) if nz.any() else 0.0


def step_pair(opt, ref, ps, qs, steps: int, scale_fn=None, seed: int = 0,
              bounds: list[AdamWBound] | None = None) -> list[AdamWBound]:
    """Steps ``opt`` (on ``ps``) and ``ref`` (a ``torch.optim.AdamW`` on ``qs``) ``steps`` times
    with the same gradients; returns the bounds tracked from ``ref``'s run (continuing
    ``bounds`` when given)."""
    gen = torch.Generator().manual_seed(seed)
    group_of = {id(q): g for g in ref.param_groups for q in g["params"]}
    bounds = bounds or [AdamWBound(q, unit_roundoff(q.dtype)) for q in qs]
    for t in range(steps):
        scale = scale_fn(t) if scale_fn else 1.0 + t
        for p, q, b in zip(ps, qs, bounds):
            g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
            grp = group_of[id(q)]
            b.record(q, -g if grp.get("maximize") else g, grp)
        opt.step()
        ref.step()
    return bounds


def assert_matches_adamw(opt, ref, ps, qs, bounds: list[AdamWBound]) -> float:
    """Parameters and moments of ``opt`` within ``bounds`` of ``ref``'s; returns the worst
    observed |diff| / bound."""
    worst = 0.0
    for i, (p, q, b) in enumerate(zip(ps, qs, bounds)):
        worst = max(worst, assert_within(p, q, b.param(), f"param {i} {tuple(p.shape)}"))
        st, rst = opt.state[p], ref.state[q]
        assert _f(st["step"]) == _f(rst["step"]), (st["step"], rst["step"])
        worst = max(worst, assert_within(st["exp_avg"], rst["exp_avg"], b.exp_avg(), f"exp_avg {i}"))
        worst = max(worst, assert_within(st["exp_avg_sq"], rst["exp_avg_sq"], b.exp_avg_sq(), f"exp_avg_sq {i}"))
        if "max_exp_avg_sq" in rst:
            worst = max(worst, assert_within(st["max_exp_avg_sq"], rst["max_exp_avg_sq"], b.exp_avg_sq(True),
                                             f"max_exp_avg_sq {i}"))
    return worst


__all__ = ["AdamWBound", "C", "assert_matches_adamw", "assert_within", "step_pair", "unit_roundoff"]
