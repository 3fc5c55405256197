"""The 2-rank cases of tests/test_distributed.py, run inside processes started with spawn.

Every case runs on every rank and returns a dict of measurements (max differences, flags); the
worker writes them to ``<outdir>/rank<r>.json`` after each case, so a hang still reports what
finished. The test module asserts on them. Every comparison is against the same model stepped
in ONE process on the concatenated batch (the unsharded run), with the same backend.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

WORLD = 2
STEPS = 5
BATCH = 4          # per rank; the unsharded run sees WORLD * BATCH samples
GRANULARITIES = ("group", "tensor", "global")
REFERENCES = ("momentum", "ema")


# -- models, data, settings -------------------------------------------------------------------------
def make_net() -> nn.Module:
    """Uneven shapes on 2 ranks: 5 rows (3/2), 3 rows (2/1), 1 row (1/0: an empty shard)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int, rank: int | None, device="cpu"):
    """Step ``step``'s global batch, or rank ``rank``'s part of it."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * BATCH, 7, generator=g).to(device)
    y = torch.randn(WORLD * BATCH, 1, generator=g).to(device) * 3
    if rank is None:
        return x, y
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()  # mean: FSDP2/DDP average the per-rank means = full-batch mean


def group_settings(gran: str, ref: str) -> list[dict]:
    """Two param groups (weights, biases), all three λ > 0, every mag_mode somewhere."""
    common = dict(lambda_dir=0.3, lambda_mag=0.7, lambda_align=0.8, reference=ref, ref_beta=0.8,
                  granularity=gran, mag_beta=0.5)
    if gran == "group":
        modes = [dict(mag_mode="relative", mag_ratio=0.9), dict(mag_mode="param", mag_ratio=0.05)]
    elif gran == "tensor":
        modes = [dict(mag_mode="relative", mag_ratio=0.9), dict(mag_mode="absolute", max_norm=0.05)]
    else:  # one global segment: one guidance setting
        m = dict(mag_mode="relative", mag_ratio=0.9) if ref == "momentum" else dict(mag_mode="param", mag_ratio=0.05)
        modes = [m, m]
    return [dict(lr=2e-2, weight_decay=0.01, **common, **modes[0]),
            dict(lr=1e-2, weight_decay=0.0, **common, **modes[1])]


def param_groups(model, settings):
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    bs = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=ws, **settings[0]), dict(params=bs, **settings[1])]


def stats_vec(opt) -> torch.Tensor:
    st = opt.last_stats()
    return torch.cat([st[k].double().reshape(-1) for k in sorted(st)])


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def maxdiff(a, b) -> float:
    a, b = full(a).detach().double(), full(b).detach().double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(both_nan, 0)
    return float(d.max())


def reldiff(a, b) -> float:
    """Max of |a - b| / max(1, |b|) (statistics such as mag_penalty can be large); NaN == NaN."""
    a, b = full(a).detach().double(), full(b).detach().double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    d = (a - b).abs() / b.abs().clamp_min(1)
    return float(d.masked_fill(torch.isnan(a) & torch.isnan(b), 0).max())


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """True when ``t`` is bitwise the same on every rank."""
    t = full(t).detach().double().reshape(-1).cpu()  # gloo: CPU tensors
    bufs = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(bufs, t)
    return all(torch.equal(torch.nan_to_num(b, nan=7.0), torch.nan_to_num(t, nan=7.0)) for b in bufs)


def compare_optimizers(model, opt, ref_model, ref_opt) -> dict:
    """Max differences of parameters and state (full tensors) against the unsharded run."""
    out = dict(param=0.0, state=0.0, norm_ema=0.0, step=0.0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        out["param"] = max(out["param"], maxdiff(p, q))
        sp, sq = opt.state[p], ref_opt.state[q]
        if set(sp) != set(sq):
            out["state"] = float("inf")
            continue
        for k in sp:
            key = k if k in ("norm_ema", "step") else "state"
            out[key] = max(out[key], maxdiff(sp[k], sq[k]))
    for a, b in zip(segment_nus(opt), segment_nus(ref_opt)):
        out["norm_ema"] = max(out["norm_ema"], maxdiff(a, b))
    return out


def segment_nus(opt) -> list:
    """The [ν, initialised] tensors of every segment that keeps one (SGGAdamW: in the param
    group or, for granularity="tensor", the parameter's state; GradientGuidance: its own)."""
    nus = [g["norm_ema"] for g in opt.param_groups if "norm_ema" in g]
    state = getattr(opt, "guide_state", opt.state)
    nus += [state[p]["norm_ema"] for g in opt.param_groups for p in g["params"] if "norm_ema" in state.get(p, {})]
    nus += list(getattr(opt, "segment_state", {}).values())
    return nus


# -- the cases ------------------------------------------------------------------------------------
def _unsharded(settings, backend, steps=STEPS, skip_step=None, cls="sgg", source=None, device="cpu"):
    from sgg_fast import GradientGuidance, SGGAdamW

    model = make_net().to(device)
    if cls == "sgg":
        opt = SGGAdamW(param_groups(model, settings), backend=backend)
    else:
        inner = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                   for g in param_groups(model, settings)])
        opt = GradientGuidance(inner, backend=backend, **{k: v for k, v in settings[0].items()
                                                          if k not in ("lr", "weight_decay")})
    if source is not None:
        opt.set_reference(source)
    stats = []
    for s in range(steps):
        x, y = batch(s, None, device)
        loss_fn(model, x, y).backward()
        if s != skip_step:
            opt.step()
            stats.append(stats_vec(opt))
        else:
            stats.append(None)
        opt.zero_grad()
    return model, opt, stats


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _steps(model, opt, rank, steps=STEPS, before_step=None):
    stats, outs = [], []
    for s in range(steps):
        x, y = batch(s, rank)
        loss_fn(model, x, y).backward()
        if before_step is not None:
            before_step(s)
        opt.step()
        stats.append(stats_vec(opt))
        outs.append(opt._last_out.clone())
        opt.zero_grad()
    return stats, outs


