"""One step's plan: which tensors take part, how they form segments, and their state.

:func:`build_plan` collects, from ``param_groups``, the tensors with a gradient, checks them
(before anything is mutated, so bad input never corrupts parameters or state) and orders them
segment by segment. The optimizer then attaches the state lists (``SGGAdamW._init_group``,
``GradientGuidance``'s own); backends read the plan (the groups, for per-group settings, through
``plan.groups``) and never change its lists.

Architecture of a step (DESIGN §3): params → statistics → finalize (α, β, skip) → apply.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import _ext, guidance
from .validation import SEGMENT_KEYS
from .vocabulary import GRANULARITIES, MAG_MODES, NONFINITE, REF_EMA, REF_MOMENTUM, REF_SOURCE, REFERENCES

T = TypeVar("T")

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = [
    "Segment",
    "Partials",
    "StepCache",
    "StepPlan",
    "build_plan",
    "upload",
    "PlanReuse",
    "TensorPlanReuse",
    "memo",
    "describe",
    "REFERENCES",
    "GRANULARITIES",
    "MAG_MODES",
    "NONFINITE",
    "SEGMENT_KEYS",
    "REF_MOMENTUM",
    "REF_EMA",
    "REF_SOURCE",
    "SUPPORTED_DTYPES",
]


@dataclass
class Segment:
    index: int
    label: str  # human-readable, used in error messages
    group: dict  # the param_group whose guidance settings the segment uses
    device: torch.device
    start: int  # first tensor of the segment in the plan's lists
    stop: int  # one past the last


@dataclass
class Partials:
    """Partial statistics: ``values[c] = (gg, rr, gr, pp)`` of chunk ``c``.

    Chunks are ordered by segment: segment ``s`` owns rows ``offsets[s]:offsets[s+1]``
    (host list, ``S + 1`` entries). When every segment has exactly one row the partials are
    already reduced (``is_reduced``); the distributed layer all-reduces reduced partials.
    """

    values: torch.Tensor  # [C, 4] float32 on the plan's home device
    offsets: list[int]  # [S + 1]

    @property
    def is_reduced(self) -> bool:
        return len(self.values) == len(self.offsets) - 1 and self.offsets == list(range(len(self.offsets)))


@dataclass
class StepCache:
    """What the owner of the plans (the engine; ``overlap_backward``, per parameter) keeps across
    steps, so that a step like the last one rebuilds and uploads nothing. One field per module
    that writes it; each entry holds the key it was built for next to the value."""

    #: :meth:`StepPlan.hyper`: (key, ``[S, len(HYPER_COLS)]`` tensor on the home device)
    hyper: tuple[Any, torch.Tensor] | None = None
    #: the cpp backend's per-step inputs by name (offsets, op lists, device tables)
    cpp: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    #: the triton backend's device tables (its ``_Tables``)
    triton: Any = None
    #: distributed: the slot layout last checked across ranks
    dist_layout_checked: tuple | None = None
    #: distributed: index tensors by name (slots, absent slots, sub-plan parents)
    dist_index: dict[str, tuple[Any, torch.Tensor]] = field(default_factory=dict)
    #: distributed: the caches of the sub-plans of mixed placements, by job
    dist_parts: dict[str, StepCache] = field(default_factory=dict)
    #: device tables a CUDA graph captured (:meth:`freeze`): never written or freed afterwards
    frozen: list[torch.Tensor] = field(default_factory=list)

    def freeze(self, tables: list[torch.Tensor | None]) -> None:
        """A CUDA graph is capturing a step that reads ``tables``: later changes go to new tables
        (:meth:`writable`), so that the graph keeps reading what it was captured with."""
        self.frozen.extend(t for t in tables if t is not None and not self.is_frozen(t))

    def is_frozen(self, t: torch.Tensor) -> bool:
        return any(t is f for f in self.frozen)

    def writable(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` if a new upload may overwrite it in place, else None (a new table is made)."""
        return None if t is None or self.is_frozen(t) else t


def memo(table: dict[str, tuple[Any, T]], name: str, key: Any, make: Callable[[], T]) -> T:
    """``table[name]``'s value while it was built for ``key``; else ``make()``, stored with ``key``."""
    hit = table.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    table[name] = (key, value)
    return value


