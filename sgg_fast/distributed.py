"""Exact SGG statistics across processes: FSDP2 / DTensor parameters, DDP, explicit process groups.

DESIGN §3 "Distributed". SGG's α, β and skip decision depend on per-segment sums over *all*
elements of a segment (``gg = Σg², rr = Σr², gr = Σg·r, pp = Σp²``). When a segment's elements
are spread over several processes, each rank computes the sums over the elements it holds, and
one all-reduce (SUM) of the ``[n_slots, 4]`` per-segment sums runs before finalize::

    stats[s] = Σ_ranks Σ_{local elements of s} (g², r², g·r, p²)

so α, β, the skip flag, ``norm_ema`` and ``last_stats()`` are identical on every rank and equal
(up to the order of floating-point summation) to those of one process holding the whole model.
Planning, statistics and the AdamW update run on the LOCAL shards (``DTensor.to_local()``: views
of the shards, written in place); the optimizer state stays a DTensor laid out like its
parameter, as ``torch.optim.AdamW`` keeps it, so FSDP2 state-dict tooling
(``torch.distributed.checkpoint``, ``get_optimizer_state_dict``) sees what it expects.

Which ranks a tensor's statistics are summed over:

* **DTensor parameters** (FSDP2 ``fully_shard``, HSDP, tensor parallel): the mesh dimensions on
  which the parameter is sharded (``Shard`` / ``_StridedShard`` placements, dimensions of size
  > 1). A ``Replicate`` dimension holds copies and is not summed (HSDP's replicate dimension:
  the gradients there are already averaged by FSDP2). When the tensors of one mesh are sharded
  on different sets ``D_i`` of its dimensions (e.g. TP-sharded weights next to TP-replicated
  norms), the sum runs over the union ``U`` and tensor ``i`` is counted only on the ranks whose
  coordinate is 0 along ``U \\ D_i``, so that every element is counted exactly once. ``Partial``
  placements (unreduced gradients) are rejected.
* **Plain tensors with** ``process_group=pg``: summed over ``pg`` (manual sharding: each rank
  holds a slice of every segment).
* **Plain tensors without** ``process_group``: not summed (one process; or DDP, where every rank
  holds the whole, already averaged gradient).

**Slots.** The all-reduced tensor has one row per *slot*, a segment position that depends only
on ``param_groups`` (one per ``"group"`` group, one per tensor of a ``"tensor"`` group, one
shared ``"global"`` slot), not on which tensors this rank holds or which have gradients: its
shape is the same on every rank even when a rank holds no tensor of some group (e.g.
``ZeroRedundancyOptimizer`` partitions). That layout is checked across ranks (one tiny
collective and host sync) the first time it is seen, and a mismatch raises on every rank. If a
slot that this rank does not hold is non-finite, this rank's statistics are marked non-finite
too (column ``pp``), so that every rank skips the step.

**Stage order.** ``backend.stats(plan)`` runs exactly once per step on the whole (local) plan,
as the last statistics call before finalize and apply, whatever the layout (see
:class:`StatsSync`), so a backend may keep per-plan state between its stages.

**Cost.** One all-reduce of ``n_slots × 4`` fp32 values per step (``16·n_slots`` bytes per rank;
fp64 when parameters are fp64) per mesh dimension summed over: one for FSDP2 and HSDP, none for
DDP or HSDP with a shard dimension of size 1; tensors on several meshes take one per mesh. No
host sync (NCCL enqueues it on the current stream). Host work: taking the local shards, a few
µs per DTensor parameter. The first step (and any change of ``param_groups``) adds one tiny
layout check with a host sync.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass

from . import guidance as G
from .plan import Partials, Segment, StepCache, StepPlan, memo
from .vocabulary import dtensor_type, is_dtensor

__all__ = ["check_process_group", "is_dtensor", "like_param", "prepare", "idle_step", "StatsSync"]


# -- helpers --------------------------------------------------------------------------------------
def _all_reduce(buf: torch.Tensor, group) -> None:
    """The collective of a step: ``buf`` summed in place over ``group`` (NCCL: enqueued on the
    current stream, no host sync). A module function so that tests can count or remove it."""
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)


def check_process_group(process_group: Any, owner: str):
    """Validate the ``process_group=`` argument; returns a ``ProcessGroup`` or None.

    Accepts None (no reduction of plain tensors), a ``torch.distributed.ProcessGroup`` (e.g.
    ``dist.group.WORLD`` or ``dist.new_group(ranks)``) or a 1-D ``DeviceMesh`` (its group).
    """
    if process_group is None:
        return None
    if not torch.distributed.is_available():
        raise RuntimeError(
            f"{owner}: process_group= was given but this PyTorch build has no "
            "torch.distributed; drop process_group or install a build with it."
        )
    import torch.distributed as dist

    not_member = ValueError(
        f"{owner}: this rank is not a member of the process_group; pass the group "
        "of ranks that hold slices of this optimizer's tensors (this rank included)."
    )
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise not_member  # what dist.new_group returns on ranks outside the group
    mesh_cls = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    if mesh_cls is not None and isinstance(process_group, mesh_cls):
        if process_group.ndim != 1:
            raise ValueError(
                f"{owner}: process_group= got a {process_group.ndim}-D DeviceMesh; pass a "
                "1-D mesh (e.g. mesh['dp']) or a ProcessGroup: the ranks holding slices "
                "of the same tensors."
            )
        process_group = process_group.get_group()
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{owner}: process_group must be a torch.distributed.ProcessGroup (e.g. "
            "dist.group.WORLD or dist.new_group(ranks)), a 1-D DeviceMesh or None, got "
            f"{type(process_group).__name__}."
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{owner}: process_group= needs torch.distributed to be initialised; call "
            "dist.init_process_group(...) before creating the optimizer."
        )
    if dist.get_rank(process_group) < 0:
        raise not_member
    return process_group


def like_param(ref: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A copy of ``ref`` laid out like ``param`` (for ``set_reference``).

    For a DTensor parameter: a full plain tensor (the same on every rank) is cut into this rank's
    shard without communication; a DTensor laid out differently is redistributed (a collective:
    call ``set_reference`` on every rank). For a plain parameter: a DTensor is gathered.
    """
    ref = ref.detach()
    if not is_dtensor(param):
        if is_dtensor(ref):
            ref = ref.full_tensor()
        out = torch.empty_like(param, memory_format=torch.preserve_format)  # the parameter's layout
        return out.copy_(ref)
    mesh, placements = param.device_mesh, tuple(param.placements)
    if is_dtensor(ref):
        if ref.device_mesh != mesh or tuple(ref.placements) != placements:
            ref = ref.redistribute(mesh, placements)
        local = ref.to_local()
    else:
        from torch.distributed.tensor import distribute_tensor

        full = ref.to(device=param.device, dtype=param.dtype)
        try:  # each rank holds the full tensor: cut the local shard, no communication
            local = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
        except TypeError:  # older torch: scatter from rank 0
            local = distribute_tensor(full, mesh, placements).to_local()
    out = torch.zeros_like(param, memory_format=torch.preserve_format)
    assert is_dtensor(out)  # zeros_like of a DTensor is one (torch's stubs say Tensor)
    out.to_local().copy_(local)
    return out


