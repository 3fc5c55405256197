"""The scalar math of Structured Gradient Guidance (DESIGN §1 A-C) — the only Python home.

Every backend reduces the gradients of a *segment* to four numbers (the statistics) and turns
them into two scalars ``alpha, beta`` such that the guided gradient is ``u = alpha*g + beta*r``.
This module holds that second part, as batched torch ops over all segments at once (no Python
loop over segments, no host sync). It has two mirrors, written operation by operation in the
same order so that all three round identically (bit for bit in float32; tests compare them):
``finalize_row`` in ``csrc/sgg_common.h`` (the CPU and CUDA ``sgg_finalize`` op) and
``_finalize_kernel`` in ``kernels/stats.py`` (Triton).

Inputs (all on one device, one floating dtype — backends use float32):

* ``stats``  ``[S, 4]``: columns :data:`STAT_COLS` = ``gg = Σg², rr = Σr², gr = Σg·r, pp = Σp²``
  (``pp`` only matters for ``mag_mode="param"``).
* ``hyper``  ``[S, 10]``: columns :data:`HYPER_COLS` (:func:`hyper_row`); ``mag_mode`` is encoded
  by :data:`MAG_MODES`; the three sign columns implement ``maximize`` (see :func:`hyper_row`).
* ``nu``     ``[S, 2]``: ``(ν, initialised)`` of each segment: the running norm ``norm_ema`` of
  ``mag_mode="relative"`` and a 0/1 flag (ν = 0 is a valid value; the flag says whether ν is).

Output ``[S, len(OUT_COLS)]``, columns :data:`OUT_COLS`.

The math, in the scaled form every mirror evaluates (``eps`` = the dtype's machine epsilon;
``√`` correctly rounded, see :func:`sqrt_rn`). With ``ng = √gg``, ``nr = √rr``, and
``gr ← gr_sign·gr``:

``κ = clamp((gr/ng)/nr, -1, 1)`` (0 when ``gg = 0`` or ``rr = 0``): the cosine of g and r, formed
without ``ng·nr`` (which can overflow or underflow) and without ``gr/rr`` (which overflows when
``‖g‖/‖r‖ ≳ 1e19``). Every other quantity is a ratio of order one, or ``ng``, ``nr``:

A. alignment (λ3)   active when ``κ < 0``: ``λ3e = λ3`` then, else 0. ``c = -λ3e·gr/rr = -λ3e·κ·ng/nr``
                    and ``g1 = g + c·r`` has ``‖g1‖² = gg·q`` with
                    ``q = sin² + ((1-λ3e)·κ)²``, ``sin² = (1-κ)·(1+κ)``  (``q = 1`` when ``λ3e = 0``),
                    a sum of two non-negative terms instead of ``gg + 2c·gr + c²·rr``. A
                    ``sin² <= CANCEL_EPS·eps`` is rounding noise of the statistics (g ∥ r; always
                    so for a one-element segment) and is taken as 0; if then ``q = 0`` (λ3 = 1),
                    ``g1 = 0`` and ``u = 0``: α = β = 0.
B. direction (λ1)   if ``rr > 0`` and ``q·gg > 0``: with ``cos1 = cos(g1, r)``,
                    ``‖w‖² = (1-λ1)² + λ1² + 2λ1(1-λ1)·cos1 = (1-2λ1)² + 2λ1(1-λ1)·(1+cos1)``
                    (two non-negative terms: no cancellation), where
                    ``1 + cos1 = 1 + κ`` (λ3e = 0) or ``sin²/(√q·(√q - (1-λ3e)·κ))`` (λ3e > 0).
                    When ``‖w‖² > BLEND_EPS·eps``: ``g2 = n1·((1-λ1)·g1/n1 + λ1·r/nr)/‖w‖``,
                    otherwise ``g2 = g1`` (λ1 = ½ with g1 antiparallel to r: ``w = 0`` exactly,
                    and in float32 too). Either way ``n2 = ‖g2‖ = n1 = ng·√q``.
C. magnitude (λ2)   ``τ`` by mode (absolute: ``max_norm``; relative: ``mag_ratio·ν``, or ∞ while ν
                    is not initialised; param: ``mag_ratio·max(√pp, 1e-3)``);
                    ``s = (1 - λ2) + λ2·τ/n2`` if ``n2 > τ`` else 1 (no cancellation when n2 ≫ τ);
                    ``g3 = s·g2``, ``n3 = s·n2``.

Collapsed: ``g3 = α·g + β·r`` with ``a2 = (1-λ1)/‖w‖``, ``b = λ1/‖w‖`` (``a2 = 1, b = 0`` when the
blend is off) and

    ``α = s·a2``,      ``β = bh·(s·ng)/nr``,      ``bh = b·√q - a2·λ3e·κ  (>= 0)``

(``β = s·(a2·c + b·n1/nr)``; evaluated in this order, ``bh·(s·ng)`` cannot overflow —
``bh <= 2/√(BLEND_EPS·eps)``, ``s <= 1`` — and ``β`` overflows only when its value exceeds the
dtype's range). Then ``α ← alpha_sign·α``, ``β ← beta_sign·β``.

A segment is ``bad`` when its statistics are not finite, or when α or β is not (a value beyond
the dtype's range: e.g. ‖g‖ = 1e16 with ‖r‖ = 1e-22); one bad segment skips the whole step
(DESIGN §1.5). ν: relative segments, when not skipped, store ``ν ← mag_beta·ν + (1-mag_beta)·n3``
once initialised, else ``ν ← n2`` and the flag 1 if ``n2`` is finite and > 0. The
``norm_ema``/``norm_ema_init`` columns always hold what to store (the old values for other
modes and when skipped), so a caller may write them back unconditionally.
"""