def _summary(model, opt, ref_model, ref_opt, stats, ref_stats, outs) -> dict:
    res = compare_optimizers(model, opt, ref_model, ref_opt)
    res["stats"] = max(reldiff(a, b) for a, b in zip(stats, ref_stats) if b is not None)
    res["same_out_all_ranks"] = all(same_on_all_ranks(o) for o in outs)
    nus = segment_nus(opt)
    res["norm_emas"] = len(nus)
    res["same_norm_ema_all_ranks"] = same_on_all_ranks(torch.stack(nus)) if nus else True
    st = ref_opt.last_stats()
    # the guidance did something in the last step: a reference term or a magnitude cut
    res["guidance_active"] = bool(ref_opt._last_out[:, 1].abs().max() > 0 or (st["mag_scale"] < 1).any())
    return res


def case_fsdp2(rank, backend, gran, ref, mesh_shape=(WORLD,), disable_reduce=False, wrapper=False,
               probe=False):
    """FSDP2-sharded model vs the unsharded run on the concatenated batch."""
    from torch.distributed.device_mesh import init_device_mesh

    import sgg_fast.distributed as D
    from sgg_fast import GradientGuidance, SGGAdamW

    settings = group_settings(gran, ref)
    ref_model, ref_opt, ref_stats = _unsharded(settings, backend, cls="gg" if wrapper else "sgg")
    if probe:
        backend = _register_probe(backend)
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = _fsdp(make_net(), mesh)
    if wrapper:
        inner = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                   for g in param_groups(model, settings)])
        opt = GradientGuidance(inner, backend=backend, **{k: v for k, v in settings[0].items()
                                                          if k not in ("lr", "weight_decay")})
    else:
        opt = SGGAdamW(param_groups(model, settings), backend=backend)
    calls = []
    real = D._all_reduce
    D._all_reduce = (lambda buf, group: calls.append(1)) if disable_reduce else \
        (lambda buf, group: (calls.append(1), real(buf, group)))
    try:
        stats, outs = _steps(model, opt, rank)
    finally:
        D._all_reduce = real
    res = _summary(model, opt, ref_model, ref_opt, stats, ref_stats, outs)
    res["all_reduces"] = len(calls)
    res["local_shapes"] = [list(p.to_local().shape) for p in model.parameters()]
    res["state_is_dtensor"] = all(type(v).__name__ == "DTensor" for p in model.parameters()
                                  for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq", "ref"))
    return res


def case_fsdp2_source(rank, backend):
    """reference='source' set from full plain tensors (the same on every rank) and DTensors."""
    from torch.distributed.device_mesh import init_device_mesh

    from sgg_fast import SGGAdamW

    settings = group_settings("group", "source")
    torch.manual_seed(5)
    sources = [torch.randn(p.shape) for p in make_net().parameters()]
    ref_model = make_net()
    ref_opt = SGGAdamW(param_groups(ref_model, settings), backend=backend)
    ref_opt.set_reference(dict(zip(ref_model.parameters(), sources)))
    ref_stats = []
    for s in range(STEPS):
        loss_fn(ref_model, *batch(s, None)).backward()
        ref_opt.step()
        ref_stats.append(stats_vec(ref_opt))
        ref_opt.zero_grad()
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp(make_net(), mesh)
    opt = SGGAdamW(param_groups(model, settings), backend=backend)
    # weights: full plain tensors (cut locally); biases: DTensors laid out differently (redistributed)
    from torch.distributed.tensor import Replicate, distribute_tensor
    refs = {p: (src if p.dim() == 2 else distribute_tensor(src, mesh, [Replicate()]))
            for p, src in zip(model.parameters(), sources)}
    opt.set_reference(refs)
    stats, outs = _steps(model, opt, rank)
    return _summary(model, opt, ref_model, ref_opt, stats, ref_stats, outs)


def case_nan_one_rank(rank, backend):
    """A NaN in rank 1's shard at step 2: every rank skips; nothing changes anywhere."""
    from torch.distributed.device_mesh import init_device_mesh

    from sgg_fast import SGGAdamW

    settings = group_settings("tensor", "ema")
    settings[0].update(mag_mode="relative", mag_ratio=0.9)  # so norm_ema exists and must not move
    bad_step = 2
    ref_model, ref_opt, ref_stats = _unsharded(settings, backend, skip_step=bad_step)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp(make_net(), mesh)
    opt = SGGAdamW(param_groups(model, settings), backend=backend)
    res = {}

    def snapshot():
        return [t.to_local().clone() if type(t).__name__ == "DTensor" else t.clone()
                for p in model.parameters() for t in [p, *opt.state[p].values()]]

    for s in range(STEPS):
        x, y = batch(s, rank)
        loss_fn(model, x, y).backward()
        if s == bad_step:
            w = next(model.parameters())          # first weight: rows 0-2 on rank 0, 3-4 on rank 1
            if rank == 1:
                w.grad.to_local()[0, 0] = float("nan")
            before = snapshot()
            opt.step()
            after = snapshot()
            res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
            st = opt.last_stats()
            res["skipped"] = bool(st["skipped"].all())
            res["bad_segment_nan"] = bool(torch.isnan(st["grad_norm"][0]))
            res["other_segments_finite"] = bool(torch.isfinite(st["grad_norm"][1:]).all())
            res["same_out_all_ranks"] = same_on_all_ranks(opt._last_out)
        else:
            opt.step()
        opt.zero_grad()
    res.update(compare_optimizers(model, opt, ref_model, ref_opt))
    return res


def case_ddp(rank, backend, gran, ref):
    """DDP: gradients arrive averaged and whole; SGGAdamW needs nothing (and adds no collective)."""
    import sgg_fast.distributed as D
    from sgg_fast import SGGAdamW

    settings = group_settings(gran, ref)
    ref_model, ref_opt, ref_stats = _unsharded(settings, backend)
    net = make_net()
    model = nn.parallel.DistributedDataParallel(net)
    opt = SGGAdamW(param_groups(net, settings), backend=backend)
    calls = []
    real = D._all_reduce
    D._all_reduce = lambda buf, group: (calls.append(1), real(buf, group))
    try:
        stats, outs = [], []
        for s in range(STEPS):
            loss_fn(model, *batch(s, rank)).backward()
            opt.step()
            stats.append(stats_vec(opt))
            outs.append(opt._last_out.clone())
            opt.zero_grad()
    finally:
        D._all_reduce = real
    res = _summary(net, opt, ref_model, ref_opt, stats, ref_stats, outs)
    res["all_reduces"] = len(calls)
    return res


def _split_rows(n: int, rank: int) -> slice:
    """Uneven manual split of n rows over 2 ranks: rank 0 takes ceil(n/2)."""
    k = (n + 1) // 2
    return slice(0, k) if rank == 0 else slice(k, n)


def case_process_group(rank, backend, gran, ref, use_group=True, wrapper=False, device="cpu"):
    """Manual sharding: each rank holds a row slice of every tensor (plain tensors); statistics are
    summed over process_group. Gradients are the slices of the full-batch gradient."""
    from sgg_fast import GradientGuidance, SGGAdamW

    settings = group_settings(gran, ref)
    ref_model, ref_opt, ref_stats = _unsharded(settings, backend, cls="gg" if wrapper else "sgg",
                                               device=device)
    driver = make_net().to(device)                   # full model: recomputes the full gradient
    names = [n for n, _ in driver.named_parameters()]
    slices = {n: nn.Parameter(p.detach()[_split_rows(p.shape[0], rank)].clone())
              for n, p in driver.named_parameters()}
    groups = [dict(params=[slices[n] for n in names if n.endswith("weight")], **settings[0]),
              dict(params=[slices[n] for n in names if n.endswith("bias")], **settings[1])]
    pg = dist.group.WORLD if use_group else None
    if wrapper:
        inner = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                   for g in groups])
        opt = GradientGuidance(inner, backend=backend, process_group=pg,
                               **{k: v for k, v in settings[0].items() if k not in ("lr", "weight_decay")})
    else:
        opt = SGGAdamW(groups, backend=backend, process_group=pg)
    stats, outs = [], []
    for s in range(STEPS):
        with torch.no_grad():                        # the driver holds the gathered full parameters
            for n, p in driver.named_parameters():
                parts = [None] * WORLD
                dist.all_gather_object(parts, slices[n].detach())
                p.copy_(torch.cat(parts))
        driver.zero_grad()
        loss_fn(driver, *batch(s, None, device)).backward()
        for n, p in driver.named_parameters():
            slices[n].grad = p.grad[_split_rows(p.shape[0], rank)].clone()
        opt.step()
        stats.append(stats_vec(opt))
        outs.append(opt._last_out.clone())
        opt.zero_grad()
    res = {"param": 0.0}
    for n, q in ref_model.named_parameters():
        parts = [None] * WORLD
        dist.all_gather_object(parts, slices[n].detach())
        res["param"] = max(res["param"], maxdiff(torch.cat(parts), q))
    res["stats"] = max(reldiff(a, b) for a, b in zip(stats, ref_stats))
    res["same_out_all_ranks"] = all(same_on_all_ranks(o) for o in outs)
    return res


