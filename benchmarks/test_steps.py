"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

The same rows as ``python -m benchmarks.run`` (``benchmarks/rows.py``: every SGGAdamW backend that
can serve the device x reference, fused/foreach AdamW, clip + AdamW, eager SGG and its
torch.compile form) at a small and a medium workload, fp32 and bf16. Each (device, size, dtype)
is one benchmark group, and test ids are stable slugs, so runs compare with
``--benchmark-autosave`` / ``--benchmark-compare``. Not part of the default test run
(pyproject ``testpaths = ["tests"]``).

Environment: ``SGG_BENCH_DEVICE`` (default cuda when available), ``SGG_BENCH_SIZES`` (e.g.
``1M,16M``), ``SGG_BENCH_COMPILE=0`` to leave out the torch.compile rows (cold compiles take
tens of seconds each on a small CPU), ``SGG_BENCH_THREADS`` (a number, ``default`` or ``auto``).
"""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch

from . import measure, workloads
from .rows import build_rows

DEVICE = torch.device(os.environ.get("SGG_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZES = tuple(s for s in os.environ.get("SGG_BENCH_SIZES", "").split(",") if s) or (
    ("1M", "16M") if DEVICE.type == "cpu" else ("10M", "1B"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE = os.environ.get("SGG_BENCH_COMPILE", "1") != "0"
#: CPU intra-op threads, as run.py's --threads (auto: 1 when other processes keep the cores busy)
THREADS = measure.choose_threads(os.environ.get("SGG_BENCH_THREADS", "auto"), DEVICE)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _probe_groups(dtype):
    p = torch.zeros(4, dtype=dtype, device=DEVICE, requires_grad=True)
    p.grad = torch.ones_like(p)
    return [{"params": [p], "weight_decay": 0.01}]


def _cases():
    out = []
    for dname, dtype in DTYPES.items():
        rows, _ = build_rows(_probe_groups(dtype), compile=COMPILE)
        for size in SIZES:
            for row in rows:
                out.append(pytest.param(size, dname, row.name, id=f"{size}-{dname}-{slug(row.name)}"))
    return out


_params_cache: dict = {}


def _workload(size: str, dname: str):
    key = (size, dname)
    if key not in _params_cache:
        _params_cache.clear()  # one workload alive at a time
        gc.collect()
        params = workloads.make_params(size, DTYPES[dname], DEVICE)
        _params_cache[key] = (params, workloads.param_groups(size, params))
    return _params_cache[key]


def _timed_step(opt):
    """``opt.step``; on CUDA followed by a device synchronisation, so that the time covers the kernels."""
    if DEVICE.type != "cuda":
        return opt.step

    def fn():
        opt.step()
        torch.cuda.synchronize(DEVICE)
    return fn


@pytest.mark.parametrize("size,dtype,row_name", _cases())
def test_step(benchmark, size, dtype, row_name):
    params, groups = _workload(size, dtype)
    rows, _ = build_rows(groups, compile=COMPILE)
    row = next(r for r in rows if r.name == row_name)
    n = workloads.parse_size(size).numel
    benchmark.group = f"{DEVICE.type} {size} {dtype}"
    benchmark.extra_info.update(row=row.name, params=n, tensors=len(params), threads=THREADS,
                                model_bytes=row.bytes_per_element * n * (torch.finfo(DTYPES[dtype]).bits // 8))
    opt = row.create(groups)
    for _ in range(2):  # state allocation, compilation, caches
        opt.step()
    fn = _timed_step(opt)
    try:
        benchmark(fn)
    finally:
        del fn, opt
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
