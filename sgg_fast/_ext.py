"""Loading the compiled extension (``torch.ops.sgg_fast``), lazily: never at ``import sgg_fast``.

Order of attempts on first use (:func:`load`):

1. the extension built by ``setup.py`` (``sgg_fast._C``), unless ``SGG_FAST_NO_PREBUILT=1``;
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` into a cached build
   directory (``SGG_FAST_JIT_DIR``, default torch's extension cache; rebuilt only when the
   sources change), unless ``SGG_FAST_NO_JIT=1``. CUDA sources are included when a GPU and
   nvcc are present (archs: ``SGG_FAST_CUDA_ARCHS``, default the GPU's own).

When both fail, :func:`error` holds the reason (shown by ``python -m sgg_fast.info``) and the
``cpu``/``cuda`` backends report themselves unavailable; the torch (and triton) backends work.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from typing import Any

from . import _build

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "how": None, "info": {}, "tried": False}


def _outside_dynamo(fn):
    """``fn`` (file-system checks, loading or building a library) always runs eagerly: when
    called from code Dynamo traces (a compiled ``opt.step``), through ``torch._dynamo.disable``,
    so that Dynamo does not trace into ``os.stat`` & co. (a graph break there instead of a
    "cannot trace posix.stat" warning). ``torch._dynamo`` is not imported for this: when it is
    not imported yet, nothing is being compiled."""
    disabled = []

    def call(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(dynamo.disable(fn, reason="sgg_fast loads its extension eagerly"))
        return disabled[0](*args, **kwargs)

    call.__name__, call.__doc__, call.__wrapped__ = fn.__name__, fn.__doc__, fn
    return call


def _env(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _find_prebuilt():
    try:
        return importlib.util.find_spec("sgg_fast._C")
    except (ImportError, ValueError):
        return None


#: where the prebuilt extension is (a file-system look-up done once, at import)
_PREBUILT_SPEC = _find_prebuilt()


def _prebuilt_spec():
    return None if _env("SGG_FAST_NO_PREBUILT") else _PREBUILT_SPEC


def cheap_reasons() -> list[str]:
    """Why the extension cannot be used, without loading or building anything (may be [] and
    the first load still fail: then :func:`error` says why)."""
    if _state["error"]:
        return [_state["error"]]
    if _state["loaded"] or _prebuilt_spec() is not None:
        return []
    return _build_reasons()


@_outside_dynamo
def _build_reasons() -> list[str]:
    """The file-system half of :func:`cheap_reasons` (sources, compiler)."""
    if _env("SGG_FAST_NO_JIT"):
        return [
            "the compiled extension sgg_fast._C is not installed and SGG_FAST_NO_JIT=1 forbids "
            "a JIT build; reinstall with a C++ compiler present (pip install -e .)"
        ]
    if _build.csrc_dir() is None:
        return [
            "the compiled extension sgg_fast._C is not installed and the C++ sources (csrc/) "
            "for a JIT build are missing; reinstall sgg_fast with a C++ compiler present"
        ]
    if _build.cxx_compiler() is None:
        return [
            "the compiled extension sgg_fast._C is not installed and no C++ compiler was found "
            "for a JIT build; install g++ (or set CXX) and reinstall, or use backend='torch'"
        ]
    return []


def loaded() -> bool:
    return _state["loaded"]


def error() -> str | None:
    return _state["error"]


def how() -> str | None:
    """``"prebuilt"`` or ``"jit"`` once loaded."""
    return _state["how"]


def info() -> dict[str, str]:
    """``torch.ops.sgg_fast.sgg_build_info()`` parsed (after a successful load)."""
    return dict(_state["info"])


def has_cuda_kernels() -> bool:
    import torch

    return _state["loaded"] and torch._C._dispatch_has_kernel_for_dispatch_key("sgg_fast::sgg_stats", "CUDA")


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = str(exc)
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    text = "\n".join(lines[:8]) if lines else text
    return text if len(text) <= limit else text[:limit] + " …"


def _load_prebuilt() -> str | None:
    """Import sgg_fast._C; None on success, else the reason."""
    try:
        importlib.import_module("sgg_fast._C")
        return None
    except Exception as exc:  # a broken/incompatible build: try the JIT path
        return f"sgg_fast._C failed to load ({type(exc).__name__}: {_short(exc)})"


def _jit_build() -> None:
    # CUDA_HOME first: torch.utils.cpp_extension guesses it at import (wrongly for a wrapper nvcc)
    home = None if _env("SGG_FAST_SKIP_CUDA") else _build.ensure_cuda_home()
    import torch
    from torch.utils import cpp_extension

    root = _build.csrc_dir()
    if root is None:
        raise RuntimeError("the C++ sources (csrc/) are not available for a JIT build")
    if _build.cxx_compiler() is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with_cuda = (
        torch.cuda.is_available()
        and torch.version.cuda is not None
        and home is not None
        and os.path.isfile(os.path.join(home, "bin", "nvcc"))
    )
    if with_cuda:
        _build.patch_torch_cuda_home(home)
    h = _build.source_hash(root)
    defines = [f"-DSGG_FAST_SOURCE_HASH={h}"] + (["-DSGG_FAST_WITH_CUDA"] if with_cuda else [])
    debug = _env("SGG_FAST_DEBUG")
    kwargs: dict[str, Any] = {}
    if with_cuda:
        archs = os.environ.get("SGG_FAST_CUDA_ARCHS")
        if archs:
            arch_list = _build.parse_archs(archs)
        else:
            major, minor = torch.cuda.get_device_capability()
            arch_list = [f"{major}{minor}"]
        kwargs["extra_cuda_cflags"] = _build.nvcc_flags(arch_list, debug) + defines
    name = f"sgg_fast_jit_{h}{'_cuda' if with_cuda else ''}"
    build_dir = os.environ.get("SGG_FAST_JIT_DIR")
    if build_dir:
        build_dir = os.path.join(build_dir, name)
        os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=_build.sources(root, with_cuda),
        extra_cflags=_build.cxx_flags(debug) + defines,
        extra_ldflags=_build.ld_flags(),
        with_cuda=with_cuda,
        is_python_module=False,
        build_directory=build_dir,
        verbose=_env("SGG_FAST_VERBOSE_BUILD"),
        **kwargs,
    )


def load() -> bool:
    """Load (or JIT-build) the extension once; True when ``torch.ops.sgg_fast`` is usable."""
    if _state["loaded"]:
        return True
    if _state["tried"]:
        return False
    return _load_once()


@_outside_dynamo
def _load_once() -> bool:
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        problems = []
        if _prebuilt_spec() is not None:
            why = _load_prebuilt()
            if why is None:
                _state["how"] = "prebuilt"
            else:
                problems.append(why)
        if _state["how"] is None:
            if _env("SGG_FAST_NO_JIT"):
                problems.append("JIT build disabled by SGG_FAST_NO_JIT=1")
            else:
                try:
                    _jit_build()
                    _state["how"] = "jit"
                except Exception as exc:
                    problems.append(f"the JIT build failed: {type(exc).__name__}: {_short(exc)}")
        _state["tried"] = True
        if _state["how"] is None:
            if not problems:
                problems.append("the compiled extension sgg_fast._C is not installed")
            _state["error"] = (
                "C++ extension unavailable: "
                + "; ".join(problems)
                + ". The torch backend still works; `python -m sgg_fast.info` shows this."
            )
            warnings.warn("sgg_fast: " + _state["error"], RuntimeWarning, stacklevel=3)
            return False
        import torch

        from . import _ops  # noqa: F401  (fake implementations for torch.compile)

        raw = torch.ops.sgg_fast.sgg_build_info()
        _state["info"] = dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)
        _state["loaded"] = True
        _check_stale()
        return True


def _check_stale() -> None:
    """Warn when a prebuilt extension was compiled from other sources than the checkout's."""
    if _state["how"] != "prebuilt":
        return
    root = _build.csrc_dir()
    built = _state["info"].get("source_hash")
    if root and built and built != _build.source_hash(root):
        warnings.warn(
            "sgg_fast: the compiled extension sgg_fast._C was built from different C++ sources than "
            f"those in {root}; rebuild it (`make install` or `python setup.py build_ext --inplace`).",
            RuntimeWarning,
            stacklevel=4,
        )


def ops():
    """``torch.ops.sgg_fast``, loading the extension first; RuntimeError if it cannot be loaded."""
    if not load():
        raise RuntimeError(_state["error"])
    import torch

    return torch.ops.sgg_fast


def status_line() -> str:
    """One line for ``python -m sgg_fast.info`` (loads / builds the extension if needed)."""
    if not load():
        return f"compiled extension: unavailable — {_state['error']}"
    i = _state["info"]
    cuda = "with CUDA kernels" if i.get("cuda") == "1" else "CPU only (built without CUDA)"
    return f"compiled extension: {_state['how']}, cpu isa {i.get('cpu_isa')}, {cuda}"
