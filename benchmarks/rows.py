"""The rows of the benchmark table: every optimizer step that is timed, and its byte model.

Shared by ``benchmarks/run.py`` (the comparison table) and ``benchmarks/test_steps.py``
(pytest-benchmark). SGG rows are discovered from the backend registry
(``sgg_fast.backends.all_backends()`` + ``not_supported_reasons(plan)``), so a backend that is
merged later (the C++ ``cpu`` one, ``triton``, ``cuda``) appears without changes here.

Byte model (DESIGN §3), in elements of the parameter dtype per parameter: a fused AdamW step
reads ``g, p, m, v`` and writes ``p, m, v`` (7); SGG adds the statistics pass over ``g, r`` (+2;
with ``reference="momentum"`` ``r`` is ``m``, so 9) and, with ``"ema"``, the read and write of
``r`` in the apply pass (11); ``clip_grad_norm_`` adds a norm pass over ``g`` and an in-place scale
of ``g`` (+3, 10). The eager and compiled SGG steps do the same useful work as SGG and are
charged the same bytes, so their GB/s compare directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .eager_sgg import EagerSGGAdamW, compile_unavailable_reason

#: SGG settings of every SGG row: the paper's three regularisers on (all λ > 0), SGGAdamW's
#: defaults otherwise (mag_mode="relative", granularity="group")
SGG_KW = dict(lambda_dir=0.2, lambda_mag=1.0, lambda_align=1.0, mag_mode="relative",
              mag_ratio=2.0, mag_beta=0.9, ref_beta=0.9)
ADAMW_KW = dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8)
REFERENCES = ("momentum", "ema")
BYTES_PER_ELEMENT = {"adamw": 7, "clip+adamw": 10, "momentum": 9, "ema": 11}
#: backends that are never timed on a device type: the Triton interpreter on CPU is a
#: correctness tool (numpy emulation), not an implementation anyone would run
NEVER_TIMED = {("triton", "cpu")}


@dataclass
class Row:
    name: str                      # shown in the table, e.g. "SGGAdamW[torch] momentum"
    kind: str                      # "sgg" | "eager" | "compiled" | "adamw"
    reference: str | None          # momentum / ema for SGG rows
    bytes_per_element: int         # the byte model above
    make: Callable[[list[dict]], object] = field(repr=False)   # param groups -> object with .step()
    note: str = ""

    def create(self, groups: list[dict]):
        """A fresh optimizer over ``groups`` (copied: torch writes its defaults into the dicts)."""
        return self.make(_copy_groups(groups))

    @property
    def is_sgg(self) -> bool:
        return self.kind in ("sgg", "eager", "compiled")


def _copy_groups(groups: list[dict]) -> list[dict]:
    return [dict(g, params=list(g["params"])) for g in groups]


def _clip_then(opt: torch.optim.Optimizer, max_norm: float = 1.0):
    params = [p for g in opt.param_groups for p in g["params"]]

    class _Clip:
        param_groups = opt.param_groups

        def step(self):
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()

    return _Clip()


def _sgg(backend: str, reference: str):
    from sgg_fast import SGGAdamW

    return lambda groups: SGGAdamW(groups, backend=backend, reference=reference, **ADAMW_KW, **SGG_KW)


def _eager(reference: str, compile: bool):
    return lambda groups: EagerSGGAdamW(groups, reference=reference, compile=compile,
                                        **ADAMW_KW, **SGG_KW)


def sgg_backends(groups: list[dict]) -> tuple[list[str], dict[str, list[str]]]:
    """Backends that can run SGGAdamW on these param groups, and why the others cannot."""
    from sgg_fast import SGGAdamW
    from sgg_fast.backends import all_backends
    from sgg_fast.plan import build_plan

    # copies: torch.optim writes every default into the param-group dicts it is given, and those
    # settings (reference=...) would then override the constructor arguments of later rows
    plan = build_plan(SGGAdamW(_copy_groups(groups), **ADAMW_KW, **SGG_KW).param_groups)
    dev = plan.home.type
    ok, why = [], {}
    for name, b in sorted(all_backends().items()):
        if (name, dev) in NEVER_TIMED:
            why[name] = [f"the {name} backend on {dev} runs only in an interpreter (not benchmarked)"]
            continue
        reasons = b.not_supported_reasons(plan)
        if reasons:
            why[name] = reasons
        else:
            ok.append(name)
    return ok, why


def deepspeed_unavailable_reason() -> str | None:
    """None when ``deepspeed.ops.adam.DeepSpeedCPUAdam`` imports (the optional ``deepspeed``
    package; it JIT-builds its CPU op with ninja on first use), else why not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or deepspeed failing at import
        return f"deepspeed does not import ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); " \
               "`pip install deepspeed` (optional, not needed by the tests)"
    return None


