"""Backend ``"torch"``: the SGG step with ``torch._foreach_*`` ops, on any device.

It is the portable implementation and the one every fused backend is compared against in
the tests. Unlike the fused backends it allocates temporaries (as
``torch.optim.AdamW(foreach=True)`` does: the guided gradient ``u`` and fp32 copies of
bf16/fp16 tensors) and it reads the skip flag and the step counts on the host (one sync per
step). Its AdamW follows ``torch.optim.AdamW(foreach=True)`` operation by operation (bias
corrections in float64 on the host, ``lerp`` for the first moment, amsgrad's running maximum),
so that with every λ = 0 it equals torch's AdamW to float rounding.

Arithmetic is fp32 for fp32/bf16/fp16 tensors (fp64 for fp64 ones), like the fused kernels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TypeGuard

import torch

from .. import guidance as G
from ..plan import REF_EMA, REF_MOMENTUM, StepPlan
from . import register
from .base import Backend, Partials

_LOW = (torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 views/copies for the arithmetic (a copy only for bf16/fp16)."""
    return [t.float() if t.dtype in _LOW else t for t in ts]


def _filled(ts: list[torch.Tensor | None]) -> TypeGuard[list[torch.Tensor]]:
    """True when no entry is None (for the optional per-tensor lists where the caller's mode
    guarantees them: references of ema/source groups, max_exp_avg_sq of amsgrad groups)."""
    return all(t is not None for t in ts)


def _buckets(plan: StepPlan, by_group: bool) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(plan.params):
        key = (plan.group_index[i] if by_group else 0, p.device, p.dtype)
        out[key].append(i)
    return out