def _stat_dtype(plan: StepPlan) -> torch.dtype:
    # as the reference backend: float64 statistics when some parameter is float64
    return torch.float64 if torch.float64 in plan.dtypes else torch.float32


def _slot_layout(plan: StepPlan, params: list[torch.Tensor]) -> tuple[list[int], int, int]:
    """``(slot of each segment, number of slots, layout signature)`` from ``plan.groups``.

    ``params``: the plan's parameters as given (before localisation), to find a tensor's
    position in its group for ``granularity="tensor"``.
    """
    base: list[int] = []
    n = 0
    global_slot = None
    struct = []
    for g in plan.groups:
        gran = g["granularity"]
        if gran == "global":
            if global_slot is None:
                global_slot, n = n, n + 1
            base.append(global_slot)
            struct.append("G")
        elif gran == "tensor":
            base.append(n)
            n += len(g["params"])
            struct.append(f"T{len(g['params'])}")
        else:
            base.append(n)
            n += 1
            struct.append("g")
    positions: dict[int, dict[int, int]] = {}
    seg_slot = []
    for seg in plan.segments:
        gi = plan.group_index[seg.start]
        gran = seg.group["granularity"]
        if gran == "global":
            assert global_slot is not None  # set above for the global groups
            seg_slot.append(global_slot)
        elif gran == "tensor":
            if gi not in positions:
                positions[gi] = {id(p): k for k, p in enumerate(plan.groups[gi]["params"])}
            seg_slot.append(base[gi] + positions[gi][id(params[seg.start])])
        else:
            seg_slot.append(base[gi])
    sig = zlib.crc32(",".join(struct).encode())
    return seg_slot, n, sig


