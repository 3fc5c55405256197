"""Gradient / reference pairs of a named geometry, shared by the finalize tests
(tests/test_guidance.py, tests/test_triton_kernels.py)."""

from __future__ import annotations

import torch

#: every geometry :func:`arrange` knows
KINDS = ("random", "conflict", "aligned", "zero_r", "zero_g", "antiparallel", "parallel", "zero_all")


def arrange(kind: str, g: torch.Tensor, r: torch.Tensor, anti: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, r)`` rearranged as ``kind``: a strong conflict (g·r < 0) or agreement, a zero
    reference, gradient or both, g = -anti·r (antiparallel) or g = 1.7·r (parallel); "random"
    leaves them as they are."""
    if kind == "conflict":
        g = g - 3 * r * g.norm() / r.norm()
    elif kind == "aligned":
        g = g + 3 * r * g.norm() / r.norm()
    elif kind == "zero_r":
        r = torch.zeros_like(r)
    elif kind == "zero_g":
        g = torch.zeros_like(g)
    elif kind == "antiparallel":
        g = -anti * r
    elif kind == "parallel":
        g = 1.7 * r
    elif kind == "zero_all":
        g, r = torch.zeros_like(g), torch.zeros_like(r)
    elif kind != "random":
        raise ValueError(f"unknown kind {kind!r} (one of {KINDS})")
    return g, r