from __future__ import annotations

import torch

from . import vocabulary as _vocabulary

#: columns of the statistics tensor
STAT_COLS = ("gg", "rr", "gr", "pp")
GG, RR, GR, PP = range(4)

#: columns of the per-segment hyper-parameter tensor (:func:`hyper_row`)
HYPER_COLS = (
    "lambda_dir",
    "lambda_mag",
    "lambda_align",
    "mag_mode",
    "max_norm",
    "mag_ratio",
    "mag_beta",
    "gr_sign",
    "alpha_sign",
    "beta_sign",
)
(H_LDIR, H_LMAG, H_LALIGN, H_MODE, H_MAXNORM, H_RATIO, H_MBETA, H_GRSIGN, H_ASIGN, H_BSIGN) = range(len(HYPER_COLS))

#: codes of ``mag_mode`` in the ``mag_mode`` column
MAG_MODES = {name: code for code, name in enumerate(_vocabulary.MAG_MODES)}  # absolute 0, relative 1, param 2

#: columns of the finalize output. The first four drive the apply pass and the ν state;
#: ``bad`` marks a segment whose statistics (or α, β) are not finite, ``skipped`` (same in every
#: row) is 1 when the step is skipped.
OUT_COLS = (
    "alpha",
    "beta",
    "norm_ema",
    "norm_ema_init",
    "grad_norm",
    "ref_norm",
    "cos",
    "conflict",
    "guided_norm",
    "mag_scale",
    "dir_penalty",
    "mag_penalty",
    "bad",
    "skipped",
)
(
    O_ALPHA,
    O_BETA,
    O_NU,
    O_NUINIT,
    O_GNORM,
    O_RNORM,
    O_COS,
    O_CONFLICT,
    O_UNORM,
    O_SCALE,
    O_DIRPEN,
    O_MAGPEN,
    O_BAD,
    O_SKIP,
) = range(len(OUT_COLS))

#: columns of the ``nu`` input (and of ``plan.seg_nus[s]``)
NU_COLS = ("norm_ema", "norm_ema_init")
N_NU, N_INIT = range(2)

