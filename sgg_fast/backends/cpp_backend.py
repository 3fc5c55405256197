"""Adapters for the compiled ops (``csrc/``): backends ``"cpu"`` and ``"cuda"``.

A step is three op calls whatever the number of tensors (DESIGN §3):

* ``sgg_stats``      per-chunk ``(gg, rr, gr, pp)`` of every tensor → :class:`Partials`;
* ``sgg_finalize``   per-segment sums in a fixed order, then the math of ``guidance.finalize``
  (mirrored operation by operation) → ``out [S, 14]`` with the global skip flag; reads and
  writes each segment's ``(norm_ema, initialised)`` in ``plan.seg_nus`` in place;
* ``sgg_adamw_apply`` / ``sgg_guide_apply``   one pass: ``u = α·g + β·r`` in registers, AdamW
  (or the in-place rewrite), step count and the ema reference. The skip flag is read from
  ``out`` inside the op (on the device for CUDA): no host sync.

The extension is loaded lazily (:mod:`sgg_fast._ext`): never at import, and
``unavailable_reasons()`` only looks for it. The first real step loads it (or JIT-builds it).
"""

from __future__ import annotations

import torch

from .. import _ext
from ..plan import REF_MOMENTUM, StepPlan, memo
from ..validation import setting_key
from . import register
from .base import Backend, Partials

#: Elements per statistics row on CPU. A chunk is one parallel task: 32 Ki fp32 elements of g and
#: r (256 KiB) take ~10-30 µs to stream, so the per-task cost (~0.1 µs) is noise, a 16 M-element
#: model still splits into ~500 tasks for any thread count, and each fp32 lane accumulator sums
#: at most 32 Ki / (2·W) ≤ 2 Ki squares (W = 8 or 16 lanes), well inside fp32's accuracy.
CPU_STATS_CHUNK = 1 << 15
#: Elements per statistics row (one thread block) on CUDA: 256 threads × 128 elements. Large
#: enough that a 1 B-parameter model has ~30 K rows (a few hundred KiB of partials, summed by
#: one warp per segment in finalize), small enough that a 10 M model still fills an H200's
#: 132 SMs. Untuned: no GPU in the session that wrote it.
CUDA_STATS_CHUNK = 1 << 15
#: int64 words of the CUDA device table per tensor (16-word record + a step counter); see
#: csrc/cuda/cuda_table.h.
WS_WORDS_PER_TENSOR = 17


