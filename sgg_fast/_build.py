"""How the compiled extension is built: sources, flags, the CUDA toolkit. Used by ``setup.py``
(ahead-of-time build) and by :mod:`sgg_fast._ext` (JIT build on first use), so both build the
same thing. Imports nothing from sgg_fast and no torch at module level (setup.py loads this file
by path).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import warnings

# ---- where the sources are -------------------------------------------------------------------
_HERE = os.path.dirname(os.path.abspath(__file__))


def csrc_dir() -> str | None:
    """``csrc/`` of a source checkout (editable install), else the copy installed as package data."""
    for cand in (os.path.join(os.path.dirname(_HERE), "csrc"), os.path.join(_HERE, "csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    return None


CPU_SOURCES = [
    "ops.cpp",
    "cpu/ops_cpu.cpp",
    "cpu/kernels_default.cpp",
    "cpu/kernels_avx2.cpp",
    "cpu/kernels_avx512.cpp",
]
CUDA_SOURCES = ["cuda/ops_cuda.cpp", "cuda/kernels.cu"]
HEADERS = ["sgg_common.h", "checks.h", "cpu/kernels.h", "cpu/kernels_impl.h", "cuda/cuda_table.h"]


def sources(root: str, with_cuda: bool) -> list[str]:
    # the default-ISA kernels come before the AVX2/AVX-512 ones: when the linker keeps one copy
    # of an inline function emitted by several of them, it keeps the first (portable) one
    files = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [os.path.join(root, f) for f in files]


def source_hash(root: str) -> str:
    """Hash of every C++/CUDA source and header: compiled into the extension so that a stale
    build (sources edited after ``pip install -e .``) can be told apart."""
    h = hashlib.sha1()
    for f in sorted(set(CPU_SOURCES + CUDA_SOURCES + HEADERS)):
        path = os.path.join(root, f)
        if os.path.isfile(path):
            h.update(f.encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


# ---- flags -----------------------------------------------------------------------------------
def torch_uses_openmp() -> bool:
    """Whether torch's CPU parallel backend is OpenMP (``ATen parallel backend: OpenMP``), i.e.
    ``at::parallel_for`` is the header template built on ``#pragma omp parallel`` and only runs
    threads in a translation unit compiled with OpenMP. (With the native thread pool it calls
    into libtorch and needs no flags.)"""
    import torch

    return bool(torch.backends.openmp.is_available())


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for OpenMP, the way torch's own C++ code generation
    (torch._inductor.cpp_builder._get_openmp_args) builds CPU kernels on Linux: ``-fopenmp``
    for gcc and clang, linked against ``libgomp``, the runtime torch ships and has already
    loaded (torch/lib/libgomp.so.1), so there is one OpenMP thread pool in the process. Empty
    when torch does not use OpenMP, on Windows (MSVC) and on macOS (Apple clang has no
    -fopenmp; torch's macOS wheels use the native thread pool)."""
    if platform.system() not in ("Linux", "FreeBSD") or not torch_uses_openmp():
        return [], []
    return ["-fopenmp"], ["-fopenmp", "-lgomp"]


def cxx_flags(debug: bool = False) -> list[str]:
    # -ffp-contract=off: no a*b+c → fma contraction, so finalize rounds operation by operation
    # exactly like guidance.finalize's torch ops (and the vector and tail paths agree bitwise)
    flags = ["-O0", "-g"] if debug else ["-O3"]
    flags += ["-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-Wno-maybe-uninitialized"]
    flags += openmp_flags()[0]
    if platform.system() != "Windows":
        flags += ["-fvisibility=hidden"]
        flags += torch_system_includes()
    return flags


def torch_system_includes() -> list[str]:
    """torch's header directories as system headers (``-isystem``; gcc then ignores the ``-I``
    that torch.utils.cpp_extension adds for the same directory). torch builds itself with
    -Wno-unknown-pragmas and its at::vec headers hold ``#pragma unroll`` / ``#pragma clang``
    lines that gcc would warn about in every kernel file. Warnings stay on for csrc/ itself;
    that OpenMP is on where torch's parallel_for needs it is checked by an ``#error`` in
    csrc/cpu/ops_cpu.cpp, not by a warning."""
    from torch.utils import cpp_extension

    return [f"-isystem{d}" for d in cpp_extension.include_paths()]


def ld_flags() -> list[str]:
    """Link flags of the extension (ahead-of-time and JIT builds alike)."""
    return openmp_flags()[1]


def nvcc_flags(archs: list[str], debug: bool = False, threads: int = 2) -> list[str]:
    # FMA contraction stays on: finalize_row (the bitwise mirror of guidance.finalize) rounds
    # its products on their own with mul_nc (csrc/sgg_common.h); tests/test_cuda_ptx.py checks
    flags = ["-O3" if not debug else "-G", "--expt-relaxed-constexpr", "-lineinfo", f"--threads={threads}"]
    for a in archs:
        num = a.replace(".", "").replace("+PTX", "")
        flags += [f"-gencode=arch=compute_{num},code=sm_{num}"]
        if a.endswith("+PTX"):
            flags += [f"-gencode=arch=compute_{num},code=compute_{num}"]
    return flags


def parse_archs(value: str) -> list[str]:
    """``"80;90"`` / ``"8.0 9.0+PTX"`` → ``["80", "90"]`` / ``["80", "90+PTX"]``."""
    out = []
    for a in re.split(r"[;,\s]+", value.strip()):
        if a:
            out.append(a.replace(".", ""))
    return out


# ---- the CUDA toolkit ------------------------------------------------------------------------
def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home_from_nvcc(nvcc: str | None) -> str | None:
    """The toolkit root behind ``nvcc``. ``nvcc`` on PATH may be a wrapper script such as
    ``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` (torch would then guess ``/usr/local``): follow
    symlinks, and read an ``exec .../bin/nvcc`` line of a script."""
    if not nvcc:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        m = re.search(rb"exec\s+[\"']?([^\s\"']+/bin/nvcc)\b", head)
        if m:
            real = os.path.realpath(m.group(1).decode())
    return os.path.dirname(os.path.dirname(real))


def ensure_cuda_home() -> str | None:
    """Set ``CUDA_HOME`` (before torch.utils.cpp_extension is imported) when it is not set and
    nvcc is found; returns the toolkit root or None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    home = cuda_home_from_nvcc(find_nvcc())
    if home:
        os.environ["CUDA_HOME"] = home
    return home


def patch_torch_cuda_home(home: str | None) -> None:
    """torch.utils.cpp_extension computes CUDA_HOME at import; correct it if it guessed wrong."""
    if not home:
        return
    import torch.utils.cpp_extension as ce

    if ce.CUDA_HOME != home:
        ce.CUDA_HOME = home


def cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)
