"""What every backend implements, and the statistics container passed between its stages."""

from __future__ import annotations

import torch

from ..plan import Partials, StepPlan


class Backend:
    """A way to run the three stages of an SGG step.

    Subclasses set ``name``, ``device_types``, ``dtypes`` and ``auto_priority`` (lower is
    tried first by ``backend="auto"``; ``None`` for a device type means auto never picks it),
    and implement the stages. ``unavailable_reasons()`` says why the backend cannot run at all
    on this machine; ``not_supported_reasons(plan)`` adds why it cannot serve one step's inputs.
    An empty list means yes.
    """

    name: str = ""
    description: str = ""
    device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    auto_priority: dict[str, int | None] = {}
    #: True when ``apply``/``guide`` decide the skip on the device (no host sync in a step)
    device_skip: bool = True
    #: a fused backend (what ``SGGAdamW(fused=True)`` asks for)
    fused: bool = True
    #: True when the kernels walk a parameter's gradient, state and reference with one flat
    #: index: they must then all have the parameter's strides
    same_layout: bool = False
    #: the apply stage implements amsgrad (state ``max_exp_avg_sq``)
    amsgrad: bool = False

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, plan: StepPlan) -> list[str]:
        reasons = list(self.unavailable_reasons())
        for dev in plan.devices:
            if dev.type not in self.device_types:
                reasons.append(
                    f"{self.name} does not run on {dev.type} tensors "
                    f"(it serves: {', '.join(self.device_types) or 'nothing'})"
                )
        if len(plan.devices) > 1:
            reasons.append(
                f"{self.name} needs all parameters of one optimizer on one device "
                f"(got {', '.join(map(str, plan.devices))})"
            )
        for dt in plan.dtypes:
            if dt not in self.dtypes:
                reasons.append(f"{self.name} does not support {str(dt).replace('torch.', '')} parameters")
        return reasons + self.input_reasons(plan)

    def input_reasons(self, plan: StepPlan) -> list[str]:
        """Per-step checks of the plan's tensors (cheap; run every step by the engine)."""
        if not self.amsgrad and any(t is not None for t in plan.max_exp_avg_sqs):
            return [f"{self.name} does not implement amsgrad=True (backend='torch' does)"]
        if not self.same_layout:
            return []
        lists = (
            ("gradient", plan.grads),
            ("state['exp_avg']", plan.exp_avgs),
            ("state['exp_avg_sq']", plan.exp_avg_sqs),
            ("state['max_exp_avg_sq']", plan.max_exp_avg_sqs),
            ("reference", plan.refs),
        )
        for i, p in enumerate(plan.params):
            st = p.stride()
            for what, lst in lists:
                t = lst[i] if i < len(lst) else None
                if t is not None and t.numel() > 1 and t.stride() != st:
                    return [
                        f"{self.name} needs the {what} of {plan.label(i)} laid out like the parameter "
                        f"(strides {t.stride()} vs {st}, e.g. a channels_last or transposed "
                        "parameter whose gradient is contiguous); backend='torch' serves it"
                    ]
        return []

    # -- the three stages -------------------------------------------------------------------
    def stats(self, plan: StepPlan) -> Partials:
        """Stage 1: partial sums of (gg, rr, gr, pp)."""
        raise NotImplementedError

    def reduce(self, plan: StepPlan, partials: Partials) -> Partials:
        """Sum the partials of each segment in a fixed order (one row per segment)."""
        if partials.is_reduced:
            return partials
        S = len(partials.offsets) - 1
        lengths = torch.tensor([partials.offsets[s + 1] - partials.offsets[s] for s in range(S)])
        chunk_seg = torch.repeat_interleave(torch.arange(S), lengths).to(partials.values.device)
        out = torch.zeros(S, 4, dtype=partials.values.dtype, device=partials.values.device)
        out.index_add_(0, chunk_seg, partials.values)
        return Partials(out, list(range(S + 1)))

    def finalize(self, plan: StepPlan, partials: Partials) -> torch.Tensor:
        """Stage 2: ``[S, len(guidance.OUT_COLS)]`` (α, β, new norm_ema, skip, stats row).
        Reads ``plan.hyper()`` and each segment's ν from ``plan.seg_nus``, and writes the new
        ν back there (relative segments, unless the step is skipped)."""
        raise NotImplementedError

    def apply(self, plan: StepPlan, out: torch.Tensor) -> None:
        """Stage 3 (SGGAdamW): AdamW on ``u = α·g + β·r``; updates p, m, v, step (and ref)."""
        raise NotImplementedError

    def guide(self, plan: StepPlan, out: torch.Tensor) -> None:
        """Stage 3 (GradientGuidance): ``g ← α·g + β·r`` in place (and the ema ref update)."""
        raise NotImplementedError