def _cached(plan: StepPlan, name: str, key, make):
    """``make()`` while ``key`` is unchanged since the last step (``plan.cache.cpp[name]``)."""
    return memo(plan.cache.cpp, name, key, make)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous layout), e.g. channels_last."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a blocking copy (pinned staging buffer)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _CompiledBackend(Backend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    device_skip = True
    same_layout = True
    _device_type = ""
    _stats_chunk = CPU_STATS_CHUNK

    # -- availability ------------------------------------------------------------------------
    def _device_reasons(self) -> list[str]:
        return []

    def unavailable_reasons(self) -> list[str]:
        return _ext.cheap_reasons() + self._device_reasons()

    def not_supported_reasons(self, plan: StepPlan) -> list[str]:
        reasons = super().not_supported_reasons(plan)
        if reasons:
            return reasons
        if not _ext.load():  # builds (JIT) on the first step that picks this backend
            return [_ext.error() or "the compiled extension could not be loaded"]
        reasons += self._loaded_reasons()
        for label, p in zip(plan.labels, plan.params):
            if not (p.is_contiguous() or _dense(p)):
                reasons.append(f"{self.name} needs dense parameters; {label} has strides {p.stride()}")
                break
        return reasons

    def _loaded_reasons(self) -> list[str]:
        return []

    # -- per-step inputs, cached across steps in plan.cache.cpp ------------------------------
    def _ws(self, plan: StepPlan, which: str):
        """CUDA device table + host mirror for op ``which`` (None on CPU)."""
        return None, None

    def _seg_offsets(self, plan: StepPlan, partials: Partials) -> torch.Tensor:
        dev = partials.values.device
        # two slots: per-chunk rows (stats) and one row per segment (reduced, e.g. distributed)
        name = "cpp_seg_offsets_reduced" if partials.is_reduced else "cpp_seg_offsets"
        return _cached(
            plan, name, (tuple(partials.offsets), dev), lambda: _to_device(partials.offsets, torch.int64, dev)
        )

    def _row_offsets(self, plan: StepPlan) -> list[int]:
        """First statistics row of each segment (+ the total): sgg_stats gives tensor i
        max(1, ceil(numel / chunk)) rows, in plan order, and plan order is segment order."""
        chunk = self._stats_chunk

        def offsets():
            numels = tuple(g.numel() for g in plan.grads)

            def make():
                rows = [0]
                for n in numels:
                    rows.append(rows[-1] + max(1, -(-n // chunk)))
                return [rows[s.start] for s in plan.segments] + [rows[-1]]

            return _cached(plan, "cpp_row_offsets", (numels, tuple(plan.seg_of_param), chunk), make)

        return plan.memo("cpp_row_offsets", offsets)

    def _guide_lists(self, plan: StepPlan):
        """Per-tensor ``ref_beta`` and reference mode (the guidance groups carry no lr)."""
        key = (tuple((setting_key(g["ref_beta"]), g["reference"]) for g in plan.groups), tuple(plan.seg_of_param))

        def make():
            rb = [float(plan.segments[s].group["ref_beta"]) for s in plan.seg_of_param]
            return dict(ref_beta=rb, ref_mode=[plan.ref_mode(i) for i in range(len(plan.params))])

        return _cached(plan, "cpp_guide_lists", key, make)

    def _apply_lists(self, plan: StepPlan):
        """Per-tensor hyper-parameters as plain lists (+ lr tensors, if any group has one)."""
        groups = plan.groups
        # by value (validation.setting_key): an in-place write to a tensor setting on the CPU
        # changes the key; a tensor lr is passed as the tensor itself and read by the op
        gkey = tuple(
            tuple(map(setting_key, (g["lr"], g["betas"], g["eps"], g["weight_decay"], g.get("ref_beta"))))
            + (g.get("reference"),)
            for g in groups
        )
        key = (gkey, tuple(plan.group_index), tuple(plan.seg_of_param))

        def make():
            lr, b1, b2, eps, wd, rb, mode, lr_t = [], [], [], [], [], [], [], []
            any_lr_t = False
            for i, gi in enumerate(plan.group_index):
                g = groups[gi]
                seg_group = plan.segments[plan.seg_of_param[i]].group
                glr = g["lr"]
                if isinstance(glr, torch.Tensor):
                    any_lr_t = True
                    lr_t.append(glr)
                    lr.append(0.0)
                else:
                    lr_t.append(None)
                    lr.append(float(glr))
                beta1, beta2 = g["betas"]
                b1.append(float(beta1))
                b2.append(float(beta2))
                eps.append(float(g["eps"]))
                wd.append(float(g["weight_decay"]))
                rb.append(float(seg_group["ref_beta"]))
                mode.append(plan.ref_mode(i))
            return dict(
                lr=lr,
                beta1=b1,
                beta2=b2,
                eps=eps,
                weight_decay=wd,
                ref_beta=rb,
                ref_mode=mode,
                lr_tensors=lr_t if any_lr_t else [],
            )

        return _cached(plan, "cpp_apply_lists", key, make)

    # -- the stages --------------------------------------------------------------------------
    def stats(self, plan: StepPlan) -> Partials:
        ops = _ext.ops()
        params = plan.memo(
            "cpp_stats_params",
            lambda: [
                p if plan.segments[s].group["mag_mode"] == "param" else None
                for p, s in zip(plan.params, plan.seg_of_param)
            ],
        )
        ws, ws_host = self._ws(plan, "stats")
        values = ops.sgg_stats(plan.grads, plan.refs, params, self._stats_chunk, ws, ws_host)
        return Partials(values, self._row_offsets(plan))

    def reduce(self, plan: StepPlan, partials: Partials) -> Partials:
        if partials.is_reduced:
            return partials
        sums = _ext.ops().sgg_segment_sum(partials.values, self._seg_offsets(plan, partials))
        return Partials(sums, list(range(len(partials.offsets))))

    def finalize(self, plan: StepPlan, partials: Partials) -> torch.Tensor:
        """One op: segment sums, guidance.finalize's math (finalize_row in csrc/sgg_common.h),
        and each relative segment's new (ν, initialised) written into ``plan.seg_nus`` in place
        unless the step is skipped."""
        return _ext.ops().sgg_finalize(partials.values, self._seg_offsets(plan, partials), plan.hyper(), plan.seg_nus)

    def _placeholder(self, plan: StepPlan) -> torch.Tensor:
        """The no-elements tensor standing for "no reference" in the ops' mutable refs list."""
        dev = plan.home
        return _cached(plan, "cpp_placeholder", dev, lambda: torch.empty(0, device=dev))

    def _apply_tensors(self, plan: StepPlan, ref_mode: list[int]) -> tuple[list, list]:
        """The refs (the placeholder where r is the momentum itself) and the amsgrad maxima (one
        entry per tensor, the placeholder where the group has amsgrad=False; [] if none has)."""
        none = self._placeholder(plan)
        refs = [none if m == REF_MOMENTUM else r for m, r in zip(ref_mode, plan.refs)]
        vmax = plan.max_exp_avg_sqs
        vmax = [none if t is None else t for t in vmax] if any(t is not None for t in vmax) else []
        return refs, vmax

    def apply(self, plan: StepPlan, out: torch.Tensor) -> None:
        ops = _ext.ops()
        h = self._apply_lists(plan)
        refs, vmax = plan.memo("cpp_apply_tensors", lambda: self._apply_tensors(plan, h["ref_mode"]))
        ws, ws_host = self._ws(plan, "apply")
        ops.sgg_adamw_apply(
            plan.params,
            plan.grads,
            plan.exp_avgs,
            plan.exp_avg_sqs,
            plan.steps,
            refs,
            out,
            plan.seg_of_param,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["eps"],
            h["weight_decay"],
            h["ref_beta"],
            h["ref_mode"],
            h["lr_tensors"],
            vmax,
            ws,
            ws_host,
        )

    def guide(self, plan: StepPlan, out: torch.Tensor) -> None:
        ops = _ext.ops()
        h = self._guide_lists(plan)
        ws, ws_host = self._ws(plan, "guide")
        none = self._placeholder(plan)
        refs = [none if r is None else r for r in plan.refs]
        ops.sgg_guide_apply(plan.grads, refs, out, plan.seg_of_param, h["ref_beta"], h["ref_mode"], ws, ws_host)


class CpuBackend(_CompiledBackend):
    name = "cpu"
    description = (
        "compiled C++ (csrc/cpu): at::parallel_for + at::vec, three op calls per step, "
        "bitwise deterministic for any thread count"
    )
    device_types = ("cpu",)
    # before torch (100) for CPU tensors
    auto_priority = {"cpu": 50}
    _stats_chunk = CPU_STATS_CHUNK
    amsgrad = True


class CudaBackend(_CompiledBackend):
    name = "cuda"
    description = (
        "compiled CUDA (csrc/cuda): multi-tensor kernels, three launches per step, no host sync, CUDA-graph capturable"
    )
    device_types = ("cuda",)
    # After triton, before torch, until the H200 benchmark (benchmarks/gpu_check.sh) decides:
    # the CUDA kernels have not yet run on a GPU (see README, "Compiled backends").
    auto_priority = {"cuda": 60}
    _stats_chunk = CUDA_STATS_CHUNK

    def _device_reasons(self) -> list[str]:
        if not torch.cuda.is_available():
            return ["no CUDA device (torch.cuda.is_available() is False)"]
        return []

    def _loaded_reasons(self) -> list[str]:
        if not _ext.has_cuda_kernels():
            return [
                "the compiled extension was built without CUDA kernels (nvcc was not found at build "
                "time); rebuild with nvcc on PATH or SGG_FAST_FORCE_CUDA=1 (see README)"
            ]
        return []

    def _ws(self, plan: StepPlan, which: str):
        P = len(plan.params)
        dev = plan.home

        def make():
            ws = torch.zeros(WS_WORDS_PER_TENSOR * max(P, 1), dtype=torch.int64, device=dev)
            ws_host = torch.zeros(WS_WORDS_PER_TENSOR * max(P, 1), dtype=torch.int64)
            return ws, ws_host

        return _cached(plan, f"cpp_ws_{which}", (P, dev), make)


register(CpuBackend())
register(CudaBackend())
