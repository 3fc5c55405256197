"""Triton kernels of sgg_fast, installed as the subpackage ``sgg_fast.kernels``.

Never import this folder as a top-level ``kernels`` package (a PyPI package of that name
exists). The kernel modules (``stats``, ``apply``) import triton; this ``__init__`` and
``layout`` do not, and ``import sgg_fast`` imports none of them.

``LAUNCHES`` counts kernel launches by name (every launcher increments it), so that tests can
prove "one step = three launches, whatever the number of tensors" (DESIGN §3).
"""

from __future__ import annotations

from collections import Counter

#: kernel launches since the last reset, by kernel name ("stats", "finalize", "apply", ...)
LAUNCHES: Counter = Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def reset_launches() -> None:
    LAUNCHES.clear()


def total_launches() -> int:
    return sum(LAUNCHES.values())
