"""The scalar math of Structured Gradient Guidance (DESIGN §1 A-C) — the only place it lives.

Every backend reduces the gradients of a *segment* to four numbers (the statistics) and turns
them into two scalars ``alpha, beta`` such that the guided gradient is ``u = alpha*g + beta*r``.
This module holds that second part, as batched torch ops over all segments at once (no Python
loop over segments, no host sync). Fused backends mirror it in their finalize kernels, and a
test feeds both the same statistics and requires agreement.

Inputs (all on one device, one floating dtype — backends use float32):

* ``stats``  ``[S, 4]``: columns :data:`STAT_COLS` = ``gg = Σg², rr = Σr², gr = Σg·r, pp = Σp²``
  (``pp`` only matters for ``mag_mode="param"``).
* ``hyper``  ``[S, 7]``: columns :data:`HYPER_COLS`; ``mag_mode`` is encoded by :data:`MAG_MODES`.
* ``nu``     ``[S]``: the running norm ``norm_ema`` of ``mag_mode="relative"`` segments;
  a value ``<= 0`` means "not initialised yet" (state starts at 0).

Output ``[S, len(OUT_COLS)]``, columns :data:`OUT_COLS`:

A. alignment (λ3)   ``c = -λ3·gr/rr`` if ``rr > 0 and gr < 0`` else 0;  ``g1 = g + c·r``
                    ``g1g1 = gg + 2c·gr + c²·rr``, ``g1r = gr + c·rr`` (a ``g1g1`` within the
                    rounding noise of that cancellation, ``<= 16·eps·gg``, is taken as 0, and then
                    ``u = 0``: α = β = 0)
B. direction (λ1)   if ``rr > 0 and g1g1 > 0``: ``cos1 = g1r/(n1·nr)``,
                    ``‖w‖² = (1-λ1)² + λ1² + 2λ1(1-λ1)·cos1`` and, when ``‖w‖² > 1e-12``,
                    ``g2 = n1·((1-λ1)·g1/n1 + λ1·r/nr)/‖w‖``; otherwise ``g2 = g1``.
                    Either way ``‖g2‖ = n1 = √g1g1``.
C. magnitude (λ2)   ``τ`` by mode (absolute: ``max_norm``; relative: ``mag_ratio·ν`` or ∞ on the
                    first step with ``n2 > 0``; param: ``mag_ratio·max(√pp, 1e-3)``);
                    ``s = 1 - λ2·(1 - τ/n2)`` if ``n2 > τ`` else 1;  ``g3 = s·g2``.

Collapsed: ``g3 = s·a2·g + s·(a2·c + b2)·r`` with ``a2 = (1-λ1)/‖w‖``, ``b2 = λ1·n1/(nr·‖w‖)``
(``a2 = 1, b2 = 0`` when the blend is off), so ``alpha = s·a2`` and ``beta = s·(a2·c + b2)``.

The skip flag (non-finite statistics in any segment) is global; when it is set the ``norm_ema``
column returns the old ``ν`` unchanged, so a caller may write it back unconditionally.
"""

from __future__ import annotations

import torch

#: columns of the statistics tensor
STAT_COLS = ("gg", "rr", "gr", "pp")
GG, RR, GR, PP = range(4)

#: columns of the per-segment hyper-parameter tensor
HYPER_COLS = ("lambda_dir", "lambda_mag", "lambda_align", "mag_mode", "max_norm", "mag_ratio", "mag_beta")
H_LDIR, H_LMAG, H_LALIGN, H_MODE, H_MAXNORM, H_RATIO, H_MBETA = range(7)

#: codes of ``mag_mode`` in the ``mag_mode`` column
MAG_MODES = {"absolute": 0, "relative": 1, "param": 2}

#: columns of the finalize output. The first three drive the apply pass; ``bad`` marks a segment
#: whose statistics are not finite, ``skipped`` (same in every row) is 1 when the step is skipped.
OUT_COLS = (
    "alpha", "beta", "norm_ema",
    "grad_norm", "ref_norm", "cos", "conflict", "guided_norm", "mag_scale",
    "dir_penalty", "mag_penalty", "bad", "skipped",
)
(O_ALPHA, O_BETA, O_NU, O_GNORM, O_RNORM, O_COS, O_CONFLICT, O_UNORM, O_SCALE,
 O_DIRPEN, O_MAGPEN, O_BAD, O_SKIP) = range(len(OUT_COLS))

#: the ``last_stats()`` entries (DESIGN §1.6), in OUT_COLS order
STATS_KEYS = ("grad_norm", "ref_norm", "cos", "conflict", "guided_norm", "mag_scale",
              "dir_penalty", "mag_penalty", "skipped")

#: ``‖w‖²`` below this disables the direction blend (g1 and r nearly opposite with λ1 ≈ ½)
BLEND_EPS = 1e-12
#: ``g1g1 <= CANCEL_EPS·eps(dtype)·gg`` after the λ3 projection is rounding noise: taken as 0
CANCEL_EPS = 16.0
#: floor of ``√pp`` in ``mag_mode="param"`` (AGC-style), so that zero-initialised weights can move
PARAM_NORM_FLOOR = 1e-3

GUIDANCE_KEYS = ("lambda_dir", "lambda_mag", "lambda_align", "mag_mode", "max_norm",
                 "mag_ratio", "mag_beta")


