"""The backend registry: discovery, auto order, forced backends, SGG_FAST_BACKEND, fused=True."""

from __future__ import annotations

import pytest
import torch

from sgg_fast import SGGAdamW, available_backends
from sgg_fast.backends import all_backends, get_backend, resolve
from sgg_fast.plan import build_plan


def _plan(dtype=torch.float32):
    p = torch.randn(5, dtype=dtype, requires_grad=True)
    p.grad = torch.randn_like(p)
    return build_plan(SGGAdamW([p]).param_groups)


def test_every_backend_module_registers():
    names = set(all_backends())
    assert {"torch", "cpu", "cuda", "triton"} <= names
    for name, b in all_backends().items():
        assert b.name == name and b.description
        assert isinstance(b.unavailable_reasons(), list)
    assert "torch" in available_backends()


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*'torch'"):
        get_backend("nope")
    with pytest.raises(ValueError, match="unknown backend"):
        SGGAdamW([torch.zeros(2, requires_grad=True)], backend="nope")


def test_auto_prefers_a_fused_backend_on_cpu_and_falls_back_to_torch():
    plan = _plan()
    chosen = resolve("auto", plan).name
    assert chosen == ("cpu" if "cpu" in available_backends() else "torch")
    # float64: only the torch backend serves it
    assert resolve("auto", _plan(torch.float64)).name == "torch"


def test_forced_backend_that_cannot_serve_says_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run this step: .*cuda"):
        resolve("cuda", _plan())


def test_fused_only_excludes_torch():
    if "cpu" in available_backends():
        assert resolve("auto", _plan(), fused_only=True).name == "cpu"
    with pytest.raises(RuntimeError, match="fused=True"):
        resolve("auto", _plan(torch.float64), fused_only=True)
    with pytest.raises(ValueError, match="fused=True"):
        SGGAdamW([torch.zeros(2, requires_grad=True)], fused=True, backend="torch")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("SGG_FAST_BACKEND", "torch")
    assert resolve("auto", _plan()).name == "torch"
    monkeypatch.setenv("SGG_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        resolve("auto", _plan())


def test_info_lists_every_backend(capsys):
    from sgg_fast import info

    info.main()
    out = capsys.readouterr().out
    for name in all_backends():
        assert name in out, f"python -m sgg_fast.info does not list backend {name!r}"


def test_info_prints_the_dependency_versions(capsys):
    """`python -m sgg_fast.info` (CI prints it) names the installed release of torch, triton,
    transformers, kernels and deepspeed, or '-' where one is not installed."""
    import importlib.metadata as md

    import torch

    from sgg_fast import info

    info.main()
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for name in ("triton", "transformers", "kernels", "deepspeed"):
        try:
            want = f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            want = f"{name} -"
        assert want in out, (want, out)