@dataclass
class StepPlan:
    """The tensors of one step, ordered segment by segment (a segment's tensors are contiguous)."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    group_index: list[int] = field(default_factory=list)  # param_group of each tensor
    param_index: list[int] = field(default_factory=list)  # position in its group's params
    seg_of_param: list[int] = field(default_factory=list)  # segment of each tensor
    segments: list[Segment] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # the settings of each param_group
    # attached by the engine once the state exists
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    #: ``state["max_exp_avg_sq"]`` where the tensor's group has amsgrad=True, else None
    max_exp_avg_sqs: list[torch.Tensor | None] = field(default_factory=list)
    refs: list[torch.Tensor | None] = field(default_factory=list)  # r per tensor (None: r = 0)
    steps: list[torch.Tensor] = field(default_factory=list)
    #: per segment: float32 ``[2]`` = (ν, initialised) on ``home``; finalize reads it and writes
    #: the new value back in place (relative segments, unskipped steps only)
    seg_nus: list[torch.Tensor] = field(default_factory=list)
    #: True for GradientGuidance (the guided gradient replaces .grad; see guidance.hyper_row)
    rewrite_grad: bool = False
    cache: StepCache = field(default_factory=StepCache)  # lives across steps (the engine's)
    #: True when :class:`PlanReuse` handed this plan out again: every tensor, layout and state
    #: entry is the one checked when it was built (only ``grads`` are new objects, with the
    #: checked shapes and strides), so the per-tensor checks of the engine are not repeated
    reused: bool = False
    #: how many times :class:`PlanReuse` handed this plan out; per-step caches keyed by the plan
    #: object (e.g. the Triton tables, checked once per step) key by ``(plan, uses)`` instead
    uses: int = 0
    #: derived per-tensor lists that depend only on what a reused plan keeps (backends' memo)
    derived: dict[str, Any] = field(default_factory=dict)
    #: the backend object this plan's tensors and layouts were last checked against (by
    #: ``backends.resolve`` or its ``input_reasons``); a reused plan skips the check only for it
    checked_backend: Any = None
    _devices: list[torch.device] | None = None
    _dtypes: list[torch.dtype] | None = None

    @property
    def labels(self) -> list[str]:
        """``"param_groups[g]['params'][i]"`` of each tensor (built only when asked: errors)."""
        return [f"param_groups[{g}]['params'][{i}]" for g, i in zip(self.group_index, self.param_index)]

    def label(self, i: int) -> str:
        return f"param_groups[{self.group_index[i]}]['params'][{self.param_index[i]}]"

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def home(self) -> torch.device:
        """The device where statistics are finalized (the first tensor's)."""
        return self.params[0].device if self.params else torch.device("cpu")

    @property
    def devices(self) -> list[torch.device]:
        if self._devices is None:
            self._devices = sorted({p.device for p in self.params}, key=str)
        return self._devices

    @property
    def dtypes(self) -> list[torch.dtype]:
        if self._dtypes is None:
            self._dtypes = sorted({p.dtype for p in self.params}, key=str)
        return self._dtypes

    def memo(self, name: str, make: Callable[[], T]) -> T:
        """``make()`` once per plan: for lists that depend only on the plan's tensors and the
        structural settings of its groups (:data:`STRUCTURE_KEYS`), which a reused plan keeps."""
        hit = self.derived.get(name, _MISSING)
        if hit is _MISSING:
            hit = self.derived[name] = make()
        return hit

    def ref_mode(self, i: int) -> int:
        return REFERENCES.index(self.segments[self.seg_of_param[i]].group["reference"])

    def needs(self, key: str, value: Any) -> bool:
        """True when some segment has ``group[key] == value``."""
        return any(s.group[key] == value for s in self.segments)

    def hyper(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[S, len(HYPER_COLS)]`` guidance hyper-parameters on the home device (cached while
        unchanged: an upload only when a setting changed)."""
        rows = tuple(tuple(guidance.hyper_row(s.group, rewrite_grad=self.rewrite_grad)) for s in self.segments)
        key = (rows, self.home, dtype)
        hit = self.cache.hyper
        if hit is not None and hit[0] == key:
            return hit[1]
        t = torch.tensor(rows, dtype=dtype).reshape(len(rows), len(guidance.HYPER_COLS))
        if self.home.type == "cuda":
            t = upload(t, self.home, into=None if hit is None else self.cache.writable(hit[1]))
        self.cache.hyper = (key, t)
        return t


_MISSING = object()


def upload(host: torch.Tensor, device: torch.device, into: torch.Tensor | None = None) -> torch.Tensor:
    """``host`` on ``device`` without a host sync (pinned staging, ``non_blocking``). With
    ``into`` of the same shape, dtype and device, its contents are replaced in place instead
    (stream-ordered, after every launch queued before), so that a changed table is not a new
    allocation each step. Refused during a capture (the copy would be recorded into the graph and
    its source freed). Tables a graph captured are never passed as ``into`` (StepCache.freeze)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "sgg_fast: the tensors (addresses, sizes) or settings of the step changed during CUDA "
            "graph capture, so a device table would have to be uploaded inside the graph. Run one "
            "eager step with the same tensors and settings before capturing; for an lr schedule "
            "inside a graph, give the param_group a float32 tensor lr on the device."
        )
    same = into is not None and into.shape == host.shape and into.dtype == host.dtype and into.device == device
    if device.type != "cuda":
        return into.copy_(host) if same and into is not None else host.clone()
    staged = host.pin_memory()
    if same and into is not None:
        return into.copy_(staged, non_blocking=True)
    return staged.to(device, non_blocking=True)


#: the group settings that decide a plan's layout: which segments, which state entries, which
#: tensors the statistics read. Any other setting (lr, betas, λ, ...) is read from the group on
#: every step, so changing it does not invalidate a reused plan.
STRUCTURE_KEYS = ("granularity", "reference", "amsgrad", "mag_mode")


def _structure(groups: list[dict]) -> tuple:
    return tuple(tuple(g.get(k) for k in STRUCTURE_KEYS) for g in groups)


def _same(a: list, b: list) -> bool:
    """Element-wise identity of two lists (C speed: no Tensor.__eq__, no hashing)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _fp_fixed(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    if t.layout != torch.strided:
        return (t.layout, t.dtype, t.device, tuple(t.shape))
    return (t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset(), t.data_ptr())


def _fp_step(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    if t.layout != torch.strided:
        return (t.layout, t.dtype, t.device, tuple(t.shape))
    return (t.dtype, t.device, tuple(t.shape), t.stride())


#: below this many tensors the Python form is cheaper than one call of the compiled op
_FP_OP_MIN = 8


@_ext._outside_dynamo
def fingerprint(fixed: list, per_step: list) -> Any:
    """The layout fingerprint of a prepared step: for every tensor in ``fixed`` (parameters,
    state tensors, running norms) its dtype, device, layout, shape, strides, storage offset and
    data address; for every tensor in ``per_step`` (this step's gradients) the same without the
    address. Equal (:func:`same_fingerprint`) exactly when none of these facts changed, so a
    ``.data`` assignment, ``resize_``, ``t_()`` or a retyping of any of them changes it; values are
    not part of it. Computed at C speed by the compiled op ``sgg_layout_fingerprint`` when the
    extension is loaded (metadata only, any device, no sync), else in Python; always eagerly
    (a compiled ``opt.step`` breaks its graph here: addresses are not traceable)."""
    if len(fixed) + len(per_step) >= _FP_OP_MIN and _ext.loaded() and _has_fp_op():
        return torch.ops.sgg_fast.sgg_layout_fingerprint(fixed, per_step)
    return (tuple(map(_fp_fixed, fixed)), tuple(map(_fp_step, per_step)))


def same_fingerprint(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return not isinstance(b, torch.Tensor) and a == b


_FP_OP: list[bool] = []


def _has_fp_op() -> bool:
    if not _FP_OP:
        _FP_OP.append(hasattr(torch.ops.sgg_fast, "sgg_layout_fingerprint"))
    return _FP_OP[0]


def _state_tensors(values: list) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


class PlanReuse:
    """Last step's checked plan, handed out again while nothing it was built from has changed.

    A training loop steps the same parameters with the same state every step; only the gradient
    tensors are new (``zero_grad(set_to_none=True)``) and some settings (the lr of a scheduler)
    change. Rebuilding and re-checking the plan costs several µs per tensor in Python; this
    check costs well under one, most of it at C speed (identity of lists, tuples compared):

    * the same ``param_groups`` dicts with the same parameter lists and the same structural
      settings (:data:`STRUCTURE_KEYS`);
    * the same parameters with a gradient;
    * the same ``state`` dict with the same entries, each holding the same objects (so a
      ``load_state_dict``, ``set_reference``, ``del opt.state[p]`` or a replaced tensor rebuilds);
    * the same group-level running norms (``group["norm_ema"]``);
    * the same :func:`fingerprint` of the parameters, every state tensor and the running norms
      (dtype, device, shape, strides, storage offset, address) and of the gradients (the same
      without the address): an in-place change of any of them without a new object (``.data``
      assignment, ``resize_``, ``t_()``, retyping) rebuilds and re-checks the plan.

    Anything else — or any exception while checking — returns None and the caller builds and
    checks a new plan. Not used with a ``process_group`` or DTensor parameters (their plans are
    rewritten to local shards by :mod:`sgg_fast.distributed`).
    """

    def __init__(self, plan: StepPlan, groups: list[dict], state: dict):
        self.plan = plan
        self.groups = list(groups)
        self.group_params = [list(g["params"]) for g in groups]
        self.structure = _structure(groups)
        self.flat = [p for ps in self.group_params for p in ps]
        pos = {id(p): j for j, p in enumerate(self.flat)}
        self.order = [pos[id(p)] for p in plan.params]
        self.has_grad = [p.grad is not None for p in self.flat]
        self.state = state
        self.state_keys = list(state.keys())
        self.state_vals = list(state.values())
        self.state_flat = list(itertools.chain.from_iterable(map(dict.values, self.state_vals)))
        self.group_nus = [(g, g.get("norm_ema")) for g in groups]
        self.pick = operator.itemgetter(*self.order) if len(self.order) > 1 else None
        self.fixed = (
            list(plan.params) + _state_tensors(self.state_flat) + _state_tensors([n for _, n in self.group_nus])
        )
        self.fp = fingerprint(self.fixed, plan.grads)

    def reuse(self, groups: list[dict], state: dict) -> StepPlan | None:
        """The plan of this step if nothing above changed (its ``grads`` set to the new
        gradients, ``reused`` True), else None."""
        try:
            return self._reuse(groups, state)
        except Exception:  # e.g. a sparse gradient (no strides), a non-dict state entry
            return None

    def _reuse(self, groups: list[dict], state: dict) -> StepPlan | None:
        if not _same(groups, self.groups) or state is not self.state:
            return None
        for g, ps in zip(groups, self.group_params):
            if not _same(g["params"], ps):
                return None
        if _structure(groups) != self.structure:
            return None
        grads_all = [p.grad for p in self.flat]
        if [g is not None for g in grads_all] != self.has_grad:
            return None
        plan = self.plan
        grads = list(self.pick(grads_all)) if self.pick is not None else [grads_all[j] for j in self.order]
        if len(state) != len(self.state_keys) or not _same(list(state.keys()), self.state_keys):
            return None
        vals = list(state.values())
        if not _same(vals, self.state_vals):
            return None
        if not _same(list(itertools.chain.from_iterable(map(dict.values, vals))), self.state_flat):
            return None
        for g, nu in self.group_nus:
            if g.get("norm_ema") is not nu:
                return None
        if not same_fingerprint(fingerprint(self.fixed, grads), self.fp):
            return None
        plan.grads = grads
        plan.reused = True
        plan.uses += 1
        return plan


class TensorPlanReuse:
    """One parameter's one-tensor plan (``overlap_backward``'s hooks), handed out again while
    nothing it was built from has changed: :class:`PlanReuse` for a plan of one tensor, whose
    other tensors' gradients are not looked at (in a hook, some of them are not final yet).

    Checked: the same ``param_groups[gi]`` dict holding ``p`` at position ``pi`` with the same
    structural settings; the same ``state`` dict whose entry for ``p`` is the same dict with the
    same keys and the same objects (so ``load_state_dict``, ``set_reference`` or a replaced
    tensor rebuilds); the same :func:`fingerprint` of ``p``, its state tensors and the gradient.
    Anything else, or any exception while checking, returns None.
    """

    __slots__ = ("plan", "group", "gi", "pi", "structure", "state", "entry", "keys", "vals", "fixed", "fp")

    def __init__(self, plan: StepPlan, groups: list[dict], state: dict):
        p = plan.params[0]
        self.plan = plan
        self.gi, self.pi = plan.group_index[0], plan.param_index[0]
        self.group = groups[self.gi]
        self.structure = _structure([self.group])
        self.state = state
        self.entry = state.get(p)
        self.keys = None if self.entry is None else tuple(self.entry)
        self.vals = None if self.entry is None else list(self.entry.values())
        self.fixed = [p] + _state_tensors(self.vals or [])
        self.fp = fingerprint(self.fixed, plan.grads)

    def reuse(self, p: torch.Tensor, g: torch.Tensor, groups: list[dict], state: dict) -> StepPlan | None:
        """The plan with ``grads = [g]`` (``reused`` True) if nothing above changed, else None."""
        try:
            return self._reuse(p, g, groups, state)
        except Exception:  # e.g. a sparse gradient (no strides)
            return None

    def _reuse(self, p, g, groups, state) -> StepPlan | None:
        group = self.group
        if self.gi >= len(groups) or groups[self.gi] is not group or state is not self.state:
            return None
        ps = group["params"]
        if self.pi >= len(ps) or ps[self.pi] is not p:
            return None
        if _structure([group]) != self.structure:
            return None
        entry = state.get(p)
        if entry is not self.entry:
            return None
        if (
            entry is not None
            and self.vals is not None
            and (tuple(entry) != self.keys or not _same(list(entry.values()), self.vals))
        ):
            return None
        if not same_fingerprint(fingerprint(self.fixed, [g]), self.fp):
            return None
        plan = self.plan
        plan.grads = [g]
        plan.reused = True
        plan.uses += 1
        return plan


def describe(p: torch.Tensor) -> str:
    """``shape (…), dtype, device`` of a tensor, for error messages."""
    return f"shape {tuple(p.shape)}, {str(p.dtype).replace('torch.', '')}, {p.device}"


def _reject(owner: str, where: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """Raise the error that says what is wrong with this parameter/gradient and what to do.
    Called only when a cheap check failed, so the messages cost nothing on normal steps."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(
            f"{owner} does not support sparse gradients: {where} has a {g.layout} gradient. "
            "Use torch.optim.SparseAdam for sparse embeddings, or nn.Embedding(sparse=False)."
        )
    if torch.is_complex(p) or torch.is_complex(g):
        raise RuntimeError(
            f"{owner} does not support complex parameters: {where}. Optimize torch.view_as_real(param) instead."
        )
    if p.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"{owner} supports float32, bfloat16, float16 and float64 parameters; {where} is not.")
    raise RuntimeError(
        f"{owner}: the gradient of {where} has shape {tuple(g.shape)}, {g.dtype}, {g.device}; "
        "it must match its parameter's shape, dtype and device."
    )


