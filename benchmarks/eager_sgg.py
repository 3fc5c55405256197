"""The eager PyTorch SGG step: what a user writes without sgg_fast (the benchmarks' baseline).

DESIGN §4 asks to time sgg_fast against "a plain eager PyTorch implementation of the same SGG step
(what a user would write)" and against that implementation under ``torch.compile``. This is it,
written from DESIGN §1 alone (it imports nothing from sgg_fast), the way a competent user with
the spec in hand would write it, so that the speedups reported against it are not inflated:

1. statistics: flatten and concatenate the segment's gradients and references in fp32
   (``torch.cat``: O(N) temporaries) and take three dot products ``gg, rr, gr`` (and ``pp``);
2. the guidance scalars of DESIGN §1 A-C with batched-free scalar tensor ops (no ``.item()``, so
   it stays on the device and compiles without graph breaks), already collapsed to
   ``u = α·g + β·r`` — a user forming ``g1, g2, g3`` as vectors would be slower still;
3. AdamW (DESIGN §1 D, torch's formula) per tensor on ``u``, formed per tensor in fp32.

Segments are param groups (``granularity="group"``, SGGAdamW's default). Not implemented (a
minimal user version): the non-finite skip (§1.5), the cancellation guard of
``sgg_fast.guidance.CANCEL_EPS`` (it only matters when ``g`` is exactly (anti-)parallel to ``r``),
``reference="source"``, other granularities. ``tests/test_eager_sgg.py`` checks that it matches
``SGGAdamW`` numerically, so the baseline does the same work.
"""

from __future__ import annotations

import math

import torch

MAG_MODES = ("absolute", "relative", "param")
REFERENCES = ("momentum", "ema")


def sgg_scalars(gg, rr, gr, pp, nu, *, lambda_dir: float, lambda_mag: float, lambda_align: float,
                mag_mode: str, max_norm: float, mag_ratio: float, mag_beta: float):
    """DESIGN §1 A-C on 0-dim fp32 tensors: returns ``(alpha, beta, new_nu)``, ``u = α·g + β·r``.

    A  ``c = -λ3·gr/rr`` if ``rr > 0, gr < 0``;  ``g1g1 = gg + 2c·gr + c²rr``, ``g1r = gr + c·rr``.
    B  ``w = (1-λ1)·g1/n1 + λ1·r/nr``, ``‖w‖² = (1-λ1)² + λ1² + 2λ1(1-λ1)·cos1``;
       ``g2 = n1·w/‖w‖`` (when ``rr > 0, g1g1 > 0, ‖w‖² > 1e-12``), so ``‖g2‖ = n1``.
    C  ``s = 1 - λ2·(1 - τ/n2)`` if ``n2 > τ`` else 1, ``τ`` by ``mag_mode``.
    """
    zero, one = torch.zeros_like(gg), torch.ones_like(gg)
    has_r = rr > 0
    c = torch.where(has_r & (gr < 0), -lambda_align * gr / torch.where(has_r, rr, one), zero)
    g1g1 = (gg + 2 * c * gr + c * c * rr).clamp_min(0)
    g1r = gr + c * rr
    n1, nr = g1g1.sqrt(), rr.sqrt()
    ok = has_r & (g1g1 > 0)
    cos1 = g1r / torch.where(ok, n1 * nr, one)
    l1 = lambda_dir
    w2 = (1 - l1) ** 2 + l1 ** 2 + 2 * l1 * (1 - l1) * cos1
    blend = ok & (w2 > 1e-12)
    wn = torch.where(blend, w2, one).sqrt()
    a2 = torch.where(blend, (1 - l1) / wn, one)
    b2 = torch.where(blend, l1 * n1 / (torch.where(ok, nr, one) * wn), zero)
    n2 = n1
    if mag_mode == "absolute":
        tau = torch.full_like(gg, max_norm)
    elif mag_mode == "relative":
        tau = torch.where(nu > 0, mag_ratio * nu, torch.full_like(gg, math.inf))
    else:
        tau = mag_ratio * pp.sqrt().clamp_min(1e-3)
    over = n2 > tau
    s = torch.where(over, 1 - lambda_mag * (1 - tau / torch.where(over, n2, one)), one)
    if mag_mode == "relative":
        nu_new = torch.where(nu > 0, mag_beta * nu + (1 - mag_beta) * s * n2,
                             torch.where(torch.isfinite(n2) & (n2 > 0), n2, nu))
    else:
        nu_new = nu
    return s * a2, s * (a2 * c + b2), nu_new