#: the ``last_stats()`` entries (DESIGN §1.6), in OUT_COLS order
STATS_KEYS = (
    "grad_norm",
    "ref_norm",
    "cos",
    "conflict",
    "guided_norm",
    "mag_scale",
    "dir_penalty",
    "mag_penalty",
    "skipped",
)

#: ``‖w‖² <= BLEND_EPS·eps(dtype)`` disables the direction blend (g1 and r opposite, λ1 ≈ ½).
#: Above it the blend's amplification 1/‖w‖ stays below 1/√(16·eps) (~725 in float32).
BLEND_EPS = 16.0
#: ``sin²(g, r) = (1-κ)(1+κ) <= CANCEL_EPS·eps(dtype)`` is rounding noise of the statistics
#: (κ carries a few ulps from gr, √gg, √rr and two divisions; 1-κ² twice that): g ∥ r exactly
CANCEL_EPS = 16.0
#: floor of ``√pp`` in ``mag_mode="param"`` (AGC-style), so that zero-initialised weights can move
PARAM_NORM_FLOOR = 1e-3

GUIDANCE_KEYS = ("lambda_dir", "lambda_mag", "lambda_align", "mag_mode", "max_norm", "mag_ratio", "mag_beta")

#: (gr_sign, alpha_sign, beta_sign) by (maximize, reference is "momentum", rewrite_grad)
_SIGNS = {
    (False, True, False): (1.0, 1.0, 1.0),
    (False, False, False): (1.0, 1.0, 1.0),
    (False, True, True): (1.0, 1.0, 1.0),
    (False, False, True): (1.0, 1.0, 1.0),
    (True, True, False): (-1.0, -1.0, 1.0),
    (True, False, False): (1.0, -1.0, -1.0),
    (True, True, True): (-1.0, 1.0, -1.0),
    (True, False, True): (1.0, 1.0, 1.0),
}