def case_zero(rank, backend, gran, with_group, nan_step=None):
    """DDP + ZeroRedundancyOptimizer(optimizer_class=SGGAdamW): each tensor whole on one rank.
    ``nan_step``: a NaN in the gradient of group 1's only tensor, which one rank alone reads."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from sgg_fast import SGGAdamW

    settings = group_settings(gran, "momentum")
    net, ref_net = make_net(), make_net()
    model = nn.parallel.DistributedDataParallel(net)
    groups, ref_groups = param_groups(net, settings), param_groups(ref_net, settings)
    # group 1 holds one tensor only, so one rank owns no tensor of it (its slot is absent there)
    groups[1]["params"] = groups[1]["params"][:1]
    ref_groups[1]["params"] = ref_groups[1]["params"][:1]
    ref_opt = SGGAdamW(ref_groups, backend=backend)
    # ZeroRedundancyOptimizer takes process_group= itself: hand SGGAdamW its own through partial
    cls = functools.partial(SGGAdamW, process_group=dist.group.WORLD) if with_group else SGGAdamW
    opt = ZeroRedundancyOptimizer(groups, optimizer_class=cls, backend=backend)
    owned = sum(len(g["params"]) for g in opt.optim.param_groups)
    group1_owned = len(opt.optim.param_groups[1]["params"]) if len(opt.optim.param_groups) > 1 else 0
    res = {}
    for s in range(STEPS):
        loss_fn(model, *batch(s, rank)).backward()
        if s == nan_step:
            groups[1]["params"][0].grad[0] = float("nan")  # after DDP's all-reduce: not spread
            before = [p.detach().clone() for p in net.parameters()]
            opt.step()
            res["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
            res["skipped"] = bool(opt.optim.last_stats()["skipped"].all())
            res["local_segments"] = len(opt.optim.segment_labels())
        else:
            opt.step()
        opt.zero_grad()
        loss_fn(ref_net, *batch(s, None)).backward()
        if s != nan_step:
            ref_opt.step()
        ref_opt.zero_grad()
    res["param"] = max(maxdiff(p, q) for p, q in zip(net.parameters(), ref_net.parameters()))
    res["owned"] = owned
    res["group1_owned"] = group1_owned
    return res


def case_process_group_idle(rank, backend):
    """Rank 1 holds a tensor without gradient: its plan is empty, yet it must take part in the
    collective of rank 0 (SGGAdamW and GradientGuidance)."""
    from sgg_fast import GradientGuidance, SGGAdamW

    kw = dict(lambda_dir=0.4, lambda_mag=0.9, lambda_align=0.5, mag_mode="absolute", max_norm=0.5,
              granularity="global", reference="ema")
    torch.manual_seed(11)
    full0 = torch.randn(6)
    grads = [torch.randn(6) for _ in range(STEPS)]
    res = {}
    for kind in ("sgg", "gg"):
        p = nn.Parameter(full0.clone())
        q = nn.Parameter(full0.clone())
        if kind == "sgg":
            opt = SGGAdamW([p], lr=0.1, backend=backend, process_group=dist.group.WORLD, **kw)
            ref = SGGAdamW([q], lr=0.1, backend=backend, **kw)
        else:
            opt = GradientGuidance(torch.optim.SGD([p], lr=0.1), backend=backend,
                                   process_group=dist.group.WORLD, **kw)
            ref = GradientGuidance(torch.optim.SGD([q], lr=0.1), backend=backend, **kw)
        for g in grads:
            p.grad = g.clone() if rank == 0 else None
            q.grad = g.clone()
            opt.step()
            ref.step()
        res[kind] = maxdiff(p, q) if rank == 0 else maxdiff(p, full0)
    return res


def _register_probe(base: str) -> str:
    """A backend wrapping ``base`` whose apply() checks that the last stats() call of the step
    was on the very plan it applies (a fused backend may keep per-plan state between them)."""
    from sgg_fast.backends import all_backends, get_backend, register

    name = f"probe_{base}"
    if name in all_backends():
        return name
    inner = get_backend(base)

    class Probe(type(inner)):
        def stats(self, plan):
            self.last_stats_plan = plan
            return super().stats(plan)

        def apply(self, plan, out):
            if getattr(self, "last_stats_plan", None) is not plan:
                raise AssertionError("apply() on a plan whose stats() was not the last stats call")
            super().apply(plan, out)

    probe = Probe()
    probe.name = name
    register(probe)
    return name


def case_mixed_placements(rank, backend, mesh_shape, probe=False):
    """DTensors sharded on different mesh dimensions in ONE segment (Shard next to Replicate), and
    (1-D) a plain tensor held whole by every rank: each element counted once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sgg_fast import SGGAdamW

    if probe:
        backend = _register_probe(backend)

    mesh = init_device_mesh("cpu", mesh_shape)
    if len(mesh_shape) == 1:
        layouts = [[Shard(0)], [Replicate()], [Shard(1)], [Shard(0)], None]
    else:  # (2, 1): dimension 1 has size 1, so only dimension 0 is summed over
        layouts = [[Shard(0), Replicate()], [Replicate(), Shard(0)], [Replicate(), Replicate()],
                   [Shard(0), Shard(0)]]
    shapes = [(5, 3), (4,), (2, 7), (1,), (3,)][:len(layouts)]
    torch.manual_seed(3)
    fulls = [torch.randn(s) for s in shapes]
    settings = dict(lr=3e-2, lambda_dir=0.4, lambda_mag=0.8, lambda_align=0.9, mag_mode="param",
                    mag_ratio=0.1, granularity="global", reference="ema", ref_beta=0.7)
    ref_params = [nn.Parameter(f.clone()) for f in fulls]
    params = [nn.Parameter(f.clone() if pl is None else distribute_tensor(f.clone(), mesh, pl))
              for f, pl in zip(fulls, layouts)]
    ref_opt = SGGAdamW(ref_params, backend=backend, **settings)
    opt = SGGAdamW(params, backend=backend, **settings)
    stats, ref_stats = [], []
    for s in range(STEPS):
        g = torch.Generator().manual_seed(7 + s)
        grads = [torch.randn(sh, generator=g) * (1 + s) for sh in shapes]
        for p, q, gr, pl in zip(params, ref_params, grads, layouts):
            q.grad = gr.clone()
            p.grad = gr.clone() if pl is None else distribute_tensor(gr.clone(), mesh, pl)
        opt.step()
        ref_opt.step()
        stats.append(stats_vec(opt))
        ref_stats.append(stats_vec(ref_opt))
    res = {"param": max(maxdiff(p, q) for p, q in zip(params, ref_params)),
           "stats": max(reldiff(a, b) for a, b in zip(stats, ref_stats)),
           "same_out_all_ranks": same_on_all_ranks(opt._last_out)}
    return res


