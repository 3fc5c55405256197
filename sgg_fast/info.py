"""``python -m sgg_fast.info``: versions and every backend, available or why not."""

from __future__ import annotations

import platform
import sys


def backend_table() -> list[tuple[str, bool, str]]:
    """``(name, available, description or reasons)`` for every registered backend."""
    from .backends import all_backends

    rows = []
    for name, b in all_backends().items():
        try:
            reasons = b.unavailable_reasons()
        except Exception as exc:  # an adapter's check must never break the listing
            reasons = [f"availability check failed: {exc!r}"]
        rows.append((name, not reasons, b.description if not reasons else "; ".join(reasons)))
    return rows


#: distributions whose versions decide whether a fresh clone works (torch's is printed above)
DEPENDENCIES = ("triton", "transformers", "kernels", "accelerate", "deepspeed")


def dependency_versions() -> str:
    """One line: the installed version of each of :data:`DEPENDENCIES` ("-" where not installed)."""
    import importlib.metadata as md

    parts = []
    for name in DEPENDENCIES:
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            parts.append(f"{name} -")
    return "  ".join(parts)


def main() -> int:
    import torch

    import sgg_fast

    print(
        f"sgg_fast {sgg_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f"  cuda available: {torch.cuda.is_available()}"
    )
    print(dependency_versions())
    from . import _ext

    print(_ext.status_line())  # loads (or JIT-builds) the compiled extension; says why not
    print()
    print(f"{'backend':<8} {'status':<13} details")
    for name, ok, detail in backend_table():
        print(f"{name:<8} {'available' if ok else 'unavailable':<13} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
