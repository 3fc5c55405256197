"""Shared fixtures. Every behavioural test runs once per backend that can serve CPU tensors here
(``torch`` always; ``cpu`` when the extension is built; ``triton`` under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.backends import all_backends  # noqa: E402
from sgg_fast.plan import build_plan  # noqa: E402


def _probe_plan(dtype=torch.float32):
    p = torch.zeros(3, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros_like(p)
    return build_plan(SGGAdamW([p]).param_groups)


def cpu_backends(dtype=torch.float32) -> list[str]:
    """Backends that can run a step on CPU tensors of ``dtype`` on this machine."""
    plan = _probe_plan(dtype)
    return [n for n, b in all_backends().items() if not b.not_supported_reasons(plan)]


CPU_BACKENDS = cpu_backends()

#: ``SGG_FAST_TEST_BACKENDS=triton,cpu`` runs only those backends' parameters of the
#: backend-parametrised tests, plus the files ``tests/test_<name>_*.py`` of those backends, and
#: deselects every other test (they ran in the plain pass). A named backend that cannot serve
#: CPU tensors here is an error, not a silent skip.
_SELECTED = [n.strip() for n in os.environ.get("SGG_FAST_TEST_BACKENDS", "").split(",") if n.strip()]
if _SELECTED:
    _missing = [n for n in _SELECTED if n not in CPU_BACKENDS]
    if _missing:
        _why = {n: b.not_supported_reasons(_probe_plan()) for n, b in all_backends().items() if n in _missing}
        raise pytest.UsageError(f"SGG_FAST_TEST_BACKENDS asks for {_missing}, which cannot run CPU tensors "
                                f"here: {_why} (for triton: set TRITON_INTERPRET=1)")
    CPU_BACKENDS = _SELECTED


def pytest_configure(config):
    # Triton's interpreter evaluates both sides of tl.where in numpy, which warns about the
    # inf·0 of non-finite statistics in the unselected side (torch computes the same silently)
    config.addinivalue_line("filterwarnings",
                            "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("filterwarnings",
                            "ignore:overflow encountered:RuntimeWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if not _SELECTED:
        return
    keep, drop = [], []
    for item in items:
        own_file = any(item.path.name.startswith(f"test_{n}_") for n in _SELECTED)
        (keep if own_file or "backend" in getattr(item, "fixturenames", ()) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