def case_errors(rank, backend):
    """Clear errors, raised on every rank before any collective, nothing mutated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from sgg_fast import GradientGuidance, SGGAdamW

    res = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    p = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    p.grad = DTensor.from_local(torch.randn(4, 3), mesh, [Partial()])
    opt = SGGAdamW([p], backend=backend)
    before = p.to_local().clone()
    try:
        opt.step()
        res["partial"] = "no error"
    except RuntimeError as e:
        res["partial"] = str(e)
    res["partial_unchanged"] = torch.equal(before, p.to_local())
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    try:
        SGGAdamW([p], backend=backend, process_group=dist.group.WORLD).step()
        res["dtensor_with_group"] = "no error"
    except ValueError as e:
        res["dtensor_with_group"] = str(e)
    # different numbers of tensors per rank with granularity='tensor' and a process_group
    qs = [nn.Parameter(torch.randn(3)) for _ in range(1 + rank)]
    for q in qs:
        q.grad = torch.randn(3)
    try:
        SGGAdamW(qs, backend=backend, granularity="tensor", process_group=dist.group.WORLD).step()
        res["layout"] = "no error"
    except RuntimeError as e:
        res["layout"] = str(e)
    # a full (unsharded) state loaded into an FSDP2 optimizer: clear error, nothing changed
    w = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    w.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    opt = SGGAdamW([w], backend=backend)
    sd = opt.state_dict()
    sd["state"] = {0: dict(step=torch.tensor(1.0), exp_avg=torch.zeros(4, 3), exp_avg_sq=torch.zeros(4, 3))}
    opt.load_state_dict(sd)
    before = w.to_local().clone()
    try:
        opt.step()
        res["plain_state"] = "no error"
    except RuntimeError as e:
        res["plain_state"] = str(e)
    res["plain_state_unchanged"] = torch.equal(before, w.to_local())
    only_rank0 = dist.new_group([0])  # every rank must call new_group
    try:
        GradientGuidance(torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1), reference="ema",
                         process_group=only_rank0)
        res["not_member"] = "no error"
    except ValueError as e:
        res["not_member"] = str(e)
    return res


def case_checkpoint(rank, backend):
    """torch.distributed.checkpoint round trip of the FSDP2 optimizer state (get/set_optimizer_
    state_dict + dcp.save/load), and the full (gathered) state dict against the unsharded run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from sgg_fast import SGGAdamW

    settings = group_settings("group", "ema")
    ref_model, ref_opt, _ = _unsharded(settings, backend, steps=3)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp(make_net(), mesh)
    opt = SGGAdamW(param_groups(model, settings), backend=backend)
    _steps(model, opt, rank, steps=3)
    res = {}
    full_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    fqn = dict(zip((n for n, _ in ref_model.named_parameters()), ref_model.parameters()))
    res["full_state"] = max(maxdiff(v, ref_opt.state[fqn[n]][k]) for n, st in full_sd["state"].items()
                            for k, v in st.items())
    res["full_state_keys"] = sorted({k for st in full_sd["state"].values() for k in st})
    obj = [tempfile.mkdtemp(prefix="sgg_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(obj)
    path = obj[0]
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    model2 = _fsdp(make_net(), mesh)
    opt2 = SGGAdamW(param_groups(model2, settings), backend=backend)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    res["loaded_state"] = max(maxdiff(opt2.state[p2][k], v) for p, p2 in zip(model.parameters(), model2.parameters())
                              for k, v in opt.state[p].items())
    # the running norms (one per segment, in the param groups) survive the round trip
    res["loaded_nu"] = max(maxdiff(a, b) for a, b in zip(segment_nus(opt2), segment_nus(opt)))
    res["n_nu"] = len(segment_nus(opt2))
    res["loaded_state_is_dtensor"] = all(type(opt2.state[p][k]).__name__ == "DTensor"
                                         for p in model2.parameters() for k in ("exp_avg", "exp_avg_sq", "ref"))
    for s in range(3, 5):  # both continue: identical
        for m, o in ((model, opt), (model2, opt2)):
            loss_fn(m, *batch(s, rank)).backward()
            o.step()
            o.zero_grad()
    res["continued"] = max(maxdiff(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    return res


# -- the worker -----------------------------------------------------------------------------------
def cases(backends: list[str]):
    out = []
    for b in backends:
        for gran in GRANULARITIES:
            for ref in REFERENCES:
                out.append((f"fsdp2/{b}/{gran}/{ref}", case_fsdp2, dict(backend=b, gran=gran, ref=ref)))
        out.append((f"fsdp2_no_reduce/{b}", case_fsdp2, dict(backend=b, gran="group", ref="momentum",
                                                             disable_reduce=True)))
        out.append((f"fsdp2_source/{b}", case_fsdp2_source, dict(backend=b)))
        out.append((f"fsdp2_wrapper/{b}", case_fsdp2, dict(backend=b, gran="group", ref="momentum",
                                                           wrapper=True)))
        for shape in ((2, 1), (1, 2)):
            out.append((f"hsdp/{b}/{shape[0]}x{shape[1]}", case_fsdp2,
                        dict(backend=b, gran="global", ref="ema", mesh_shape=shape)))
        out.append((f"nan/{b}", case_nan_one_rank, dict(backend=b)))
        out.append((f"ddp/{b}", case_ddp, dict(backend=b, gran="group", ref="ema")))
        for gran in ("tensor", "global"):
            out.append((f"pg/{b}/{gran}", case_process_group, dict(backend=b, gran=gran, ref="momentum")))
        out.append((f"pg_no_group/{b}", case_process_group, dict(backend=b, gran="group", ref="ema",
                                                                 use_group=False)))
        out.append((f"pg_wrapper/{b}", case_process_group, dict(backend=b, gran="group", ref="ema",
                                                                wrapper=True)))
        out.append((f"zero/{b}/tensor", case_zero, dict(backend=b, gran="tensor", with_group=False)))
        out.append((f"zero/{b}/group", case_zero, dict(backend=b, gran="group", with_group=True)))
        out.append((f"zero/{b}/group_no_pg", case_zero, dict(backend=b, gran="group", with_group=False)))
        out.append((f"zero/{b}/group_nan", case_zero, dict(backend=b, gran="group", with_group=True,
                                                           nan_step=2)))
        out.append((f"pg_idle/{b}", case_process_group_idle, dict(backend=b)))
        for shape in ((2,), (2, 1)):
            out.append((f"mixed/{b}/{len(shape)}d", case_mixed_placements, dict(backend=b, mesh_shape=shape)))
        out.append((f"mixed/{b}/1d_probe", case_mixed_placements, dict(backend=b, mesh_shape=(2,), probe=True)))
        out.append((f"fsdp2_probe/{b}", case_fsdp2, dict(backend=b, gran="tensor", ref="ema", probe=True)))
        out.append((f"errors/{b}", case_errors, dict(backend=b)))
        out.append((f"checkpoint/{b}", case_checkpoint, dict(backend=b)))
    return out


def cuda_cases(backends: list[str]):
    """GPU check (tests marked cuda): CUDA tensors, statistics all-reduced through gloo between two
    ranks sharing the one GPU (NCCL refuses two ranks on one device)."""
    out = []
    for b in backends:
        for gran in ("tensor", "global"):
            out.append((f"cuda_pg/{b}/{gran}", case_process_group,
                        dict(backend=b, gran=gran, ref="ema", device="cuda")))
        out.append((f"cuda_pg_wrapper/{b}", case_process_group,
                    dict(backend=b, gran="group", ref="momentum", wrapper=True, device="cuda")))
    return out


def worker(rank: int, port: int, backends: list[str], outdir: str, only: list[str] | None = None,
           device: str = "cpu") -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # containers whose hostname resolves elsewhere
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results: dict = {}
    path = os.path.join(outdir, f"rank{rank}.json")
    try:
        for name, fn, kwargs in (cases(backends) if device == "cpu" else cuda_cases(backends)):
            if only and not any(name.startswith(o) for o in only):
                continue
            t0 = time.perf_counter()
            try:
                res = fn(rank, **kwargs)
                res["ok"] = True
            except Exception:  # recorded; the test of this case fails with the traceback
                res = {"ok": False, "error": traceback.format_exc()}
            res["seconds"] = time.perf_counter() - t0
            results[name] = res
            with open(path + ".tmp", "w") as f:
                json.dump(results, f)
            os.replace(path + ".tmp", path)
            dist.barrier()
    finally:
        dist.destroy_process_group()