def check_grad(owner: str, gi: int, pi: int, p: torch.Tensor, g: torch.Tensor) -> None:
    """Raise the clear error of :func:`_reject` when gradient ``g`` of ``param_groups[gi]['params'][pi]``
    cannot be stepped (sparse, complex, unsupported dtype, or not shaped like its parameter)."""
    if (
        g.layout != torch.strided
        or torch.is_complex(p)
        or torch.is_complex(g)
        or p.dtype not in SUPPORTED_DTYPES
        or g.shape != p.shape
        or g.dtype != p.dtype
        or g.device != p.device
    ):
        _reject(owner, f"param_groups[{gi}]['params'][{pi}] ({describe(p)})", p, g)


def build_plan(
    param_groups: list[dict], owner: str = "SGGAdamW", cache: StepCache | None = None, rewrite_grad: bool = False
) -> StepPlan:
    """Collect the tensors with a gradient into segments and check them.

    Raises ``RuntimeError`` / ``ValueError`` with what is wrong and what to do for sparse or
    complex gradients, unsupported dtypes and a segment spanning devices (the settings were
    checked by :mod:`sgg_fast.validation`). Parameters whose ``.grad`` is None take no part.
    """
    plan = StepPlan(groups=param_groups, cache=cache if cache is not None else StepCache(), rewrite_grad=rewrite_grad)
    has_global = False
    global_members: list[tuple[int, int, torch.Tensor]] = []
    pending: list[tuple[str, dict, list[tuple[int, int, torch.Tensor]]]] = []

    for gi, group in enumerate(param_groups):
        members = []
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            check_grad(owner, gi, pi, p, g)
            members.append((gi, pi, p))
        if group["granularity"] == "global":
            if not has_global:
                has_global = True
                pending.append(("global", group, global_members))
            global_members.extend(members)
        elif group["granularity"] == "tensor":
            for m in members:
                pending.append((f"param_groups[{m[0]}]['params'][{m[1]}]", group, [m]))
        else:
            pending.append((f"param_groups[{gi}]", group, members))

    for label, group, members in pending:
        if not members:
            continue
        devs = {p.device for _, _, p in members}
        if len(devs) > 1:
            raise RuntimeError(
                f"{owner}: {label} holds parameters on several devices ({', '.join(sorted(map(str, devs)))}); "
                "one segment's statistics are reduced on one device. Put them in separate param_groups "
                "with granularity='group', or use granularity='tensor'."
            )
        seg = Segment(
            len(plan.segments), label, group, members[0][2].device, len(plan.params), len(plan.params) + len(members)
        )
        plan.segments.append(seg)
        for gi, pi, p in members:
            assert p.grad is not None  # members are the parameters with a gradient (above)
            plan.params.append(p)
            plan.grads.append(p.grad)
            plan.group_index.append(gi)
            plan.seg_of_param.append(seg.index)
            plan.param_index.append(pi)
    return plan