def _check_layout(groups: list, n_slots: int, sig: int, device: torch.device, owner: str, cache: StepCache) -> None:
    """Every rank must all-reduce the same slot layout: check it once per layout (syncs)."""
    key = (tuple(id(g) for g in groups), n_slots, sig)
    if cache.dist_layout_checked == key:
        return
    import torch.distributed as dist

    for group in groups:
        t = torch.tensor([n_slots, sig, -n_slots, -sig], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        hi_n, hi_sig, lo_n, lo_sig = t.tolist()
        if (hi_n, -lo_n, hi_sig, -lo_sig) != (n_slots, n_slots, sig, sig):
            raise RuntimeError(
                f"{owner}: the ranks that share statistics disagree about the segment layout (this rank: "
                f"{n_slots} slots; the group: between {-lo_n} and {hi_n}). Every rank must hold the same "
                "param_groups with the same granularity and, for granularity='tensor', the same number "
                "of tensors per group in the same order (a slice of each). With "
                "ZeroRedundancyOptimizer and granularity='tensor' each tensor is whole on one rank: "
                "do not pass process_group there."
            )
    cache.dist_layout_checked = key


def _idle_device(group) -> torch.device:
    import torch.distributed as dist

    name = str(dist.get_backend(group))
    if "nccl" in name and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- localisation ---------------------------------------------------------------------------------
def _localize(plan: StepPlan, i: int, DT, owner: str, seen: dict):
    """Replace tensor ``i``'s DTensors in the plan by their local shards; return (mesh, placements).

    ``seen``: per-step memo of the parameter layouts already checked."""
    p = plan.params[i]
    assert is_dtensor(p)  # called for the DTensor parameters only
    label = plan.label(i)
    mesh, pl = p.device_mesh, p.placements
    if not isinstance(pl, tuple):
        pl = tuple(pl)
    if (id(mesh), pl) not in seen and any(x.is_partial() for x in pl):
        raise RuntimeError(
            f"{owner}: {label} is a DTensor with a Partial placement {pl}; SGG needs "
            "parameters sharded (Shard) or replicated (Replicate)."
        )
    memo: dict[int, torch.Tensor] = {}

    def local(t, what):
        if t is None:
            return None
        if id(t) in memo:
            return memo[id(t)]
        if not isinstance(t, DT):
            raise RuntimeError(
                f"{owner}: {what} of {label} is a plain tensor of shape {tuple(t.shape)}, but the "
                f"parameter is a DTensor ({pl} on {mesh}). SGG updates local shards and needs every "
                "per-parameter tensor sharded like its parameter. Load FSDP2 optimizer state with "
                "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict (not a full, "
                "unsharded state dict), and pass references through set_reference()."
            )
        t_mesh, t_pl = t.device_mesh, t.placements
        # identity first: FSDP2's gradients and state share their parameter's mesh and placements
        if not ((t_mesh is mesh or t_mesh == mesh) and (t_pl is pl or tuple(t_pl) == pl)):
            hint = (
                " Partial means the gradient was not reduced yet: step after backward() with "
                "gradient synchronisation on (FSDP2: set_requires_gradient_sync(True) on the last "
                "micro-batch)."
                if any(x.is_partial() for x in t.placements)
                else ""
            )
            raise RuntimeError(
                f"{owner}: {what} of {label} has placements {tuple(t.placements)} on {t.device_mesh}, "
                f"its parameter {pl} on {mesh}; SGG works on local shards, which must line up element "
                f"by element.{hint}"
            )
        memo[id(t)] = out = t.to_local()
        return out

    plan.grads[i] = local(plan.grads[i], "the gradient")
    for lst, what in (
        (plan.exp_avgs, "state['exp_avg']"),
        (plan.exp_avg_sqs, "state['exp_avg_sq']"),
        (plan.refs, "the reference direction"),
    ):
        if i < len(lst):
            lst[i] = local(lst[i], what)
    plan.params[i] = p.to_local()
    seen[(id(mesh), pl)] = True
    return mesh, pl


@dataclass
class _Part:
    """Statistics of some plan tensors computed on a sub-plan: to subtract from the whole plan's
    rows and, unless ``job`` is None (replicated copies counted elsewhere), add to ``job``'s."""

    job: int | None
    sub: StepPlan
    parents: torch.Tensor  # [S_sub] segment of the whole plan of each sub-plan segment
    slots: torch.Tensor  # [S_sub] their slots


class StatsSync:
    """One step's cross-rank statistics: local stats → reduce → all-reduce(SUM) → ``[S, 4]``.

    ``backend.stats(plan)`` runs exactly once per step on the whole plan, as the last statistics
    call before finalize and apply (a backend may keep per-plan state between its stats and apply
    stages). When the tensors of one step are summed over different groups (mixed placements, or
    DTensors next to plain tensors), the minority sets run on sub-plans first and are subtracted
    from the whole plan's rows: ``main = whole - Σ parts`` (exact up to rounding of the order of
    ``eps·|part|``; a non-finite part stays non-finite, so the skip decision is unchanged).
    """

    def __init__(
        self,
        groups: list[list],
        main: int,
        parts: list[_Part],
        seg_slot: torch.Tensor,
        n_slots: int,
        identity: bool,
        absent: torch.Tensor | None,
        dtype: torch.dtype,
    ):
        self.groups, self.main, self.parts = groups, main, parts
        self.seg_slot, self.n_slots = seg_slot, n_slots
        self.identity, self.absent, self.dtype = identity, absent, dtype

    def stats(self, plan: StepPlan, backend) -> Partials:
        """Reduced partials (one row per segment of ``plan``), summed over the ranks."""
        S = plan.num_segments
        home = plan.home
        part_rows = [
            backend.reduce(p.sub, backend.stats(p.sub)).values.to(device=home, dtype=self.dtype) for p in self.parts
        ]
        rows = backend.reduce(plan, backend.stats(plan)).values.to(self.dtype)
        if len(self.groups) == 1 and not self.parts and self.identity:
            # the common case (FSDP2: every rank holds a shard of every segment): all-reduce in place
            buf = rows.contiguous()
            for group in self.groups[0]:
                _all_reduce(buf, group)
            return Partials(buf, list(range(S + 1)))
        if self.parts:
            rows = rows.clone()
            for p, r in zip(self.parts, part_rows):
                rows.index_add_(0, p.parents, r, alpha=-1)
        total: torch.Tensor | None = None
        for k, groups in enumerate(self.groups):
            buf = torch.zeros(self.n_slots, 4, dtype=self.dtype, device=home)
            if k == self.main:
                buf.index_add_(0, self.seg_slot, rows)
            for p, r in zip(self.parts, part_rows):
                if p.job == k:
                    buf.index_add_(0, p.slots, r)
            for group in groups:
                _all_reduce(buf, group)
            total = buf if total is None else total.add_(buf)
        assert total is not None  # prepare() builds a StatsSync only with at least one job
        out = total.index_select(0, self.seg_slot)
        if self.absent is not None:
            # a non-finite slot that this rank does not hold must skip the step here too
            ok = torch.isfinite(total.index_select(0, self.absent)).all()
            out[:, G.PP] = torch.where(ok, out[:, G.PP], torch.full_like(out[:, G.PP], float("nan")))
        return Partials(out, list(range(S + 1)))


def _subplan(plan: StepPlan, idx: list[int], cache: StepCache) -> tuple[StepPlan, list[int]]:
    """A plan of the tensors ``idx`` (ascending), with segments renumbered; and each new segment's
    parent segment."""
    sub = StepPlan(groups=plan.groups, cache=cache, rewrite_grad=plan.rewrite_grad)
    parents: list[int] = []
    names = (
        "params",
        "grads",
        "group_index",
        "param_index",
        "exp_avgs",
        "exp_avg_sqs",
        "max_exp_avg_sqs",
        "refs",
        "steps",
    )
    for i in idx:
        s = plan.seg_of_param[i]
        if not parents or parents[-1] != s:
            par = plan.segments[s]
            sub.segments.append(
                Segment(len(sub.segments), par.label, par.group, par.device, len(sub.params), len(sub.params))
            )
            parents.append(s)
        sub.segments[-1].stop += 1
        sub.seg_of_param.append(len(sub.segments) - 1)
        for name in names:
            src = getattr(plan, name)
            if i < len(src):
                getattr(sub, name).append(src[i])
    if plan.seg_nus:  # each sub-segment reads its parent's running norm slot
        sub.seg_nus = [plan.seg_nus[s] for s in parents]
    return sub, parents


def prepare(plan: StepPlan, process_group, owner: str) -> StatsSync | None:
    """Make ``plan`` local and say how its statistics are summed across ranks.

    Replaces every DTensor in the plan's lists by its local shard (in place; checks that the
    gradient and the state are laid out like the parameter) and returns a :class:`StatsSync`, or
    None when nothing needs summing (one process, DDP, HSDP with unsharded shard dimension):
    then the step is exactly the single-process one. Mutates no tensor.
    """
    DT = dtensor_type()
    P = len(plan.params)
    dt_mask = [isinstance(p, DT) for p in plan.params] if DT is not None else [False] * P
    has_dt = any(dt_mask)
    if process_group is None and not has_dt:
        return None
    if process_group is not None and has_dt:
        first = plan.label(dt_mask.index(True))
        raise ValueError(
            f"{owner}: process_group= is for plain tensors sliced by hand, but {first} is a DTensor "
            "(FSDP2 / tensor parallel): its statistics are summed over the mesh dimensions it is "
            "sharded on automatically. Drop process_group."
        )
    original = list(plan.params)
    seg_slot, n_slots, sig = _slot_layout(plan, original)

    # domains: one per mesh (or the process group); plain tensors without a group: local
    domains: dict[int, dict] = {}  # id(mesh or group) -> {"mesh", "group", "members": [(i, dims)]}
    local_idx: list[int] = []
    seen: dict = {}
    summed_dims: dict = {}
    for i in range(P):
        if dt_mask[i]:
            mesh, pl = _localize(plan, i, DT, owner, seen)
            dims = summed_dims.get((id(mesh), pl))
            if dims is None:
                dims = summed_dims[(id(mesh), pl)] = frozenset(
                    d for d, x in enumerate(pl) if x.is_shard() and mesh.size(d) > 1
                )
            dom = domains.setdefault(id(mesh), {"mesh": mesh, "group": None, "members": []})
            dom["members"].append((i, dims))
        elif process_group is not None:
            dom = domains.setdefault(id(process_group), {"mesh": None, "group": process_group, "members": []})
            dom["members"].append((i, frozenset({0})))
        else:
            if is_dtensor(plan.grads[i]):
                raise RuntimeError(
                    f"{owner}: the gradient of {plan.label(i)} is a DTensor but the "
                    "parameter is not; shard both the same way (e.g. fully_shard)."
                )
            local_idx.append(i)

    jobs: list[tuple[list[int], list]] = []  # (tensors counted here, groups summed over)
    inactive: list[int] = []  # replicated copies counted on another rank
    for dom in domains.values():
        if dom["mesh"] is None:
            jobs.append(([i for i, _ in dom["members"]], [dom["group"]]))
            continue
        mesh = dom["mesh"]
        union = frozenset().union(*(d for _, d in dom["members"]))
        coord = mesh.get_coordinate()
        # a tensor replicated along a summed dimension counts on coordinate 0 of it only
        idx: list[int] = []
        for i, dims in dom["members"]:
            (idx if all(coord[d] == 0 for d in union - dims) else inactive).append(i)
        jobs.append((idx, [mesh.get_group(d) for d in sorted(union)]))
    if local_idx:
        jobs.append((local_idx, []))

    if all(not groups for _, groups in jobs):
        return None  # e.g. HSDP with a shard dimension of size 1: the local statistics are the whole
    home = plan.home
    groups_used = [g for _, groups in jobs for g in groups]
    _check_layout(list(dict.fromkeys(groups_used)), n_slots, sig, home, owner, plan.cache)

    identity = n_slots == plan.num_segments and seg_slot == list(range(n_slots))
    seg_slot_t = _cached_index(plan, "seg_slot", seg_slot, home)
    present = set(seg_slot)
    absent = [k for k in range(n_slots) if k not in present]
    absent_t = _cached_index(plan, "absent", absent, home) if absent else None

    # the job with the most local elements takes the whole plan's rows minus the others
    numel = [sum(plan.params[i].numel() for i in idx) for idx, _ in jobs]
    main = max(range(len(jobs)), key=lambda k: (numel[k], -k))
    parts = []
    for k, idx in [(k, idx) for k, (idx, _) in enumerate(jobs) if k != main] + [(None, inactive)]:
        if not idx:
            continue
        name = f"part:{'inactive' if k is None else k}"
        sub, parents = _subplan(plan, idx, plan.cache.dist_parts.setdefault(name, StepCache()))
        parts.append(
            _Part(
                k,
                sub,
                _cached_index(plan, f"{name}:parents", parents, home),
                _cached_index(plan, f"{name}:slots", [seg_slot[s] for s in parents], home),
            )
        )
    return StatsSync(
        [groups for _, groups in jobs], main, parts, seg_slot_t, n_slots, identity, absent_t, _stat_dtype(plan)
    )


def _cached_index(plan: StepPlan, name: str, values: list[int], device: torch.device) -> torch.Tensor:
    return memo(
        plan.cache.dist_index, name, (tuple(values), device), lambda: torch.tensor(values, dtype=torch.int64).to(device)
    )


def idle_step(plan: StepPlan, process_group, owner: str) -> None:
    """A step on a rank with no gradient to process: take part in the collectives of the others.

    Needed only with ``process_group=`` (e.g. a ZeroRedundancyOptimizer rank that owns no tensor
    with a gradient); DTensor plans are the same on every rank.
    """
    if process_group is None:
        return
    _, n_slots, sig = _slot_layout(plan, [])
    device = _idle_device(process_group)
    _check_layout([process_group], n_slots, sig, device, owner, plan.cache)
    _all_reduce(torch.zeros(n_slots, 4, dtype=_stat_dtype(plan), device=device), process_group)
