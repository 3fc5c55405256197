"""What CI installs is what setup.py declares: the Makefile installs the package with setup.py's
extras (one list), so the two cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_extras() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_makefile_installs_setup_extras():
    make = (ROOT / "Makefile").read_text()
    m = re.search(r"^EXTRAS\s*:=\s*(\S+)\s*$", make, re.M)
    assert m, "Makefile has no EXTRAS line"
    named = set(m.group(1).split(","))
    extras = _setup_extras()
    assert named <= set(extras), f"Makefile names extras setup.py lacks: {named - set(extras)}"
    assert {"test", "eval", "triton", "bench", "profile"} <= named
    assert '-e ".[$(EXTRAS)]"' in make, "the editable install must take the extras from EXTRAS"
    assert not re.search(r"^(EVAL_)?DEPS\s*:=", make, re.M), "a second package list in the Makefile"


def test_integrations_package_is_installed_by_setup():
    tree = ast.parse((ROOT / "setup.py").read_text())
    pkgs = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "packages")
    assert "sgg_fast.integrations" in pkgs