def hyper_row(group: dict, rewrite_grad: bool = False) -> list[float]:
    """The :data:`HYPER_COLS` row of one segment, from a param_group-like dict.

    ``rewrite_grad``: the caller writes ``u`` into ``.grad`` for another optimizer to step on
    (GradientGuidance), instead of feeding ``u`` to its own AdamW (SGGAdamW).

    The sign columns implement ``maximize`` (``group.get("maximize", False)``) inside finalize.
    Maximizing f is minimizing with the gradient ``g' = -g`` (torch negates ``.grad``); the
    guidance must act on ``g'`` and its reference ``r'`` in that same convention, i.e. on the
    statistics ``g'g' = gg``, ``r'r' = rr``, ``g'r' = gr_sign·gr``, and produce
    ``u' = α'·g' + β'·r'``. The kernels form ``α·g + β·r`` from the raw ``.grad`` g and the
    stored r, so ``α = alpha_sign·α'``, ``β = beta_sign·β'`` with:

    * the stored r in the maximised convention already — ``reference="momentum"``: ``exp_avg``
      (or a wrapped optimizer's ``exp_avg``/``momentum_buffer``) accumulates what was stepped
      on: ``r' = r``, ``g'r' = -gr`` → ``gr_sign = -1``; ``u' = -α'·g + β'·r``;
    * the stored r in ``.grad``'s convention — ``"ema"`` (an average of raw ``.grad``) and
      ``"source"`` (a source-task ``.grad``): ``r' = -r``, ``g'r' = gr`` → ``gr_sign = +1``;
      ``u' = -α'·g - β'·r``.

    SGGAdamW feeds ``u'`` to AdamW: (momentum) ``(-1, -1, +1)``, (ema/source) ``(+1, -1, -1)``.
    GradientGuidance writes ``.grad ← -u'`` (the wrapped optimizer, built with maximize=True,
    negates ``.grad`` again and so steps on ``u'``): (momentum) ``-u' = α'·g - β'·r`` →
    ``(-1, +1, -1)``; (ema/source) ``-u' = α'·g + β'·r`` → ``(+1, +1, +1)``.
    Without maximize every sign is +1. The statistics row (cos, conflict) is that of ``g', r'``.
    """
    maximize = bool(group.get("maximize", False))
    signs = _SIGNS[(maximize, group.get("reference", "momentum") == "momentum", bool(rewrite_grad))]
    return [
        float(group["lambda_dir"]),
        float(group["lambda_mag"]),
        float(group["lambda_align"]),
        float(MAG_MODES[group["mag_mode"]]),
        float(group["max_norm"]),
        float(group["mag_ratio"]),
        float(group["mag_beta"]),
        *signs,
    ]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded (IEEE) ``√x`` for float32 on any device (float16/bfloat16: through it).

    torch's CPU ``sqrt`` is not correctly rounded: it calls MKL's vector math (``VML_HA``, about
    1 ulp), which differs from IEEE ``sqrtss`` in ~17% of float32 inputs and whose code path
    depends on the CPU (vendor, AVX2/AVX-512). The C++ (``std::sqrt``) and Triton
    (``sqrt_rn``) mirrors are IEEE. Here: ``s`` = the float64 root rounded to ``x``'s dtype
    (within 1 ulp whatever the float64 root's accuracy), then exactly corrected — the midpoints
    ``m = (s + next(s))/2`` have at most 26 significant bits, so ``m²`` is exact in float64 and
    ``m² < x`` (resp. ``>``) says whether ``s`` must move up (down) one ulp; ``m² = x`` cannot
    happen for a float ``x``. CUDA's ``sqrt`` is IEEE already. float64: torch's own ``sqrt``
    (within 1 ulp of IEEE on CPU; the mirror tests bound its effect).
    """
    if x.dtype == torch.float64 or x.device.type == "cuda":
        return x.sqrt()
    if x.dtype != torch.float32:
        return sqrt_rn(x.float()).to(x.dtype)
    x64 = x.double()
    s = x64.sqrt().to(x.dtype)
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    dn = torch.nextafter(s, torch.zeros_like(s))
    s64 = s.double()
    mid_up = (s64 + up.double()) * 0.5
    mid_dn = (s64 + dn.double()) * 0.5
    return torch.where(mid_up * mid_up < x64, up, torch.where(mid_dn * mid_dn > x64, dn, s))


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


def finalize(stats: torch.Tensor, hyper: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Compute ``alpha, beta``, the new ``(norm_ema, norm_ema_init)``, the skip flag and the
    statistics row (the math: the module docstring).

    Args:
        stats: ``[S, 4]`` per-segment sums ``(gg, rr, gr, pp)``.
        hyper: ``[S, 10]`` per-segment hyper-parameters (:data:`HYPER_COLS`).
        nu: ``[S, 2]`` current ``(norm_ema, initialised)`` (:data:`NU_COLS`); any other shape is a
            ``ValueError``.

    Returns:
        ``[S, len(OUT_COLS)]`` in the dtype and on the device of ``stats``. Pure batched tensor
        ops: no host sync, no Python loop over segments.

    Mirrors: ``finalize_row`` (csrc/sgg_common.h), ``_finalize_kernel`` (kernels/stats.py).
    """
    dt = stats.dtype
    eps = torch.finfo(dt).eps
    hyper = hyper.to(dtype=dt)
    nu = nu.to(dtype=dt)
    if nu.dim() != 2 or nu.shape[1] != len(NU_COLS):
        raise ValueError(f"finalize: nu must have shape [S, {len(NU_COLS)}] (ν, initialised), got {tuple(nu.shape)}")
    gg, rr, gr_raw, pp = stats.unbind(1)
    (l_dir, l_mag, l_align, mode, max_norm, ratio, mbeta, gr_sign, alpha_sign, beta_sign) = hyper.unbind(1)
    nu_old, nu_flag = nu.unbind(1)
    zero = torch.zeros_like(gg)
    one = torch.ones_like(gg)
    inf = torch.full_like(gg, float("inf"))

    gr = gr_sign * gr_raw
    bad_stats = ~(_finite(gg) & _finite(rr) & _finite(gr) & _finite(pp))

    # cosine of g and r, scaled: no ng·nr, no gr/rr
    ng = sqrt_rn(gg)
    nr = sqrt_rn(rr)
    has_r = rr > 0
    both = (gg > 0) & has_r
    kap_raw = (gr / torch.where(both, ng, one)) / torch.where(both, nr, one)
    kap_raw = torch.where(kap_raw < -1, -one, torch.where(kap_raw > 1, one, kap_raw))
    kap = torch.where(both, kap_raw, zero)
    conflict = gr < 0

    # A. alignment
    l3 = torch.where(both & (kap < 0), l_align, zero)
    proj = l3 > 0
    sin2 = (1 - kap) * (1 + kap)
    sin2 = torch.where(sin2 <= CANCEL_EPS * eps, zero, sin2)
    t = (1 - l3) * kap
    q = torch.where(proj, sin2 + t * t, one)
    g1_zero = q == 0
    rq = sqrt_rn(q)

    # B. direction consistency
    ok = has_r & (gg > 0) & (q > 0)
    opc1 = torch.where(proj, sin2 / torch.where(ok, rq * (rq - t), one), 1 + kap)
    omd = 1 - l_dir
    dd = 1 - 2 * l_dir
    w2 = dd * dd + ((2 * l_dir) * omd) * opc1
    blend = ok & (w2 > BLEND_EPS * eps)
    wn = sqrt_rn(torch.where(blend, w2, one))
    a2 = torch.where(blend, omd / wn, one)
    b = torch.where(blend, l_dir / wn, zero)
    bh = b * rq - a2 * (l3 * kap)
    n2 = ng * rq  # ‖g2‖ = ‖g1‖

    # C. magnitude control
    is_abs = mode == MAG_MODES["absolute"]
    is_rel = mode == MAG_MODES["relative"]
    nu_init = nu_flag != 0
    tau_rel = torch.where(nu_init, ratio * nu_old, inf)
    npp = sqrt_rn(pp)
    floor = torch.full_like(pp, PARAM_NORM_FLOOR)
    tau_param = ratio * torch.where(npp < floor, floor, npp)
    tau = torch.where(is_abs, max_norm, torch.where(is_rel, tau_rel, tau_param))
    over = n2 > tau
    s = torch.where(over, (1 - l_mag) + l_mag * (torch.where(over, tau, zero) / torch.where(over, n2, one)), one)
    n3 = s * n2
    finite_tau = _finite(tau)
    excess = n2 - torch.where(finite_tau, tau, zero)
    excess = torch.where(excess < 0, zero, excess)
    mag_pen = torch.where(finite_tau, (0.5 * excess) * excess, zero)

    alpha = torch.where(g1_zero, zero, s * a2) * alpha_sign
    beta = torch.where(g1_zero, zero, (bh * (s * ng)) / torch.where(has_r, nr, one)) * beta_sign
    bad = bad_stats | ~_finite(alpha) | ~_finite(beta)
    skip = bad.any()

    start = _finite(n2) & (n2 > 0)
    nu_rel = torch.where(nu_init, mbeta * nu_old + (1 - mbeta) * n3, torch.where(start, n2, nu_old))
    flag_rel = torch.where(nu_init | start, one, zero)
    keep = skip | ~is_rel
    nu_new = torch.where(keep, nu_old, nu_rel)
    flag_new = torch.where(keep, nu_flag, flag_rel)

    out = torch.stack(
        [
            alpha,
            beta,
            nu_new,
            flag_new,
            ng,
            nr,
            kap,
            conflict.to(dt),
            n3,
            s,
            1 - kap,
            mag_pen,
            bad.to(dt),
            skip.to(dt).expand_as(gg),
        ],
        dim=1,
    )
    return out


def stats_dict(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``last_stats()`` dict (DESIGN §1.6) as views of a finalize output; no sync."""
    d = {k: out[:, OUT_COLS.index(k)] for k in STATS_KEYS}
    d["skipped"] = d["skipped"] > 0
    return d
