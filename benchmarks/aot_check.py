"""Ahead-of-time checks against the GPU image's toolchain, without a GPU (issue 25, `make aot-image`).

The GPU image (torch 2.11, triton 3.6.0, nvcc 13.0, sm_90) is not what CI installs (torch 2.14.1,
triton 3.8), so a kernel that only the image's compiler rejects would first fail on a lent GPU.
Two checks, each a subcommand:

``triton [--triton-path DIR ...]``
    1. *Enumerate* every launch the Triton backend can make: a subprocess under
       ``TRITON_INTERPRET=1`` drives the real backend (``sgg_fast.backends.triton_backend``:
       stats, reduce, finalize, apply for SGGAdamW; stats, finalize, guide for GradientGuidance)
       over plans spanning every input that selects a compile-time constant: one element type or
       mixed (DT), aligned or unaligned tensors (ALIGNED), amsgrad (AMS), SGGAdamW or
       GradientGuidance (COPY_STEPS), each chunk size ``gpu_chunk`` can return (CHUNK) and segment
       counts giving each finalize tile (SB, KB). The kernels are replaced by recorders, so what is
       listed is exactly what the launchers pass (constexprs, num_warps, maxnreg,
       enable_fp_fusion), derived from the launcher code, not written here. (The recorder is
       named like triton's InterpretedFunction: the backend checks that CPU tensors meet
       interpreted kernels by that class name.)
    2. *Compile* each recorded variant for sm_90 with ``triton.compile`` (no GPU needed) as the
       runtime specialises it (a pointer argument whose address is a multiple of 16 marked
       divisible, "D": every one the backend passes), with ``--also-plain`` also without that
       specialisation; under the installed triton and under each ``--triton-path`` (a
       ``pip install --target`` directory put first on ``sys.path`` of the compiling
       subprocess). Any compiler error fails the check, as does a register spill: a local-memory
       store or load in the SASS (STL/LDL; the kernels have no local arrays) or in the PTX, or
       local memory in the cubin's resource usage (cuobjdump of the triton under test).

``csrc --torch-root DIR``
    Compile ``csrc/`` (the C++ and CUDA sources of sgg_fast._C) to objects against another
    torch's headers (``DIR/torch/include``, e.g. torch 2.11's, unpacked from its wheel), with the
    flags of ``sgg_fast/_build.py`` (what setup.py and the JIT build use) and nvcc for sm_90
    (what ``benchmarks/gpu_check.sh`` builds). Compile only: linking would need that torch's
    libraries.

Exit status 0 only when everything compiled; a summary line per triton says how many variants
and how long.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# 1. enumeration (runs under TRITON_INTERPRET=1, with the installed triton)
# ---------------------------------------------------------------------------------------------

_KERNELS = {  # recorder target -> (module, attribute): every kernel a launcher of kernels/ calls
    "stats": ("sgg_fast.kernels.stats", "_stats_kernel"),
    "finalize": ("sgg_fast.kernels.stats", "_finalize_kernel"),
    "apply": ("sgg_fast.kernels.apply", "_apply_kernel"),
    "guide": ("sgg_fast.kernels.apply", "_guide_kernel"),
}


def _arg_type(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}[x.dtype]
    if isinstance(x, bool):
        raise TypeError("a bool runtime argument (the kernels take none)")
    if isinstance(x, int):
        return "i32" if -(2**31) <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {type(x).__name__}")


def enumerate_variants() -> list[dict]:
    """Every distinct (kernel, signature, constexprs, options) the triton backend launches."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("enumerate runs under TRITON_INTERPRET=1 (CPU tensors drive the backend)")
    import importlib

    import torch

    from sgg_fast import GradientGuidance, SGGAdamW
    from sgg_fast.backends import get_backend
    from sgg_fast.backends import triton_backend as TB
    from sgg_fast.kernels import layout as L
    from sgg_fast.kernels import stats as KS

    seen: dict[str, dict] = {}

    def recorder(name):
        def launch(*args, **kwargs):
            # the runtime specialises a pointer argument whose address is a multiple of 16 ("D",
            # tt.divisibility); CPU tensors are aligned as CUDA ones are (allocator blocks)
            div = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0]
            rec = {"kernel": name, "args": [_arg_type(a) for a in args], "div_args": div, "kwargs": kwargs}
            seen.setdefault(json.dumps(rec, sort_keys=True), rec)

        # named like triton's InterpretedFunction: the backend checks that CPU tensors meet
        # interpreted kernels by that class name
        class InterpretedRecorder:
            def __getitem__(self, grid):
                return launch

        return InterpretedRecorder()

    for name, (mod, attr) in _KERNELS.items():
        setattr(importlib.import_module(mod), attr, recorder(name))

    be = get_backend("triton")
    # every chunk size the GPU path can pick (kernels/stats.py gpu_chunk, from 1 element to 2^40
    # on GPUs of 1 to 1024 SMs), each forced through the backend's CHUNK_OVERRIDE
    chunks = sorted({KS.gpu_chunk(1 << k, sm) for k in range(41) for sm in (1, 16, 66, 78, 108, 132, 144, 1024)})
    # segment counts: every finalize tile size SB = min(MAX_SEG_BLOCK, next_power_of_2(S))
    seg_counts = sorted({1} | {(1 << k) + 1 for k in range(KS.MAX_SEG_BLOCK.bit_length() + 1)})
    dtype_sets = [[torch.float32], [torch.bfloat16], [torch.float16], [torch.float32, torch.bfloat16, torch.float16]]

    def params(dtypes, n, aligned, numel=40):
        out = []
        for i in range(n):
            dt = dtypes[i % len(dtypes)]
            if aligned:
                p, g = torch.randn(numel, dtype=dt), torch.randn(numel, dtype=dt)
            else:  # views at an odd element offset into a flat buffer: the scalar path only
                p, g = torch.randn(numel + 1, dtype=dt)[1:].detach(), torch.randn(numel + 1, dtype=dt)[1:]
                assert p.data_ptr() % 16
            p.requires_grad_()
            p.grad = g
            out.append(p)
        return out

    def run_sgg(dtypes, n, aligned, amsgrad, numel=40):
        ps = params(dtypes, n, aligned, numel)
        opt = SGGAdamW(ps, amsgrad=amsgrad, backend="triton", granularity="tensor", reference="ema")
        plan = opt._prepare()
        part = be.stats(plan)
        be.reduce(plan, part)
        out = be.finalize(plan, part)
        be.apply(plan, out)
        tab = plan.cache.triton
        return tab

    def run_guide(dtypes, n, aligned, numel=40):
        ps = params(dtypes, n, aligned, numel)
        gg = GradientGuidance(torch.optim.SGD(ps, lr=0.1), backend="triton", granularity="tensor", reference="ema")
        plan = gg._prepare()
        part = be.stats(plan)
        out = be.finalize(plan, part)
        be.guide(plan, out)
        return plan.cache.triton

    # the table flags the runs must have produced (premises of the matrix)
    dts, als, amss = set(), set(), set()
    old = TB.CHUNK_OVERRIDE
    try:
        for chunk in chunks:
            TB.CHUNK_OVERRIDE = chunk
            for dtypes in dtype_sets:
                for aligned in (True, False):
                    for amsgrad in (False, True):
                        tab = run_sgg(dtypes, len(dtypes), aligned, amsgrad)
                        dts.add(tab.dt)
                        als.add(tab.aligned)
                        amss.add(tab.amsgrad)
                    run_guide(dtypes, len(dtypes), aligned)
        # tensors of two chunks each: the partials are per chunk, so reduce() launches too
        TB.CHUNK_OVERRIDE = chunks[0]
        for s in seg_counts:
            run_sgg([torch.float32], s, True, False, numel=chunks[0] + 1)
            run_guide([torch.float32], s, True, numel=chunks[0] + 1)
    finally:
        TB.CHUNK_OVERRIDE = old
    assert dts == {L.DT_F32, L.DT_BF16, L.DT_F16, L.DT_MIXED}, dts
    assert als == {True, False} and amss == {True, False}, (als, amss)
    return sorted(seen.values(), key=lambda r: json.dumps(r, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# 2. compilation (runs without the interpreter, with the triton under test first on sys.path)
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A CUDA binary tool bundled with triton's nvidia backend (cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


class _stderr_to:
    """Capture file descriptor 2 (what native code prints) into a temporary file."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self._text = self._file.read()
        self._file.close()
        return False

    def text(self) -> str:
        return getattr(self, "_text", "")


def compile_variants(variants: list[dict], arch: int) -> list[dict]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for v in variants:
        mod, attr = _KERNELS[v["kernel"]]
        fn = getattr(importlib.import_module(mod), attr)
        kwargs = dict(v["kwargs"])
        names = [p.name for p in fn.params]
        sig, constexprs, attrs = {}, {}, {}
        pos = iter(enumerate(v["args"]))
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                val = kwargs.pop(p.name) if p.name in kwargs else p.default
                sig[p.name] = "constexpr"
                constexprs[p.name] = val
            else:
                k, ty = next(pos)
                sig[p.name] = ty
                if k in v["div_args"]:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        assert next(pos, None) is None, v
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        assert not kwargs, f"non-constexpr keyword arguments {kwargs} of {v['kernel']}"
        rec = {**v, "error": None}
        t0 = time.perf_counter()
        try:
            with _stderr_to() as diag:  # MLIR prints its diagnostics to fd 2, not into the exception
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                   target=target, options=options)
        except Exception as exc:  # the compiler's own error text is the point of the check
            chain, e = [], exc
            while e is not None and len(chain) < 5:
                chain.append(f"{type(e).__name__}: {e}")
                e = e.__cause__ or e.__context__
            errors = [ln.strip() for ln in diag.text().splitlines() if "error" in ln.lower()]
            rec["error"] = ("\n".join(errors[:5] + chain[::-1]))[-4000:]
            results.append(rec)
            continue
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        ptx = k.asm["ptx"]
        rec["ptx_local"] = len(re.findall(r"\b(ld|st)\.local", ptx))
        # registers (cuobjdump -res-usage) and spills: local-memory stores/loads in the SASS (STL/LDL:
        # the kernels have no local arrays, so every one is a ptxas register spill)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "k.cubin")
            with open(f, "wb") as fh:
                fh.write(k.asm["cubin"])
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", f], capture_output=True, text=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f], capture_output=True, text=True).stdout
        usage = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res))
        rec["regs"] = int(usage.get("REG", -1))
        rec["stack"] = int(usage.get("STACK", 0))
        rec["local"] = int(usage.get("LOCAL", 0))
        rec["stl"] = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
        rec["ldl"] = len(re.findall(r"\bLDL(\.\w+)*\s", sass))
        if rec["regs"] < 0 or "Function" not in sass:
            rec["error"] = f"no resource usage / SASS from cuobjdump: {res[-500:]}"
        elif rec["ptx_local"] or rec["stl"] or rec["ldl"] or rec["local"]:
            rec["error"] = (f"register spill: {rec['stl']} STL / {rec['ldl']} LDL in the SASS, {rec['ptx_local']} "
                            f"local loads/stores in the PTX, LOCAL:{rec['local']} STACK:{rec['stack']} in the cubin")
        results.append(rec)
    return results


def _describe(v: dict) -> str:
    consts = {k: x for k, x in v["kwargs"].items() if k not in ("num_warps", "enable_fp_fusion", "maxnreg")}
    ptrs = [i for i, t in enumerate(v["args"]) if t.startswith("*")]
    spec = "D" if v["div_args"] == ptrs else "plain" if not v["div_args"] else f"D at {v['div_args']}"
    return f"{v['kernel']}({', '.join(f'{k}={x}' for k, x in consts.items())}) [{spec}]"


def _worker_env(path: str | None) -> dict:
    env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SGG_AOT_TRITON_PATH"] = path or ""
    return env


def _run_worker(path: str | None, variants: list[dict], arch: int, cache: str) -> list[dict]:
    env = _worker_env(path)
    env["TRITON_CACHE_DIR"] = cache
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(variants, fh)
        inp = fh.name
    try:
        res = subprocess.run([sys.executable, __file__, "_compile", inp, "--arch", str(arch)], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    finally:
        os.unlink(inp)
    if res.returncode != 0:
        raise SystemExit(f"the compiling subprocess ({path or 'installed triton'}) failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _triton_version(path: str | None) -> tuple[str, str]:
    code = ("import sys, os; p = os.environ['SGG_AOT_TRITON_PATH']; p and sys.path.insert(0, p); "
            "import triton; print(triton.__version__, triton.__file__)")
    res = subprocess.run([sys.executable, "-c", code], env=_worker_env(path), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cannot import triton from {path or 'the environment'}: {res.stderr[-2000:]}")
    ver, where = res.stdout.split()
    if path and not os.path.realpath(where).startswith(os.path.realpath(path)):
        raise SystemExit(f"--triton-path {path}: triton was imported from {where}, not from it")
    return ver, where


def cmd_triton(args) -> int:
    t0 = time.perf_counter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, __file__, "_enumerate"], cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        raise SystemExit("aot_check: enumerating the backend's launches failed")
    launches = json.loads(res.stdout.strip().splitlines()[-1])
    variants = list(launches)
    if args.also_plain:  # and each without the divisibility specialisation (the review compiled both)
        variants += [{**v, "div_args": []} for v in launches if v["div_args"]]
    by_kernel: dict[str, int] = {}
    for v in launches:
        by_kernel[v["kernel"]] = by_kernel.get(v["kernel"], 0) + 1
    print(f"aot_check: {len(launches)} launch variants of the triton backend "
          f"({', '.join(f'{k} {n}' for k, n in sorted(by_kernel.items()))}; enumerated in "
          f"{time.perf_counter() - t0:.1f} s), as the runtime specialises them"
          f"{' and without pointer divisibility' if args.also_plain else ''}: "
          f"{len(variants)} compiles per triton, sm_{args.arch}")
    failed = 0
    report = {}
    for path in [None, *args.triton_path]:
        t1 = time.perf_counter()
        ver, where = _triton_version(path)
        cache = os.path.join(args.cache, f"triton-{ver}")
        shards = [variants[i::args.jobs] for i in range(args.jobs)]
        with ThreadPoolExecutor(args.jobs) as ex:
            parts = list(ex.map(_run_worker, [path] * len(shards), shards, [args.arch] * len(shards),
                                [cache] * len(shards)))
        results = [r for p in parts for r in p]
        bad = [r for r in results if r["error"]]
        for r in bad:
            lines = r["error"].strip().splitlines()
            print(f"  FAILED under triton {ver}: {_describe(r)}: {' | '.join(ln[:200] for ln in lines[:2])}")
        regs = {}
        for r in results:
            if not r["error"]:
                key = r["kernel"]
                regs[key] = max(regs.get(key, 0), r["regs"])
        wall = time.perf_counter() - t1
        print(f"aot_check: triton {ver} ({os.path.dirname(where)}): {len(results) - len(bad)}/{len(results)} "
              f"compiled without spills in {wall:.0f} s (max registers: "
              f"{', '.join(f'{k} {n}' for k, n in sorted(regs.items()))})")
        failed += len(bad)
        report[ver] = results
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"aot_check triton: {f'FAILED: {failed} compile(s)' if failed else 'ok'} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# csrc/ against another torch's headers
# ---------------------------------------------------------------------------------------------


def cmd_csrc(args) -> int:
    import sysconfig

    sys.path.insert(0, os.path.join(ROOT, "sgg_fast"))
    import _build as B  # sgg_fast/_build.py: the flags setup.py and the JIT build use

    inc = os.path.join(args.torch_root, "torch", "include")
    if not os.path.isfile(os.path.join(inc, "torch", "extension.h")):
        raise SystemExit(f"aot_check csrc: no torch/include/torch/extension.h under {args.torch_root}")
    version = "unknown"
    vfile = os.path.join(args.torch_root, "torch", "version.py")
    if os.path.isfile(vfile):
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", open(vfile).read())
        version = m.group(1) if m else version
    # the C++ standard that torch's cpp_extension adds (2.11: c++17; 2.14: c++20)
    std = "c++17"
    cfile = os.path.join(args.torch_root, "torch", "utils", "cpp_extension.py")
    if os.path.isfile(cfile):
        stds = re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", open(cfile).read())
        std = stds[0] if stds else std
    includes = [inc, os.path.join(inc, "torch", "csrc", "api", "include")]
    py_inc = sysconfig.get_paths()["include"]
    cuda_home = B.ensure_cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.isfile(nvcc):
        raise SystemExit("aot_check csrc: no nvcc (PATH or CUDA_HOME)")
    cxx = B.cxx_compiler()
    root = os.path.join(ROOT, "csrc")
    macros = [f"-DSGG_FAST_SOURCE_HASH={B.source_hash(root)}", "-DSGG_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
              "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    # cxx_flags() without its -isystem of the *installed* torch: the other torch's headers instead
    cxx_flags = [f for f in B.cxx_flags(False) if not f.startswith("-isystem")]
    sys_inc = [f"-isystem{d}" for d in includes] + [f"-isystem{py_inc}", f"-isystem{cuda_home}/include"]
    archs = B.parse_archs(args.archs)
    out = tempfile.mkdtemp(prefix="aot_csrc_")
    jobs = []
    for src in B.sources(root, with_cuda=True):
        obj = os.path.join(out, os.path.relpath(src, root).replace("/", "_") + ".o")
        if src.endswith(".cu"):
            # torch.utils.cpp_extension's nvcc defaults, then _build.nvcc_flags (the image builds sm_90)
            cmd = [nvcc, "-c", src, "-o", obj, *macros, *(f"-I{d}" for d in includes), f"-I{py_inc}",
                   "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                   "--compiler-options", "-fPIC", f"-std={std}", *B.nvcc_flags(archs, False, 2)]
        else:
            # with the flags setuptools takes from python's build (-DNDEBUG -O3 -Wall ...)
            cmd = [cxx, "-c", src, "-o", obj, "-DNDEBUG", "-Wall", "-fwrapv", "-fPIC", f"-std={std}", *macros,
                   *cxx_flags, *sys_inc]
        jobs.append((src, cmd))
    t0 = time.perf_counter()

    def run(job):
        src, cmd = job
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src, r.returncode, r.stderr, time.perf_counter() - t

    failed = 0
    with ThreadPoolExecutor(args.jobs) as ex:
        for src, rc, err, dt in ex.map(run, jobs):
            rel = os.path.relpath(src, ROOT)
            print(f"  {'ok' if rc == 0 else 'FAILED'} {rel} ({dt:.0f} s)")
            if rc != 0:
                failed += 1
                print("\n".join("    " + ln for ln in err.strip().splitlines()[-30:]))
    print(f"aot_check csrc: {len(jobs) - failed}/{len(jobs)} sources compiled against torch {version} headers "
          f"(-std={std}, nvcc {', '.join('sm_' + a for a in archs)}) in {time.perf_counter() - t0:.0f} s"
          + (": FAILED" if failed else ": ok"))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("triton", help="compile every launch variant of the triton backend for sm_90")
    t.add_argument("--triton-path", action="append", default=[],
                   help="a `pip install --target` directory holding another triton (repeatable)")
    t.add_argument("--arch", type=int, default=90)
    t.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    t.add_argument("--cache", default=os.path.join(ROOT, "build", "aot", "triton-cache"),
                   help="TRITON_CACHE_DIR root (one folder per triton version)")
    t.add_argument("--json", help="write every compile's result here")
    t.add_argument("--also-plain", action="store_true",
                   help="also compile each variant without the pointer divisibility specialisation (twice the time)")
    c = sub.add_parser("csrc", help="compile csrc/ against another torch's headers (objects only)")
    c.add_argument("--torch-root", required=True, help="a folder holding torch/include (and torch/version.py)")
    c.add_argument("--archs", default="90")
    c.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    e = sub.add_parser("_enumerate")
    w = sub.add_parser("_compile")
    w.add_argument("variants")
    w.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if args.cmd == "triton":
        return cmd_triton(args)
    if args.cmd == "csrc":
        return cmd_csrc(args)
    if args.cmd == "_enumerate":
        print(json.dumps(enumerate_variants()))
        return 0
    del e
    path = os.environ.get("SGG_AOT_TRITON_PATH")
    if path:
        sys.path.insert(0, path)
    with open(args.variants) as fh:
        print(json.dumps(compile_variants(json.load(fh), args.arch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
