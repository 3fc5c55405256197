"""The package's structure (docs/DESIGN.md §3): no import cycle in sgg_fast/, the layers contract
of pyproject.toml (``lint-imports`` in ``make lint``), and a local step that never enters the
distributed layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sgg_fast import SGGAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cycles(graph, modules) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_in_sgg_fast():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (make lint)
    graph = grimp.build_graph("sgg_fast")
    modules = {m for m in graph.modules if m.startswith("sgg_fast.") and not m.startswith("sgg_fast.kernels")}
    assert "sgg_fast.plan" in modules and "sgg_fast.backends.base" in modules  # premise: the graph is the package
    assert _cycles(graph, modules) == []
    # the check sees a cycle when there is one: the plan importing a backend closes one
    graph.add_import(importer="sgg_fast.plan", imported="sgg_fast.backends.triton_backend")
    assert any("sgg_fast.plan" in c for c in _cycles(graph, modules))


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (make lint installs it)")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout + r.stderr


def test_a_local_step_never_enters_the_distributed_layer(backend):
    dist_file = os.path.join(ROOT, "sgg_fast", "distributed.py")
    ps = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = SGGAdamW(ps, backend=backend, lr=1e-2)
    entered: list[str] = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == dist_file:
            entered.append(frame.f_code.co_name)

    for _ in range(3):  # a new plan, then reused ones
        for p in ps:
            p.grad = torch.randn_like(p)
        sys.setprofile(prof)
        try:
            opt.step()
        finally:
            sys.setprofile(None)
    assert entered == [], entered
    # premise: the profile sees the distributed layer when a step does enter it
    sys.setprofile(prof)
    try:
        import sgg_fast.distributed as D

        D.prepare(opt._prepare(), None, "SGGAdamW")
    finally:
        sys.setprofile(None)
    assert "prepare" in entered


def test_overlap_uses_no_private_name_of_the_optimizer():
    """overlap_backward drives the optimizer through its public methods (``step_plan``,
    ``check_settings``, ``engine``, ``owner``, ``overlap_handle``), never its privates."""
    import ast

    def private_names(path):
        tree = ast.parse(open(path).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)
        return names

    own = private_names(os.path.join(ROOT, "sgg_fast", "optimizer.py"))
    assert {"_check_state", "_init_group", "_commit", "_engine"} <= own  # premise: the privates are seen
    tree = ast.parse(open(os.path.join(ROOT, "sgg_fast", "overlap.py")).read())
    used = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                   and isinstance(node.value, ast.Name) and node.value.id in ("opt", "optimizer")
                   and node.attr in own}
                  | {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Attribute) and node.value.attr == "_opt" and node.attr in own})
    assert used == [], used
