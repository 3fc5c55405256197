"""Backend registry.

Every module in this package whose name ends in ``_backend`` is imported when the registry is
first used and registers its backend with :func:`register`. Adapter modules must not import
triton or a compiled extension at import time: they do so lazily, inside their stages or their
``unavailable_reasons()``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from .._ext import _outside_dynamo
from ..plan import StepPlan
from .base import Backend, Partials

__all__ = ["Backend", "Partials", "register", "get_backend", "all_backends", "available_backends", "resolve", "ENV_VAR"]

ENV_VAR = "SGG_FAST_BACKEND"
_REGISTRY: dict[str, Backend] = {}
_loaded = False


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load() -> None:
    if not _loaded:
        _discover()


@_outside_dynamo
def _discover() -> None:
    # lists this package's directory: run eagerly even from a compiled step (sgg_fast._ext)
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.endswith("_backend"):
            importlib.import_module(f"{__name__}.{info.name}")


def all_backends() -> dict[str, Backend]:
    """Every registered backend, available or not."""
    _load()
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    backends = all_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; known backends: 'auto', " + ", ".join(repr(n) for n in backends))
    return backends[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (for some tensors)."""
    return [n for n, b in all_backends().items() if not b.unavailable_reasons()]


def resolve(name: str, plan: StepPlan, fused_only: bool = False) -> Backend:
    """The backend that runs ``plan``: the one named, or the best for the tensors' device.

    ``SGG_FAST_BACKEND`` overrides ``"auto"``. Raises ``RuntimeError`` listing every reason
    when the named backend (or, for auto, every backend) cannot serve the step.
    ``fused_only`` (``SGGAdamW(fused=True)``): only fused backends qualify.
    """
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto":
        backend = get_backend(name)
        if fused_only and not backend.fused:
            raise RuntimeError(f"fused=True but {ENV_VAR}={name!r} names a backend that is not fused")
        reasons = backend.not_supported_reasons(plan)
        if reasons:
            raise RuntimeError(
                f"backend={name!r} cannot run this step: "
                + "; ".join(reasons)
                + ". Use backend='auto' (or 'torch', which runs anywhere); "
                "`python -m sgg_fast.info` lists every backend and why it is or is not available."
            )
        return backend
    dev_types = {d.type for d in plan.devices} or {"cpu"}
    candidates = []
    for b in all_backends().values():
        if fused_only and not b.fused:
            continue
        prios = [b.auto_priority.get(t) for t in dev_types]
        ranks = [p for p in prios if p is not None]
        if len(ranks) == len(prios):
            candidates.append((max(ranks), b.name, b))
    tried = []
    for _, _, b in sorted(candidates, key=lambda c: (c[0], c[1])):
        reasons = b.not_supported_reasons(plan)
        if not reasons:
            return b
        tried.append(f"{b.name}: " + "; ".join(reasons))
    if fused_only:
        raise RuntimeError(
            "fused=True but no fused backend can run this step. "
            + " | ".join(tried)
            + ". Drop fused=True to let the torch backend serve it."
        )
    raise RuntimeError("no backend can run this step. " + " | ".join(tried))
