"""The `.[eval]` extra (setup.py) and the Makefile's EVAL_DEPS (what CI installs) name the same packages."""

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


def test_eval_extra_matches_makefile():
    extra = set(_setup_extras()["eval"])
    m = re.search(r"^EVAL_DEPS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no EVAL_DEPS line"
    assert set(m.group(1).split()) == extra


def test_integrations_package_is_installed_by_setup():
    tree = ast.parse((ROOT / "setup.py").read_text())
    pkgs = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "packages")
    assert "sgg_fast.integrations" in pkgs