def hyper_row(group: dict, rewrite_grad: bool = False) -> list[float]:
    """The :data:`HYPER_COLS` row of one segment, from a param_group-like dict."""
    return [
        float(group["lambda_dir"]),
        float(group["lambda_mag"]),
        float(group["lambda_align"]),
        float(MAG_MODES[group["mag_mode"]]),
        float(group["max_norm"]),
        float(group["mag_ratio"]),
        float(group["mag_beta"]),
    ]


def finalize(stats: torch.Tensor, hyper: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Compute ``alpha, beta``, the new ``norm_ema``, the skip flag and the statistics row.

    Args:
        stats: ``[S, 4]`` per-segment sums ``(gg, rr, gr, pp)``.
        hyper: ``[S, 7]`` per-segment hyper-parameters (:data:`HYPER_COLS`).
        nu: ``[S]`` current ``norm_ema`` (``<= 0``: not initialised).

    Returns:
        ``[S, len(OUT_COLS)]`` in the dtype and on the device of ``stats``. Pure batched tensor
        ops: no host sync, no Python loop over segments.
    """
    dt = stats.dtype
    hyper = hyper.to(dtype=dt)
    nu = nu.to(dtype=dt)
    gg, rr, gr, pp = stats.unbind(1)
    l_dir, l_mag, l_align, mode, max_norm, ratio, mbeta = hyper.unbind(1)
    zero = torch.zeros_like(gg)
    one = torch.ones_like(gg)
    inf = torch.full_like(gg, float("inf"))

    bad = ~(torch.isfinite(gg) & torch.isfinite(rr) & torch.isfinite(gr) & torch.isfinite(pp))
    skip = bad.any()

    # A. alignment: remove the component of g that conflicts with r
    has_r = rr > 0
    conflict = gr < 0
    c = torch.where(has_r & conflict, -l_align * gr / torch.where(has_r, rr, one), zero)
    g1g1 = (gg + 2 * c * gr + c * c * rr).clamp_min(0)
    # Cancellation guard: when g is (anti-)parallel to r (always so for a one-element segment)
    # the true g1g1 is 0 but the formula leaves rounding noise of order eps·gg, which would turn
    # into a spurious norm of order √eps·‖g‖. Values inside that noise are taken as 0.
    # Then g1 = 0 and so u = 0: α = β = 0 below (g + c·r formed in fp32 would be rounding noise
    # that AdamW's normalisation turns into an lr-sized step).
    g1_zero = (c != 0) & (g1g1 <= CANCEL_EPS * torch.finfo(dt).eps * gg)
    g1g1 = torch.where(g1_zero, zero, g1g1)
    g1r = gr + c * rr

    # B. direction consistency: blend unit directions, keep ‖g1‖
    n1 = g1g1.sqrt()
    nr = rr.sqrt()
    ok = has_r & (g1g1 > 0)
    safe_n1 = torch.where(ok, n1, one)
    safe_nr = torch.where(ok, nr, one)
    cos1 = g1r / (safe_n1 * safe_nr)
    w2 = (1 - l_dir) ** 2 + l_dir ** 2 + 2 * l_dir * (1 - l_dir) * cos1
    blend = ok & (w2 > BLEND_EPS)
    wn = torch.where(blend, w2, one).sqrt()
    a2 = torch.where(blend, (1 - l_dir) / wn, one)
    b2 = torch.where(blend, l_dir * safe_n1 / (safe_nr * wn), zero)
    n2 = n1  # ‖g2‖ = ‖g1‖ by construction

    # C. magnitude control
    is_abs = mode == MAG_MODES["absolute"]
    is_rel = mode == MAG_MODES["relative"]
    nu_init = nu > 0
    tau_rel = torch.where(nu_init, ratio * nu, inf)
    tau_param = ratio * pp.sqrt().clamp_min(PARAM_NORM_FLOOR)
    tau = torch.where(is_abs, max_norm, torch.where(is_rel, tau_rel, tau_param))
    over = n2 > tau
    s = torch.where(over, 1 - l_mag * (1 - tau / torch.where(over, n2, one)), one)
    n3 = s * n2
    finite_tau = torch.isfinite(tau)
    mag_pen = torch.where(finite_tau, 0.5 * (n2 - torch.where(finite_tau, tau, zero)).clamp_min(0) ** 2, zero)

    nu_start = torch.where(torch.isfinite(n2) & (n2 > 0), n2, nu)
    nu_new = torch.where(is_rel, torch.where(nu_init, mbeta * nu + (1 - mbeta) * n3, nu_start), nu)
    nu_new = torch.where(skip, nu, nu_new)

    alpha = torch.where(g1_zero, zero, s * a2)
    beta = torch.where(g1_zero, zero, s * (a2 * c + b2))

    gnorm = gg.sqrt()
    den = gnorm * nr
    cos = torch.where(den > 0, gr / torch.where(den > 0, den, one), zero)

    out = torch.stack(
        [
            alpha, beta, nu_new,
            gnorm, nr, cos, conflict.to(dt), n3, s,
            1 - cos, mag_pen, bad.to(dt), skip.to(dt).expand_as(gg),
        ],
        dim=1,
    )
    return out


def stats_dict(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``last_stats()`` dict (DESIGN §1.6) as views of a finalize output; no sync."""
    d = {k: out[:, OUT_COLS.index(k)] for k in STATS_KEYS}
    d["skipped"] = d["skipped"] > 0
    return d
