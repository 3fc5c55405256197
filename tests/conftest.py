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


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