def _deepspeed_cpu_adam(groups: list[dict]):
    """ZeRO-Offload's CPU AdamW (decoupled weight decay: adamw_mode=True), fp32 state."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    kw = dict(ADAMW_KW)
    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)


class _Pass:
    """A timed pass that is not an optimizer step (same ``step()`` interface as the rows)."""

    def __init__(self, groups: list[dict], fn):
        self.param_groups = groups
        self.step = fn


def pass_rows(groups: list[dict]) -> tuple[list[Row], list[str]]:
    """CPU rows that time one pass over memory: the compiled statistics pass (``sgg_stats`` over
    ``g`` and ``r = exp_avg``, what a momentum step reads before finalize) and a read baseline
    (``torch.sum`` over a buffer of the same bytes, 2 elements per parameter, measured in the same
    run), so that "% of achievable" means something for a read-only pass."""
    rows: list[Row] = []
    notes: list[str] = []
    params = [p for g in groups for p in g["params"]]
    if params[0].device.type != "cpu":
        return rows, notes

    def make_read(gs):
        n = sum(p.numel() for p in params)
        buf = torch.empty(2 * n, dtype=params[0].dtype).uniform_()
        return _Pass(gs, lambda: buf.sum())

    rows.append(Row("read baseline: torch.sum over 2·N elements", "pass", None, 2, make_read))
    from sgg_fast import _ext

    if not _ext.load():
        notes.append(f"sgg_stats pass not timed: {_ext.error()}")
        return rows, notes
    from sgg_fast.backends.cpp_backend import CPU_STATS_CHUNK

    def make_stats(gs):
        grads = [p.grad for p in params]
        refs = [torch.randn_like(p) for p in params]  # stands for exp_avg (same bytes)
        nones = [None] * len(params)
        ops = torch.ops.sgg_fast
        return _Pass(gs, lambda: ops.sgg_stats(grads, refs, nones, CPU_STATS_CHUNK))

    rows.append(Row("sgg_stats pass [cpu] (reads g, r)", "pass", None, 2, make_stats))
    return rows, notes


def fused_adamw_supported(groups: list[dict]) -> str | None:
    """None when ``torch.optim.AdamW(fused=True)`` can step these tensors, else the reason."""
    p = groups[0]["params"][0]
    probe = torch.zeros(2, dtype=p.dtype, device=p.device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except Exception as e:  # noqa: BLE001 - report the reason in the table
        return f"{type(e).__name__}: {e}".splitlines()[0][:120]
    return None


def build_rows(groups: list[dict], *, compile: bool = True, select: str | None = None,
               compile_refs: tuple[str, ...] = REFERENCES) -> tuple[list[Row], list[str]]:
    """All rows for these param groups, and notes on rows left out (with the reason)."""
    import re

    rows: list[Row] = []
    notes: list[str] = []
    fused_why = fused_adamw_supported(groups)
    if fused_why is None:
        rows.append(Row("AdamW(fused=True)", "adamw", None, BYTES_PER_ELEMENT["adamw"],
                        lambda g: torch.optim.AdamW(g, fused=True, **ADAMW_KW)))
    else:
        notes.append(f"AdamW(fused=True) unavailable: {fused_why}")
    rows.append(Row("AdamW(foreach=True)", "adamw", None, BYTES_PER_ELEMENT["adamw"],
                    lambda g: torch.optim.AdamW(g, foreach=True, **ADAMW_KW)))
    if fused_why is None:
        rows.append(Row("clip_grad_norm_ + AdamW(fused)", "adamw", None, BYTES_PER_ELEMENT["clip+adamw"],
                        lambda g: _clip_then(torch.optim.AdamW(g, fused=True, **ADAMW_KW))))
    if groups[0]["params"][0].device.type == "cpu":
        ds_why = deepspeed_unavailable_reason()
        if ds_why is None:
            rows.append(Row("DeepSpeedCPUAdam(adamw_mode)", "adamw", None, BYTES_PER_ELEMENT["adamw"],
                            _deepspeed_cpu_adam))
        else:
            notes.append(f"DeepSpeedCPUAdam not timed: {ds_why}")
    backends, why = sgg_backends(groups)
    for name, reasons in why.items():
        notes.append(f"SGGAdamW backend {name!r} not timed: " + "; ".join(reasons))
    compile_why = compile_unavailable_reason() if compile else "disabled (--no-compile or --quick)"
    for ref in REFERENCES:
        for b in backends:
            rows.append(Row(f"SGGAdamW[{b}] {ref}", "sgg", ref, BYTES_PER_ELEMENT[ref], _sgg(b, ref)))
        rows.append(Row(f"eager SGG {ref}", "eager", ref, BYTES_PER_ELEMENT[ref], _eager(ref, False)))
        if compile_why is None and ref in compile_refs:
            rows.append(Row(f"torch.compile(eager SGG) {ref}", "compiled", ref, BYTES_PER_ELEMENT[ref],
                            _eager(ref, True)))
    if compile_why is not None:
        notes.append(f"torch.compile(eager SGG) not timed: {compile_why}")
    if select:
        pat = re.compile(select)
        rows = [r for r in rows if pat.search(r.name) or r.name.startswith("AdamW(fused")]
    return rows, notes
