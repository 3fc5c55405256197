"""Adapter for the Triton backend (the kernels in ``kernels/``, installed as ``sgg_fast.kernels``).

One step is three kernel launches whatever the number of tensors (DESIGN §3): statistics (one
multi-tensor launch, per-chunk partials), finalize (one program per tile of segments:
fixed-order segment sums, α, β, ν and the stats row; the last program to finish writes the
global skip) and apply (one multi-tensor launch: guided AdamW, or the in-place
``g ← α·g + β·r`` of GradientGuidance). Each segment's ``(norm_ema, initialised)`` (a float32 [2]
tensor, ``plan.seg_nus``) is read and written back by finalize through its address, so relative
mode adds no launch either.

Host work per step is O(number of tensors): the addresses of every tensor are collected and
compared with the cached tables (``plan.cache.triton``); only when they changed (e.g. new
gradients after ``zero_grad(set_to_none=True)``) is the int64 table rebuilt and copied to the
device (pinned memory, ``non_blocking``: no host sync). The chunk table, the segment table and the
per-group hyper-parameter table are rebuilt only when their contents change.

Serves CUDA tensors. Under ``TRITON_INTERPRET=1`` (set before triton is imported) it serves CPU
tensors instead, through Triton's interpreter — for the tests; never picked by ``"auto"`` there.
Triton is imported lazily, on the first step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import weakref
from collections.abc import Sequence

import torch

from .. import guidance as G
from ..plan import REF_EMA, REFERENCES, StepPlan, describe, upload
from . import register
from .base import Backend, Partials

_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: chunk size override (elements, a multiple of the kernels' BLOCK); None: the kernels' default
CHUNK_OVERRIDE: int | None = None


def interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """Import the kernel modules (and so triton) on first use."""
    from sgg_fast.kernels import apply as kapply
    from sgg_fast.kernels import layout
    from sgg_fast.kernels import stats as kstats

    return kstats, kapply, layout


_SM_COUNT: dict = {}


def _sm_count(dev: torch.device) -> int:
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


class _Tables:
    """Per-optimizer cache of the device tables (lives in ``plan.cache.triton``)."""

    def __init__(self):
        self.struct_key = None  # what the chunk table / static columns were built for
        self.ptrs = None  # the addresses the device meta table holds
        self.meta_host = None  # int64 [P, META_COLS] host copy (mutated in place)
        self.meta = None  # device copy
        self.chunks = None  # int64 [C, 2] on the device
        self.seg_offsets = None  # host list [S + 1]: first chunk of each segment
        self.partials = None  # float32 [C, 4] on the device
        self.steps_old = None  # float32 [P] on the device
        self.dt = None  # common element type code, or DT_MIXED
        self.aligned = False  # some tensor is 16-byte aligned (compile the vector path)
        self.amsgrad = False  # some tensor has a max_exp_avg_sq (compile the amsgrad path)
        self.flags = None  # int64 [P] FLAGS without F_ALIGNED (host)
        self.chunk = None
        self.hyper_key = None
        self.hyper = None  # float32 [NG, HYP_COLS] on the device
        self.segs = {}  # "chunks" / "reduced" -> int64 [S, SEG_COLS] on the device
        self.plan = None  # weakref to the plan the tables were last validated for
        self.plan_uses = -1  # and its StepPlan.uses then (a reused plan is a new step)
        self.sync = None  # finalize's int32 workspace on the device (zero between launches)
        self.seg_keys = {}  # what segs[name] was built for

    def tables(self) -> list[torch.Tensor | None]:
        """The tables whose contents encode the step (addresses, sizes, settings)."""
        return [self.meta, self.chunks, self.hyper, *self.segs.values()]


def _put(plan: StepPlan, old: torch.Tensor | None, host: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """The device table holding ``host``: ``old`` updated in place, unless a CUDA graph captured
    it (then a new table; the graph keeps reading the old one, which stays alive in the cache)."""
    return upload(host, dev, into=plan.cache.writable(old))


def _device_lr(lr, dev: torch.device | None) -> bool:
    """``lr`` is a tensor the apply kernel can read on ``dev``: one float32 element there."""
    return (
        isinstance(lr, torch.Tensor)
        and lr.numel() == 1
        and lr.dtype == torch.float32
        and dev is not None
        and lr.device == dev
    )


def _params_device(group: dict) -> torch.device | None:
    params = group.get("params") or []
    return params[0].device if params else None


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # preferred on CUDA; never picked by "auto" for CPU tensors (the interpreter is for tests)
    auto_priority = {"cuda": 10}
    device_skip = True
    #: one flat index walks a parameter, its gradient, state and reference (same strides)
    same_layout = True
    #: per tensor: meta column VM holds the address of max_exp_avg_sq (0: amsgrad off)
    amsgrad = True

    @property
    def description(self) -> str:  # type: ignore[override]
        if interpreting():
            return (
                "Triton kernels through TRITON_INTERPRET=1 on CPU tensors (slow: for tests; "
                "unset it for CUDA tensors); 3 launches per step"
            )
        return (
            "Triton multi-tensor kernels on CUDA: 3 launches per step (statistics, finalize, "
            "apply); CPU tensors only through TRITON_INTERPRET=1, for tests"
        )

    @property
    def device_types(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cpu",) if interpreting() else ("cuda",)

    def unavailable_reasons(self) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton, or sgg_fast[triton])"]
        if interpreting():
            return []
        if not torch.cuda.is_available():
            return [
                "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors through "
                "Triton's interpreter: slow, for tests)"
            ]
        return []

    def not_supported_reasons(self, plan: StepPlan) -> list[str]:
        reasons = super().not_supported_reasons(plan)
        if interpreting() and any(d.type == "cuda" for d in plan.devices):
            reasons.append("TRITON_INTERPRET=1 runs kernels on the host: unset it for CUDA tensors")
        reasons.extend(self._tensor_problems(plan, limit=3))
        return reasons

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def _tensor_problems(plan: StepPlan, limit: int | None = None) -> list[str]:
        """What about the plan's tensors these kernels cannot handle (contiguity, dtypes)."""
        out: list[str] = []
        P = len(plan.params)

        def add(msg):
            out.append(msg)
            return limit is not None and len(out) >= limit

        lists: list[tuple[str, Sequence[torch.Tensor | None]]] = [("parameter", plan.params), ("gradient", plan.grads)]
        if len(plan.exp_avgs) == P:
            lists += [("exp_avg", plan.exp_avgs), ("exp_avg_sq", plan.exp_avg_sqs)]
        if len(plan.max_exp_avg_sqs) == P:
            lists.append(("max_exp_avg_sq", plan.max_exp_avg_sqs))
        if len(plan.refs) == P:
            lists.append(("reference", plan.refs))
        for what, ts in lists:
            for i, t in enumerate(ts):
                if t is None:
                    continue
                if not t.is_contiguous():
                    if add(
                        f"triton needs contiguous tensors: the {what} of {plan.label(i)} "
                        f"({describe(t)}) is not (call .contiguous() on it, or use backend='torch')"
                    ):
                        return out
                elif t.dtype != plan.params[i].dtype or t.device != plan.params[i].device:
                    if add(
                        f"triton needs every tensor of a parameter in its dtype and device: the {what} "
                        f"of {plan.label(i)} is {describe(t)}, the parameter "
                        f"{describe(plan.params[i])} (use backend='torch')"
                    ):
                        return out
        for i, t in enumerate(plan.steps):
            if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != plan.params[i].device):
                if add(
                    f"triton keeps state['step'] as a one-element float32 tensor on the "
                    f"parameter's device; that of {plan.label(i)} is {describe(t)}"
                ):
                    return out
        for s, t in enumerate(plan.seg_nus):
            if t.dtype != torch.float32 or t.numel() != 2 or not t.is_contiguous() or t.device != plan.home:
                if add(
                    f"triton keeps each segment's (norm_ema, initialised) as a contiguous float32 [2] "
                    f"tensor on {plan.home}; that of segment {plan.segments[s].label} is {describe(t)}"
                ):
                    return out
        return out

    # -- tables ------------------------------------------------------------------------------
    def _tables(self, plan: StepPlan) -> _Tables:
        """Validate (and if needed rebuild and upload) this plan's device tables."""
        tab = plan.cache.triton
        if tab is None:
            tab = plan.cache.triton = _Tables()
        if plan.home.type == "cuda" and torch.cuda.is_current_stream_capturing():
            plan.cache.freeze(tab.tables() + [plan.cache.hyper[1] if plan.cache.hyper else None])
        if tab.plan is not None and tab.plan() is plan and tab.plan_uses == plan.uses:
            return tab  # validated earlier in this step (stats, then apply)
        kstats, _, L = _kernels()
        if plan.home.type == "cpu" and not kstats._stats_kernel.__class__.__name__.startswith("Interpret"):
            raise RuntimeError(
                "backend='triton' got CPU tensors but triton was imported without "
                "TRITON_INTERPRET=1; set it before anything imports triton, or use "
                "backend='torch' for CPU tensors."
            )
        P = len(plan.params)
        dev = plan.home
        has_state = len(plan.exp_avgs) == P
        has_steps = len(plan.steps) == P
        if CHUNK_OVERRIDE:
            chunk = CHUNK_OVERRIDE
        elif dev.type == "cpu":
            chunk = kstats.CHUNK_INTERPRET
        else:
            total = sum(p.numel() for p in plan.params)
            chunk = kstats.gpu_chunk(total, _sm_count(dev))
        if chunk % kstats.BLOCK:
            raise ValueError(f"triton chunk size {chunk} is not a multiple of BLOCK={kstats.BLOCK}")

        seg_ref = [REFERENCES.index(s.group["reference"]) for s in plan.segments]
        seg_pp = [s.group["mag_mode"] == "param" for s in plan.segments]
        flags, numels = [], []
        for i, p in enumerate(plan.params):
            s = plan.seg_of_param[i]
            r = plan.refs[i]
            if r is None:
                kind = L.R_NONE
            elif has_state and r is plan.exp_avgs[i]:
                kind = L.R_IS_M
            elif seg_ref[s] == REF_EMA:
                kind = L.R_EMA
            else:
                kind = L.R_READ
            f = _DT_CODE.get(p.dtype, -1) | (kind << 2)
            if seg_pp[s]:
                f |= L.F_PP
            if has_steps:
                f |= L.F_STEP
            flags.append(f)
            numels.append(p.numel())
        if any(f & 3 == 3 for f in flags):
            raise RuntimeError(
                "backend='triton' supports float32, bfloat16 and float16 parameters; "
                + ", ".join(
                    f"{plan.label(i)} is {plan.params[i].dtype}"
                    for i, p in enumerate(plan.params)
                    if p.dtype not in _DT_CODE
                )
            )

        struct_key = (
            dev,
            chunk,
            tuple(numels),
            tuple(flags),
            tuple(plan.seg_of_param),
            tuple(plan.group_index),
            has_steps,
        )
        if struct_key != tab.struct_key:
            self._build_structure(tab, plan, numels, flags, chunk, dev, L)
            tab.struct_key = struct_key
            tab.ptrs = None

        # addresses, re-validated every step (grads are re-allocated; the caching allocator
        # may or may not hand out the same addresses again)
        gp = [g.data_ptr() for g in plan.grads]
        rp = [gp[i] if r is None else r.data_ptr() for i, r in enumerate(plan.refs)]
        pp = [p.data_ptr() for p in plan.params]
        if has_state:
            mp = [t.data_ptr() for t in plan.exp_avgs]
            vp = [t.data_ptr() for t in plan.exp_avg_sqs]
        else:
            mp = vp = gp
        vms = plan.max_exp_avg_sqs if len(plan.max_exp_avg_sqs) == P else [None] * P
        vmp = [0 if t is None else t.data_ptr() for t in vms]  # 0: amsgrad off for this tensor
        sp = [t.data_ptr() for t in plan.steps] if has_steps else [0] * P
        lrp = self._lr_ptrs(plan, dev)
        ptrs = (gp, rp, pp, mp, vp, sp, [lrp[gi] for gi in plan.group_index], vmp)
        cols = (L.G, L.R, L.P, L.M, L.V, L.STEP, L.LR, L.VM)
        changed = [k for k in range(len(ptrs)) if tab.ptrs is None or ptrs[k] != tab.ptrs[k]]
        # gradients must match their parameter's shape, dtype and device (build_plan checks it):
        # only their layout is left to check; anything else that moved gets the full check
        if any(k != 0 for k in changed):
            problems = self._tensor_problems(plan, limit=3)
            if problems:
                raise RuntimeError("backend='triton' cannot run this step: " + "; ".join(problems))
        else:
            for i, g in enumerate(plan.grads):
                if not g.is_contiguous():
                    raise RuntimeError(
                        f"backend='triton' needs contiguous gradients: that of "
                        f"{plan.label(i)} ({describe(g)}) is not (use backend='torch')"
                    )
        if changed:
            host = tab.meta_host
            for k in changed:
                host[:, cols[k]] = torch.tensor(ptrs[k], dtype=torch.int64)
            # per tensor: all of g, r, p, m, v (and vm) 16-byte aligned (chunk starts are
            # multiples of BLOCK)
            al = [
                chunk % 16 == 0 and all(ptrs[k][i] % 16 == 0 for k in range(5)) and vmp[i] % 16 == 0 for i in range(P)
            ]
            host[:, L.FLAGS] = tab.flags | (torch.tensor(al, dtype=torch.int64) * L.F_ALIGNED)
            tab.meta = _put(plan, tab.meta, host, dev)
            tab.aligned = any(al)
            tab.amsgrad = any(vmp)
            tab.ptrs = ptrs

        # per-group AdamW settings (runtime values: an LR schedule only re-uploads this table)
        hkey = tuple(self._hyper_values(g) for g in plan.groups)
        if hkey != tab.hyper_key:
            rows = [self._hyper_row(v, L) for v in hkey]
            tab.hyper = _put(
                plan, tab.hyper, torch.tensor(rows, dtype=torch.float32).reshape(len(rows), L.HYP_COLS), dev
            )
            tab.hyper_key = hkey
        tab.plan = weakref.ref(plan)
        tab.plan_uses = plan.uses
        return tab

    @staticmethod
    def _build_structure(tab, plan, numels, flags, chunk, dev, L) -> None:
        P = len(numels)
        n = torch.tensor(numels, dtype=torch.int64)
        per = torch.clamp((n + chunk - 1) // chunk, min=1)  # >= 1 chunk per tensor
        C = int(per.sum())
        rows = torch.repeat_interleave(torch.arange(P, dtype=torch.int64), per)
        first = torch.cumsum(per, 0) - per  # first chunk of each tensor
        starts = (torch.arange(C, dtype=torch.int64) - first[rows]) * chunk
        tab.chunks = _put(plan, tab.chunks, torch.stack([rows, starts], dim=1).contiguous(), dev)
        first_l = first.tolist()
        tab.seg_offsets = [first_l[s.start] for s in plan.segments] + [C]
        host = torch.zeros(P, L.META_COLS, dtype=torch.int64)
        host[:, L.NUMEL] = n
        host[:, L.SEG] = torch.tensor(plan.seg_of_param, dtype=torch.int64)
        host[:, L.GROUP] = torch.tensor(plan.group_index, dtype=torch.int64)
        tab.flags = torch.tensor(flags, dtype=torch.int64)
        host[:, L.FLAGS] = tab.flags
        tab.meta_host = host
        tab.partials = torch.empty(C, 4, dtype=torch.float32, device=dev)
        tab.steps_old = torch.zeros(P, dtype=torch.float32, device=dev)
        codes = {f & 3 for f in flags}
        tab.dt = codes.pop() if len(codes) == 1 else L.DT_MIXED
        tab.chunk = chunk
        tab.seg_keys = {}

    @staticmethod
    def _lr_ptrs(plan: StepPlan, dev: torch.device) -> list[int]:
        """Per group: the address of a tensor ``lr`` (read by the apply kernel on the device, no
        host sync, graph-capturable), or 0 for a Python number (the hyper table's H_LR)."""
        return [g["lr"].data_ptr() if _device_lr(g.get("lr"), dev) else 0 for g in plan.groups]

    @staticmethod
    def _hyper_values(group: dict) -> tuple:
        if "lr" in group:  # SGGAdamW; GradientGuidance's merged groups only carry guidance keys
            b1, b2 = group["betas"]
            lr = group["lr"]
            # a float32 tensor lr on the step's device is read by the kernel (meta column LR): never
            # float() it (a host sync); any other tensor lr is read here, on the host
            lr = 0.0 if _device_lr(lr, _params_device(group)) else float(lr)
            return (
                lr,
                float(group["weight_decay"]),
                float(group["eps"]),
                float(b1),
                float(b2),
                float(group["ref_beta"]),
            )
        return (0.0, 0.0, 0.0, 0.0, 0.0, float(group["ref_beta"]))

    @staticmethod
    def _hyper_row(values: tuple, L) -> list[float]:
        lr, wd, eps, b1, b2, rb = values
        ln = lambda b: math.log(b) if b > 0 else float("-inf")
        row = [0.0] * L.HYP_COLS
        row[L.H_LR], row[L.H_DECAY], row[L.H_EPS] = lr, 1.0 - lr * wd, eps
        row[L.H_B1], row[L.H_OMB1], row[L.H_B2], row[L.H_OMB2] = b1, 1.0 - b1, b2, 1.0 - b2
        row[L.H_LNB1], row[L.H_LNB2] = ln(b1), ln(b2)
        row[L.H_RB], row[L.H_OMRB] = rb, 1.0 - rb
        row[L.H_WD] = wd
        return row

    def _segs(self, plan: StepPlan, tab: _Tables, offsets: list[int], L) -> torch.Tensor:
        """Segment table for these partial offsets (chunk-level, or reduced: one row per segment),
        with the address of each segment's (norm_ema, initialised) tensor."""
        nus = plan.seg_nus
        key = (tuple(offsets), tuple(t.data_ptr() for t in nus))
        name = "reduced" if list(offsets) == list(range(plan.num_segments + 1)) else "chunks"
        if tab.seg_keys.get(name) != key:
            rows = [[offsets[s], offsets[s + 1], key[1][s]] for s in range(plan.num_segments)]
            host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), L.SEG_COLS)
            tab.segs[name] = _put(plan, tab.segs.get(name), host, plan.home)
            tab.seg_keys[name] = key
        return tab.segs[name]

    # -- the stages --------------------------------------------------------------------------
    def stats(self, plan: StepPlan) -> Partials:
        kstats, _, _ = _kernels()
        tab = self._tables(plan)
        with _on(plan.home):
            kstats.launch_stats(
                tab.meta,
                tab.chunks,
                tab.partials,
                tab.steps_old,
                chunk=tab.chunk,
                dt=tab.dt,
                aligned=tab.aligned,
                copy_steps=len(plan.steps) == len(plan.params),
            )
        return Partials(tab.partials, list(tab.seg_offsets))

    def reduce(self, plan: StepPlan, partials: Partials) -> Partials:
        """Fixed-order segment sums (one program per tile of segments; deterministic), e.g. before an all-reduce."""
        if partials.is_reduced:
            return partials
        kstats, _, L = _kernels()
        tab = self._tables(plan)
        segs = self._segs(plan, tab, partials.offsets, L)
        S = plan.num_segments
        red = torch.empty(S, 4, dtype=torch.float32, device=plan.home)
        with _on(plan.home):
            kstats.launch_finalize(
                partials.values, segs, red, red, red, red, nu_mode=0, reduce_only=True, sync=self._sync(tab, plan.home)
            )
        return Partials(red, list(range(S + 1)))

    def finalize(self, plan: StepPlan, partials: Partials) -> torch.Tensor:
        """α, β, skip and the stats row (guidance.OUT_COLS) in one launch, which reads each
        segment's (ν, initialised) from ``plan.seg_nus`` and writes the new values back there
        (relative segments, unless the step is skipped)."""
        kstats, _, L = _kernels()
        tab = self._tables(plan)
        S = plan.num_segments
        segs = self._segs(plan, tab, partials.offsets, L)
        dev = plan.home
        values = partials.values
        if values.dtype != torch.float32 or not values.is_contiguous():
            values = values.to(torch.float32).contiguous()
        hyper = plan.hyper()
        if hyper.dtype != torch.float32 or hyper.device != dev or not hyper.is_contiguous():
            hyper = hyper.to(device=dev, dtype=torch.float32).contiguous()
        red = torch.empty(S, 4, dtype=torch.float32, device=dev)
        out = torch.empty(S, len(G.OUT_COLS), dtype=torch.float32, device=dev)
        with _on(dev):
            kstats.launch_finalize(values, segs, hyper, values, red, out, nu_mode=2, sync=self._sync(tab, dev))
        return out

    @staticmethod
    def _sync(tab: _Tables, dev: torch.device) -> torch.Tensor:
        """Finalize's workspace, allocated zeroed once per optimizer and device (the kernel
        leaves it zero, so no launch per step zeroes it)."""
        if tab.sync is None or tab.sync.device != dev:
            kstats, _, _ = _kernels()
            tab.sync = kstats.finalize_workspace(dev)
        return tab.sync

    def apply(self, plan: StepPlan, out: torch.Tensor) -> None:
        _, kapply, _ = _kernels()
        tab = self._tables(plan)
        with _on(plan.home):
            kapply.launch_apply(
                tab.meta,
                tab.chunks,
                tab.hyper,
                out,
                tab.steps_old,
                chunk=tab.chunk,
                dt=tab.dt,
                aligned=tab.aligned,
                amsgrad=tab.amsgrad,
            )

    def guide(self, plan: StepPlan, out: torch.Tensor) -> None:
        _, kapply, _ = _kernels()
        tab = self._tables(plan)
        with _on(plan.home):
            kapply.launch_guide(tab.meta, tab.chunks, tab.hyper, out, chunk=tab.chunk, dt=tab.dt, aligned=tab.aligned)


register(TritonBackend())
