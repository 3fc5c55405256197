"""Timing, memory and machine facts for the benchmarks (DESIGN §4).

* CPU: wall-clock of each step after warm-up (``time.perf_counter``), median and p20/p80 of the
  repeats. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) with quantiles,
  or CUDA events when triton is missing.
* Extra peak memory of one ``step()``: GPU: ``torch.cuda.max_memory_allocated`` minus what was
  allocated before the step; CPU: the running sum of the profiler's memory events
  (``profile_memory=True``), whose maximum is the peak above the level at the start of the step.
* The device copy: ``dst.copy_(src)`` over buffers several times the last-level cache; its
  bandwidth counts the bytes read plus the bytes written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: CPU copy buffer: 4x the last-level cache, clamped to this range (bytes, per buffer). The
#: upper bound keeps the two buffers at 2 GiB on a 24 GiB shared machine; a VM that reports
#: the host's whole L3 plateaus far below it (measured: flat from 64 MiB up on the dev machine).
CPU_COPY_BYTES = (256 << 20, 1 << 30)
#: GPU copy buffer: at least this, and at least 4x L2
GPU_COPY_MIN_BYTES = 1 << 30


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def _quantiles(samples_ms: list[float]) -> Timing:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], len(samples_ms))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, *, warmup: int = 3,
              min_repeats: int = 5, max_repeats: int = 100, min_time_s: float = 1.0) -> Timing:
    """Median/p20/p80 of ``step()`` in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            q = do_bench(step, warmup=25, rep=max(100, int(min_time_s * 1000)), quantiles=[0.5, 0.2, 0.8])
            return Timing(q[0], q[1], q[2], -1)
        samples = []
        start = time.perf_counter()
        while len(samples) < max_repeats and (len(samples) < min_repeats
                                               or time.perf_counter() - start < min_time_s):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        return _quantiles(samples)
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats
                                           or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the C++ side's stderr (kineto prints two log lines per profiler start/stop).
    Python exceptions still propagate; only native prints inside the block are dropped."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_memory_events(fn: Callable[[], object]) -> list[tuple[int, int]]:
    """``[(time_ns, bytes)]`` of every CPU allocation (+) and free (-) during ``fn()``, in order."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda x: x[0])
    return events


def peak_of(events: list[tuple[int, int]]) -> tuple[int, int]:
    """(peak of the running sum, largest single allocation) of memory events, in bytes."""
    run = peak = largest = 0
    for _, nbytes in events:
        run += nbytes
        peak = max(peak, run)
        largest = max(largest, nbytes)
    return peak, largest


def extra_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated during one ``step()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return peak_of(cpu_memory_events(step))[0]


def llc_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            with open(os.path.join(base, idx, "size")) as f:
                txt = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            size = int(txt.rstrip("KMG")) * mult
            best = size if best is None else max(best, size)
    except (OSError, ValueError):
        pass
    return best


def copy_buffer_bytes(device: torch.device, quick: bool = False) -> int:
    llc = llc_bytes(device) or (32 << 20)
    if device.type == "cuda":
        return max(GPU_COPY_MIN_BYTES, 4 * llc)
    lo, hi = CPU_COPY_BYTES
    return lo if quick else min(hi, max(lo, 4 * llc))


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> tuple[float, Timing]:
    """GB/s of ``dst.copy_(src)`` (read + write bytes), and its timing."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_step(lambda: dst.copy_(src), device, warmup=2, min_repeats=repeats, max_repeats=repeats,
                  min_time_s=0.0)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9, t


def choose_threads(arg: str | None, device: torch.device) -> str:
    """Apply ``--threads`` (a number, or ``auto``) to torch's intra-op pool; returns a note.

    ``auto``: torch's default, except on a CPU that other processes keep busy (1-minute load
    average >= the cores visible) — there every multi-threaded op waits for a time slice for each
    of its threads (measured on the 2-core dev machine under load ~5: a 1M-parameter fused AdamW
    step took 550 ms with 2 threads and 1.1 ms with 1), so the table would time the scheduler.
    """
    if device.type != "cpu" or arg in (None, "", "default"):
        return f"torch threads {torch.get_num_threads()}"
    if arg == "auto":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load >= (os.cpu_count() or 1):
            torch.set_num_threads(1)
            return (f"torch threads 1 (auto: load average {load:.1f} >= {os.cpu_count()} cores, the machine "
                    "is shared/busy; multi-threaded ops would time the scheduler)")
        return f"torch threads {torch.get_num_threads()} (auto: machine quiet, load {load:.1f})"
    torch.set_num_threads(int(arg))
    return f"torch threads {int(arg)} (--threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    import sgg_fast

    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "sgg_fast": f"{sgg_fast.__version__} (git {_git_commit()})",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }
    llc = llc_bytes(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, L2 {(llc or 0) >> 20} MiB, "
                       f"CUDA {torch.version.cuda}")
    else:
        info["llc"] = f"{llc >> 20} MiB (as reported by the OS)" if llc else "unknown"
    return info