#: Reductions run over rows of this many elements, each summed by one thread. torch's CPU
#: reductions split one sum across threads above its grain size (32 Ki elements), which makes the
#: rounding depend on the thread count; a row-wise sum splits over rows only, and the row sums
#: (fewer than 32 Ki for any tensor below 1 G elements) are added serially. So the statistics
#: are bitwise the same for any number of threads.
_ROW = 1 << 15


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` flat as ``[n // _ROW, _ROW]`` full rows and the tail."""
    x = x.reshape(-1)
    k = x.numel() // _ROW * _ROW
    return x[:k].view(-1, _ROW), x[k:]


def _sum_squares(a: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``Σ a²`` in ``acc`` (no upcast copy), deterministic for any thread count."""
    if a.numel() <= _ROW:
        return torch.linalg.vector_norm(a, dtype=acc).square()
    full, tail = _rows(a)
    parts = torch.cat(
        [torch.linalg.vector_norm(full, dim=1, dtype=acc), torch.linalg.vector_norm(tail, dtype=acc).reshape(1)]
    )
    return parts.square().sum()


def _sum_products(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``Σ a·b`` in ``acc``, deterministic for any thread count (see :data:`_ROW`)."""
    if b is a:
        return _sum_squares(a, acc)
    prod = a.reshape(-1).to(acc) * b.reshape(-1).to(acc)
    if prod.numel() <= _ROW:
        return prod.sum()
    full, tail = _rows(prod)
    return torch.cat([full.sum(dim=1), tail.sum().reshape(1)]).sum()


def tensor_stats(plan: StepPlan) -> Partials:
    """One row ``(gg, rr, gr, pp)`` per tensor, rows in plan order (already grouped by segment)."""
    P = len(plan.params)
    home = plan.home
    want_pp = plan.needs("mag_mode", "param")
    # float64 parameters keep float64 statistics (and so a float64 finalize); otherwise float32
    stat_dtype = torch.float64 if torch.float64 in plan.dtypes else torch.float32
    rows: list[torch.Tensor] = []
    for i in range(P):
        g, r, p = plan.grads[i], plan.refs[i], plan.params[i]
        acc = _compute_dtype(p.dtype)
        gg = _sum_products(g, g, acc)
        zero = torch.zeros((), dtype=acc, device=g.device)
        rr = zero if r is None else _sum_products(r, r, acc)
        gr = zero if r is None else _sum_products(g, r, acc)
        pp = _sum_products(p, p, acc) if want_pp else zero
        rows.append(torch.stack([gg, rr, gr, pp]).to(device=home, dtype=stat_dtype))
    values = torch.stack(rows) if P else torch.zeros(0, 4, device=home, dtype=stat_dtype)
    offsets = [s.start for s in plan.segments] + [P]
    return Partials(values, offsets)


def _num(v) -> float:
    """A hyper-parameter as a Python float (a one-element tensor of any shape is read on the
    host: this backend syncs every step anyway)."""
    return float(v.reshape(())) if isinstance(v, torch.Tensor) else float(v)


def _per_tensor(plan: StepPlan, out: torch.Tensor, col: int, idx: list[int], dev) -> list[torch.Tensor]:
    vals = out[:, col].to(dev)[torch.tensor([plan.seg_of_param[i] for i in idx], device=dev)]
    return list(vals.unbind())


def _skipped(out: torch.Tensor) -> bool:
    return bool(out[0, G.O_SKIP].item()) if len(out) else False


def apply_adamw(plan: StepPlan, out: torch.Tensor) -> None:
    """AdamW (DESIGN §1 D) on ``u = α·g + β·r`` for every tensor of the plan."""
    if _skipped(out):  # host sync: the reference backend's one
        return
    for (gi, dev, dtype), idx in _buckets(plan, by_group=True).items():
        group = plan.groups[gi]
        lr, wd, eps = _num(group["lr"]), _num(group["weight_decay"]), _num(group["eps"])
        b1, b2 = (_num(b) for b in group["betas"])
        amsgrad = bool(group.get("amsgrad", False))
        alphas = _per_tensor(plan, out, G.O_ALPHA, idx, dev)
        betas = _per_tensor(plan, out, G.O_BETA, idx, dev)
        ps = [plan.params[i] for i in idx]
        ms = [plan.exp_avgs[i] for i in idx]
        vs = [plan.exp_avg_sqs[i] for i in idx]
        steps = [plan.steps[i] for i in idx]
        p32, m32, v32 = _up(ps), _up(ms), _up(vs)
        g32 = _up([plan.grads[i] for i in idx])

        # u = α·g + β·r, r as it stood before this step
        u = torch._foreach_mul(g32, alphas)
        mode = plan.ref_mode(idx[0])  # one group → one reference mode
        if mode == REF_MOMENTUM:
            torch._foreach_addcmul_(u, m32, betas)
        else:
            rs = [plan.refs[i] for i in idx]
            assert _filled(rs)  # the engine attaches a reference to every tensor of an ema/source group
            r32 = _up(rs)
            torch._foreach_addcmul_(u, r32, betas)
            if mode == REF_EMA:  # r ← ref_beta·r + (1-ref_beta)·g (raw gradient)
                rb = _num(group["ref_beta"])
                torch._foreach_mul_(r32, rb)
                torch._foreach_add_(r32, g32, alpha=1 - rb)
                if r32[0] is not rs[0]:
                    torch._foreach_copy_(rs, r32)

        # m ← β1·m + (1-β1)·u (as torch: lerp) ;  v ← β2·v + (1-β2)·u²
        torch._foreach_lerp_(m32, u, 1 - b1)
        torch._foreach_mul_(v32, b2)
        torch._foreach_addcmul_(v32, u, u, value=1 - b2)
        del u

        # bias corrections in float64 on the host, as torch.optim.AdamW (foreach) computes them
        torch._foreach_add_(steps, 1)
        ts = torch.stack([s.reshape(()).to(torch.float64) for s in steps]).cpu().tolist()
        step_size = [-(lr / (1 - b1**t)) for t in ts]
        bc2_sqrt = [(1 - b2**t) ** 0.5 for t in ts]

        # p ← p·(1 - lr·wd);  p ← p - lr/(1-β1^t) · m / (√v/√(1-β2^t) + eps)
        torch._foreach_mul_(p32, 1 - lr * wd)
        vmaxs: list[torch.Tensor] = []  # state["max_exp_avg_sq"] (amsgrad)
        vmax = None
        if amsgrad:
            kept = [plan.max_exp_avg_sqs[i] for i in idx]
            assert _filled(kept)  # kept for every tensor of an amsgrad group
            vmaxs = kept
            vmax = _up(vmaxs)
            torch._foreach_maximum_(vmax, v32)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, m32, denom, step_size)
        del denom
        if dtype in _LOW:
            torch._foreach_copy_(ps, p32)
            torch._foreach_copy_(ms, m32)
            torch._foreach_copy_(vs, v32)
            if vmax is not None:
                torch._foreach_copy_(vmaxs, vmax)


def guide_grads(plan: StepPlan, out: torch.Tensor) -> None:
    """``g ← α·g + β·r`` in place (GradientGuidance); the ema reference takes the raw ``g``."""
    if _skipped(out):
        return
    for (_gi, dev, dtype), idx in _buckets(plan, by_group=True).items():
        alphas = _per_tensor(plan, out, G.O_ALPHA, idx, dev)
        betas = _per_tensor(plan, out, G.O_BETA, idx, dev)
        gs = [plan.grads[i] for i in idx]
        g32 = _up(gs)
        mode = plan.ref_mode(idx[0])
        with_ref = [k for k, i in enumerate(idx) if plan.refs[i] is not None]
        raw = [g.clone() for g in g32] if mode == REF_EMA else None
        torch._foreach_mul_(g32, alphas)
        if with_ref:
            refs = [plan.refs[idx[k]] for k in with_ref]
            assert _filled(refs)  # with_ref: the tensors that have one
            torch._foreach_addcmul_([g32[k] for k in with_ref], _up(refs), [betas[k] for k in with_ref])
        if mode == REF_EMA:
            rb = _num(plan.segments[plan.seg_of_param[idx[0]]].group["ref_beta"])
            rs = [plan.refs[i] for i in idx]
            assert _filled(rs) and raw is not None  # an ema group keeps a reference for every tensor
            r32 = _up(rs)
            torch._foreach_mul_(r32, rb)
            torch._foreach_add_(r32, raw, alpha=1 - rb)
            if r32[0] is not rs[0]:
                torch._foreach_copy_(rs, r32)
        if dtype in _LOW:
            torch._foreach_copy_(gs, g32)


def finalize(plan: StepPlan, partials: Partials) -> torch.Tensor:
    """Segment sums in row order, :func:`guidance.finalize`, and ν written back in place."""
    values = partials.values
    if not partials.is_reduced:
        S = len(partials.offsets) - 1
        lengths = torch.tensor([partials.offsets[s + 1] - partials.offsets[s] for s in range(S)])
        seg = torch.repeat_interleave(torch.arange(S), lengths).to(values.device)
        red = torch.zeros(S, 4, dtype=values.dtype, device=values.device)
        values = red.index_add_(0, seg, values)
    dev = values.device
    nu = torch.stack([t.to(dev) for t in plan.seg_nus]) if plan.seg_nus else torch.zeros(0, 2, device=dev)
    out = G.finalize(values, plan.hyper(values.dtype).to(dev), nu.to(values.dtype))
    if not _skipped(out):
        rel = [s for s, seg in enumerate(plan.segments) if seg.group["mag_mode"] == "relative"]
        if rel:
            new = out[:, G.O_NU : G.O_NUINIT + 1].to(torch.float32)
            torch._foreach_copy_([plan.seg_nus[s] for s in rel], [new[s] for s in rel])
    return out


class TorchBackend(Backend):
    name = "torch"
    description = "pure PyTorch (_foreach ops); any device; reads the skip flag on the host"
    device_types = ("cpu", "cuda", "xpu", "mps", "meta", "hpu", "privateuseone")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    # the fallback: tried after every fused backend
    auto_priority = {t: 100 for t in device_types}
    device_skip = False
    fused = False
    amsgrad = True

    def not_supported_reasons(self, plan):
        # runs anywhere, several devices included (statistics meet on the first tensor's device)
        return [
            f"torch does not support {str(dt).replace('torch.', '')} parameters"
            for dt in plan.dtypes
            if dt not in self.dtypes
        ]

    def stats(self, plan):
        return tensor_stats(plan)

    def finalize(self, plan, partials):
        return finalize(plan, partials)

    def apply(self, plan, out):
        apply_adamw(plan, out)

    def guide(self, plan, out):
        guide_grads(plan, out)


register(TorchBackend())