def sgg_adamw_group(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], refs: list[torch.Tensor], step: torch.Tensor,
                    nu: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, lambda_dir: float, lambda_mag: float, lambda_align: float,
                    mag_mode: str, max_norm: float, mag_ratio: float, mag_beta: float,
                    reference: str, ref_beta: float) -> None:
    """One SGG-AdamW step of one segment (one param group), in place. ``refs`` is ignored for
    ``reference="momentum"`` (``r`` is ``exp_avg`` before the step)."""
    r_list = exp_avgs if reference == "momentum" else refs
    # 1. statistics over the whole segment (fp32, flattened)
    g = torch.cat([x.reshape(-1) for x in grads]).float()
    r = torch.cat([x.reshape(-1) for x in r_list]).float()
    gg, rr, gr = torch.dot(g, g), torch.dot(r, r), torch.dot(g, r)
    del g, r
    if mag_mode == "param":
        p = torch.cat([x.reshape(-1) for x in params]).float()
        pp = torch.dot(p, p)
        del p
    else:
        pp = torch.zeros_like(gg)
    # 2. guidance scalars
    alpha, beta, nu_new = sgg_scalars(
        gg, rr, gr, pp, nu, lambda_dir=lambda_dir, lambda_mag=lambda_mag, lambda_align=lambda_align,
        mag_mode=mag_mode, max_norm=max_norm, mag_ratio=mag_ratio, mag_beta=mag_beta)
    nu.copy_(nu_new)
    # 3. AdamW on u = α·g + β·r, per tensor
    step.add_(1)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step).sqrt()
    step_size = lr / bc1
    for p, gi, m, v, ri in zip(params, grads, exp_avgs, exp_avg_sqs, r_list):
        # in place, like torch's single-tensor AdamW; fp32 tensors are updated directly,
        # bf16/fp16 ones through fp32 copies that are written back
        g32, r32 = gi.float(), ri.float()
        u = alpha * g32 + beta * r32
        if reference == "ema":  # r ← ref_beta·r + (1-ref_beta)·g (the raw gradient)
            r32.mul_(ref_beta).add_(g32, alpha=1 - ref_beta)
            if r32 is not ri:
                ri.copy_(r32)
        m32, v32, p32 = m.float(), v.float(), p.float()
        m32.mul_(beta1).add_(u, alpha=1 - beta1)
        v32.mul_(beta2).addcmul_(u, u, value=1 - beta2)
        p32.mul_(1 - lr * weight_decay)
        denom = v32.sqrt().div_(bc2_sqrt).add_(eps)
        p32.sub_(m32.div(denom).mul_(step_size))
        if p32 is not p:
            m.copy_(m32)
            v.copy_(v32)
            p.copy_(p32)


class EagerSGGAdamW(torch.optim.Optimizer):
    """SGG-AdamW written in plain eager PyTorch (see the module docstring); ``compile=True`` runs
    each group's step through ``torch.compile``.

    Same arguments and defaults as ``sgg_fast.SGGAdamW`` for what it implements
    (``reference`` momentum/ema, every ``mag_mode``, ``granularity="group"``).
    """

    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 lambda_dir=0.2, lambda_mag=1.0, lambda_align=1.0, mag_mode="relative",
                 max_norm=1.0, mag_ratio=2.0, mag_beta=0.9, reference="momentum", ref_beta=0.9,
                 compile: bool = False):
        if reference not in REFERENCES:
            raise ValueError(f"EagerSGGAdamW implements reference in {REFERENCES}, not {reference!r}")
        if mag_mode not in MAG_MODES:
            raise ValueError(f"mag_mode must be one of {MAG_MODES}, not {mag_mode!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        lambda_dir=lambda_dir, lambda_mag=lambda_mag, lambda_align=lambda_align,
                        mag_mode=mag_mode, max_norm=max_norm, mag_ratio=mag_ratio,
                        mag_beta=mag_beta, reference=reference, ref_beta=ref_beta)
        super().__init__(params, defaults)
        if compile:
            _allow_recompiles()
        self._fn = torch.compile(sgg_adamw_group, dynamic=False) if compile else sgg_adamw_group
        self._group_state: list[dict] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        while len(self._group_state) < len(self.param_groups):
            self._group_state.append({})
        for group, gstate in zip(self.param_groups, self._group_state):
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if "step" not in gstate:
                gstate["step"] = torch.zeros((), dtype=torch.float32, device=ps[0].device)
                gstate["norm_ema"] = torch.zeros((), dtype=torch.float32, device=ps[0].device)
            for p in ps:
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    if group["reference"] == "ema":
                        st["ref"] = torch.zeros_like(p)
            self._fn(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                     [self.state[p]["exp_avg_sq"] for p in ps],
                     [self.state[p].get("ref", self.state[p]["exp_avg"]) for p in ps],
                     gstate["step"], gstate["norm_ema"],
                     lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                     eps=group["eps"], weight_decay=group["weight_decay"],
                     lambda_dir=group["lambda_dir"], lambda_mag=group["lambda_mag"],
                     lambda_align=group["lambda_align"], mag_mode=group["mag_mode"],
                     max_norm=group["max_norm"], mag_ratio=group["mag_ratio"],
                     mag_beta=group["mag_beta"], reference=group["reference"],
                     ref_beta=group["ref_beta"])
        return loss


#: compiled variants of ``sgg_adamw_group`` one process may hold: one per (param-group shapes,
#: dtype, reference, hyper-parameters); a benchmark sweep needs dozens, dynamo's default is 8
RECOMPILE_LIMIT = 256


def _allow_recompiles() -> None:
    """Raise dynamo's per-function recompile limit, and make hitting it an error: past the limit
    dynamo silently runs the function eagerly, and a "compiled" row would time eager code."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * RECOMPILE_LIMIT))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def compile_unavailable_reason() -> str | None:
    """None when ``torch.compile`` can build CPU code here, else why not (a C++ compiler is needed)."""
    import shutil

    for cc in ("CXX", "CC"):
        import os

        if os.environ.get(cc) and shutil.which(os.environ[cc]):
            return None
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile needs a C++ compiler for CPU code (none of g++/c++/clang++ on PATH)"
    return None
