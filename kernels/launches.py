"""Kernel launch counts of ``sgg_fast.kernels``.

``LAUNCHES`` counts kernel launches by name (every launcher increments it), so that tests can
prove "one step = three launches, whatever the number of tensors" (DESIGN §3).
"""

from __future__ import annotations

from collections import Counter

if not __name__.startswith("sgg_fast."):
    raise ImportError(f"{__name__} is part of sgg_fast: import it as sgg_fast.kernels (see kernels/README.md)")

#: kernel launches since the last reset, by kernel name ("stats", "finalize", "apply", ...)
LAUNCHES: Counter = Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def reset_launches() -> None:
    LAUNCHES.clear()


def total_launches() -> int:
    return sum(LAUNCHES.values())
