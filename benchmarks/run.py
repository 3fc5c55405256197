"""The comparison table: ``python -m benchmarks.run`` (``make bench``).

Times one optimizer step on an LLM-shaped list of tensors (``benchmarks/workloads.py``) for every
SGGAdamW backend that can serve the device x reference (momentum, ema), all three λ > 0, against
baselines measured in the same run: ``torch.optim.AdamW(fused=True)``, ``AdamW(foreach=True)``,
``clip_grad_norm_`` + fused AdamW, the eager PyTorch SGG step (``benchmarks/eager_sgg.py``) and
that step under ``torch.compile``. Method: DESIGN §4.

Columns: median ms (p20-p80), achieved GB/s from the byte model (``benchmarks/rows.py``), % of a
device copy measured in the same run, ratio to fused AdamW (lower is better; DESIGN's floors are
1.29 for momentum and 1.57 for ema), speedup over the eager SGG step and over its compiled form
(same reference; higher is better), and the extra peak memory of one ``step()``.

Outputs: the markdown report on stdout (paste-ready for ``benchmarks/RESULTS.md``), and in
``--out`` (default ``benchmarks/out``): ``bench.md``, ``bench.csv``, ``bench.png``.

Examples::

    python -m benchmarks.run                 # CPU: 16M params, fp32 + bf16, every row
    python -m benchmarks.run --quick         # CI-sized: 4M params, no torch.compile rows
    python -m benchmarks.run --sweep         # CPU 1M..50M (GPU 10M..8B), plot against size
    python -m benchmarks.run --device cuda --size 1B --dtype bf16
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import measure, workloads
from .rows import ADAMW_KW, BYTES_PER_ELEMENT, SGG_KW, build_rows, pass_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    size: str
    params: int
    tensors: int
    dtype: str
    row: str
    kind: str
    reference: str
    ms: float = math.nan
    p20: float = math.nan
    p80: float = math.nan
    samples: int = 0
    model_gb: float = math.nan
    gbs: float = math.nan
    pct_copy: float = math.nan
    x_fused_adamw: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_compiled: float = math.nan
    extra_peak_mib: float = math.nan
    threads: int = 0
    cpu_per_wall: float = math.nan
    pct_read: float = math.nan
    #: SGG step time over the same-run two-pass floor: fused AdamW's time scaled to the apply
    #: pass's bytes, plus the read baseline's time (the statistics pass reads what it reads)
    x_floor: float = math.nan
    note: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--size", default=None,
                    help="workload size(s), comma-separated, from: " + ", ".join(workloads.SIZES)
                    + f" (default: {workloads.CPU_DEFAULT} on CPU, {workloads.GPU_DEFAULT} on GPU)")
    ap.add_argument("--sweep", action="store_true",
                    help=f"all sizes of the device's sweep (CPU {','.join(workloads.CPU_SWEEP)}; "
                    f"GPU {','.join(workloads.GPU_SWEEP)})")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--quick", action="store_true",
                    help=f"CI-sized: {workloads.CPU_QUICK} on CPU, short timing, no torch.compile rows")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="time the torch.compile row (default: yes, except with --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-refs", default="momentum,ema",
                    help="references that get a torch.compile row (each is a cold compile per param group)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: rows not started by then are skipped (compile rows past half of it); "
                    "the table is written either way")
    ap.add_argument("--rows", default=None, help="regex: only rows whose name matches (fused AdamW kept)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed repeats per row")
    ap.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                    help="CPU: time the rows in shuffled rounds (default when all optimizer states fit "
                    "in memory), so noise from other processes spreads over every row")
    ap.add_argument("--threads", default=None,
                    help="CPU: torch intra-op thread counts to time, comma-separated: numbers, 'all' (torch's "
                    "default: every core), 'default', or 'auto' (torch's default, 1 when other processes keep "
                    "every core busy). Each gets its own tables. Default: '1,all' ('auto' with --quick)")
    ap.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                    help="folder for bench.md / bench.csv / bench.png")
    ap.add_argument("--tag", default="bench", help="file name stem in --out")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--title", default=None, help="heading of the markdown block")
    ap.add_argument("--progress", default=None, metavar="FILE",
                    help="append one markdown row per step row to FILE as soon as it is timed (or "
                    "skipped/failed), so a run killed by a time box keeps the rows it finished")
    return ap.parse_args(argv)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(size: str, dtype_name: str, device: torch.device, args, pbar=None) -> tuple[list[Result], list[str]]:
    shape = workloads.parse_size(size)
    dtype = DTYPES[dtype_name]
    params = workloads.make_params(size, dtype, device)
    groups = workloads.param_groups(size, params)
    n = shape.numel
    compile_rows = args.compile if args.compile is not None else not args.quick
    rows, notes = build_rows(groups, compile=compile_rows, select=args.rows,
                             compile_refs=tuple(r.strip() for r in args.compile_refs.split(",")))
    if device.type == "cpu":
        extra, extra_notes = pass_rows(groups)
        rows += extra
        notes += extra_notes
    if pbar is not None:
        pbar.total = (pbar.total or 0) + len(rows)
        pbar.refresh()
    elem = torch.finfo(dtype).bits // 8
    min_time = args.min_time if args.min_time is not None else (0.25 if args.quick else 1.0)
    out = [Result(size, n, len(params), dtype_name, row.name, row.kind, row.reference or "",
                  threads=torch.get_num_threads()) for row in rows]
    for row, res in zip(rows, out):
        res.model_gb = row.bytes_per_element * elem * n / 1e9
    warmup = 2 if args.quick else 3
    interleave = device.type == "cpu" and _interleave_fits(rows, n, elem, args)
    if interleave:
        _run_interleaved(rows, out, groups, device, args, warmup, min_time, notes, pbar)
    else:
        for row, res in zip(rows, out):
            if pbar is not None:
                pbar.set_postfix_str(f"{size} {dtype_name} {row.name}")
            late = _past_deadline(args, row)
            if late:
                res.note = late
                notes.append(f"{row.name} at {size} {dtype_name}: {late}")
                _progress(args, res)
                if pbar is not None:
                    pbar.update(1)
                continue
            opt = _start(row, res, groups, device, notes)
            try:
                if opt is not None:
                    c0, w0 = time.process_time(), time.perf_counter()
                    t = measure.time_step(opt.step, device, warmup=warmup, min_repeats=5, max_repeats=200,
                                          min_time_s=min_time)
                    res.cpu_per_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
                    res.ms, res.p20, res.p80, res.samples = t.median_ms, t.p20_ms, t.p80_ms, t.n
                    if not args.no_memory and row.kind != "pass":
                        res.extra_peak_mib = measure.extra_peak_bytes(opt.step, device) / 2**20
            except Exception as e:  # noqa: BLE001 - one failing row (e.g. OOM) must not end the run
                _failed(row, res, e, notes)
            finally:
                del opt
                _free(device)
                _progress(args, res)
            if pbar is not None:
                pbar.update(1)
    for res in out:
        res.gbs = res.model_gb / (res.ms * 1e-3)
    del params, groups
    _free(device)
    # ratios within this (size, dtype)
    base = next((r.ms for r in out if r.row == "AdamW(fused=True)"), math.nan)
    read = next((r.ms for r in out if r.kind == "pass" and r.row.startswith("read baseline")), math.nan)
    for r in out:
        if r.kind == "pass":  # same bytes as the read baseline: % of the same-run read bandwidth
            r.pct_read = 100 * read / r.ms
            continue
        r.x_fused_adamw = r.ms / base
        if r.kind == "sgg" and r.reference in BYTES_PER_ELEMENT:
            apply_elems = BYTES_PER_ELEMENT[r.reference] - 2  # the statistics pass reads g and r
            r.x_floor = r.ms / (base * apply_elems / BYTES_PER_ELEMENT["adamw"] + read)
        if r.kind in ("sgg", "eager", "compiled"):
            eager = next((e.ms for e in out if e.kind == "eager" and e.reference == r.reference), math.nan)
            comp = next((e.ms for e in out if e.kind == "compiled" and e.reference == r.reference), math.nan)
            r.speedup_vs_eager = eager / r.ms
            r.speedup_vs_compiled = comp / r.ms
    return out, notes


def _failed(row, res: Result, e: BaseException, notes: list[str]) -> None:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    res.note = (res.note + "; " if res.note else "") + "FAILED " + msg
    res.ms = math.nan
    if row.kind == "compiled":
        notes.append(f"torch.compile(eager SGG) did not run at {res.size} {res.dtype}: {msg}")


def _start(row, res: Result, groups, device, notes):
    """Create the row's optimizer and take its first step (state allocation; compilation)."""
    try:
        opt = row.create(groups)
        t0 = time.perf_counter()
        opt.step()
        measure.sync(device)
        if row.kind == "compiled":
            res.note = f"first step (compile) {time.perf_counter() - t0:.1f} s"
        return opt
    except Exception as e:  # noqa: BLE001
        _failed(row, res, e, notes)
        _free(device)
        return None


def _progress(args, res: Result) -> None:
    """With --progress FILE: append this row (ms, p20-p80, model GB/s, note) to FILE now."""
    path = getattr(args, "progress", None)
    if not path:
        return
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("| step | ms (median) | p20–p80 | GB/s | note | size | dtype |\n|---|---:|---:|---:|---|---|---|\n")
        gbs = res.model_gb / (res.ms * 1e-3) if math.isfinite(res.ms) and res.ms > 0 else math.nan
        f.write(f"| {res.row} | {_f(res.ms, '.3f')} | {_f(res.p20, '.3f')}–{_f(res.p80, '.3f')} | "
                f"{_f(gbs, '.1f')} | {res.note} | {res.size} | {res.dtype} |\n")
        f.flush()


def _past_deadline(args, row) -> str | None:
    """With --deadline: skip rows once it has passed, and compile rows past half of it (a cold
    compile cannot be interrupted), so that a time-boxed run (gpu_check.sh) still writes its table."""
    if not args.deadline:
        return None
    elapsed = time.perf_counter() - args.t_start
    if elapsed > args.deadline:
        return f"not timed: --deadline {args.deadline:.0f} s reached"
    if row.kind == "compiled" and elapsed > args.deadline / 2:
        return f"not timed: past half of --deadline {args.deadline:.0f} s (a cold compile could overrun it)"
    return None


def _interleave_fits(rows, n: int, elem: int, args) -> bool:
    """Interleaving keeps every row's optimizer state alive at once; do it when that fits easily."""
    if args.interleave != "auto":
        return args.interleave == "on"
    state = sum(3 if r.reference == "ema" else 2 for r in rows) * n * elem
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return False
    return state < 0.4 * avail


def _run_interleaved(rows, out, groups, device, args, warmup, min_time, notes, pbar) -> None:
    """CPU timing in rounds: every round steps each row once, in a shuffled order, so that load
    from other processes on a shared machine spreads over all rows instead of hitting a few."""
    import random

    live = []
    for row, res in zip(rows, out):
        if pbar is not None:
            pbar.set_postfix_str(f"{res.size} {res.dtype} warm-up {row.name}")
        late = _past_deadline(args, row)
        if late:
            res.note = late
            notes.append(f"{row.name} at {res.size} {res.dtype}: {late}")
            continue
        opt = _start(row, res, groups, device, notes)
        if opt is None:
            continue
        try:
            for _ in range(warmup - 1):
                opt.step()
            live.append((row, res, opt, [], [0.0, 0.0]))
        except Exception as e:  # noqa: BLE001
            _failed(row, res, e, notes)
    rng = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while live and rounds < 200 and (rounds < 5 or time.perf_counter() - start < min_time * len(live)):
        order = list(live)
        rng.shuffle(order)
        for _row, _res, opt, samples, cpu_wall in order:
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            samples.append((t1 - t0) * 1e3)
            cpu_wall[0] += time.process_time() - c0
            cpu_wall[1] += t1 - t0
        rounds += 1
    for row, res, opt, samples, cpu_wall in live:
        t = measure._quantiles(samples)
        res.ms, res.p20, res.p80, res.samples = t.median_ms, t.p20_ms, t.p80_ms, t.n
        res.cpu_per_wall = cpu_wall[0] / cpu_wall[1] if cpu_wall[1] > 0 else math.nan
        if not args.no_memory and row.kind != "pass":
            try:
                res.extra_peak_mib = measure.extra_peak_bytes(opt.step, device) / 2**20
            except Exception as e:  # noqa: BLE001
                res.note = (res.note + "; " if res.note else "") + f"memory not measured: {e}"
        if pbar is not None:
            pbar.update(1)
        _progress(args, res)
    live.clear()
    _free(device)


def _f(x: float, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown(results: list[Result], info: dict, copy: dict, notes: list[str], args, wall_s: float) -> str:
    device = info["device"]
    title = args.title or f"sgg_fast step benchmark — {device}, {info['date']}"
    lines = [f"### {title}", ""]
    lines.append(f"- machine: {info.get('gpu', info['cpu'])}" + (f"; host CPU {info['cpu']}" if "gpu" in info else "")
                 + (f"; last-level cache {info['llc']}" if "llc" in info else ""))
    if device == "cpu":
        lines.append(f"- threads timed: {info['threads']}")
    lines.append(f"- versions: torch {info['torch']}, triton {info['triton']}, Python {info['python']}, "
                 f"sgg_fast {info['sgg_fast']}")
    lines.append(f"- load average (1/5/15 min) at start: {info['load']}; at end: {info.get('load_end', 'n/a')}"
                 + (" — the machine was shared/busy, expect noise" if info.get("noisy") else ""))
    for th, c in copy.items():
        at = f" ({th} thread{'s' if th != 1 else ''})" if th else ""
        lines.append(f"- device copy `dst.copy_(src)`{at}, {c['mib']} MiB per buffer: "
                     f"{c['start']:.1f} GB/s at start, {c['end']:.1f} GB/s at end (read + write bytes; '% of copy' "
                     f"uses their mean {c['gbs']:.1f})")
    lines.append(f"- SGG rows: λ1 (lambda_dir)={SGG_KW['lambda_dir']}, λ2 (lambda_mag)={SGG_KW['lambda_mag']}, "
                 f"λ3 (lambda_align)={SGG_KW['lambda_align']}, mag_mode={SGG_KW['mag_mode']}, granularity=group; "
                 f"lr={ADAMW_KW['lr']}, two param groups (matrices with weight decay 0.01, norm vectors without); "
                 "random (non-zero) gradients")
    lines.append("- timing: " + ("triton.testing.do_bench (CUDA events, L2 flushed), median and p20/p80"
                                 if device == "cuda" else
                                 "wall clock per step after warm-up, median and p20/p80 of the repeats"
                                 + ("; rows timed in shuffled rounds (each round steps every row once) so that "
                                    "load from other processes spreads over all rows"
                                    if args.interleave != "off" else ""))
                 + f"; whole run {wall_s:.0f} s" + (" (--quick)" if args.quick else ""))
    lines.append("- GB/s from the byte model of DESIGN §3 (elements per parameter: AdamW "
                 f"{BYTES_PER_ELEMENT['adamw']}, clip+AdamW {BYTES_PER_ELEMENT['clip+adamw']}, SGG momentum "
                 f"{BYTES_PER_ELEMENT['momentum']}, SGG ema {BYTES_PER_ELEMENT['ema']}; the eager/compiled SGG "
                 "steps are charged the same bytes as SGG). '× AdamW(fused)': step time over fused AdamW's "
                 "(lower is better; the byte-model floors are 1.29 momentum, 1.57 ema). 'vs eager' / 'vs compiled': "
                 "how many times faster than the eager SGG step / its torch.compile form with the same reference.")
    if device == "cpu":
        lines.append("- 'CPU/wall': process CPU time over wall time while the row was stepped (> 1: more than one "
                     "core busy; OpenMP worker threads spin-wait briefly between parallel regions, which counts as "
                     "CPU time). Pass rows (2 elements per parameter read, nothing written): the read baseline "
                     "`torch.sum` and the compiled statistics pass alone; '% of read' = the statistics pass's "
                     "bandwidth over the same-run read baseline's. 'two-pass floor' (headline): fused AdamW's time "
                     "scaled to the apply pass's bytes plus the read baseline's time — what a separate "
                     "statistics pass costs at the measured read bandwidth, which on one core is below the "
                     "bandwidth of AdamW's mixed read/write streams.")
    lines.append("")
    keys = []
    for r in results:
        if (r.size, r.dtype, r.threads) not in keys:
            keys.append((r.size, r.dtype, r.threads))
    cpu = device == "cpu"
    for size, dt, th in keys:
        rs = [r for r in results if (r.size, r.dtype, r.threads) == (size, dt, th)]
        where = f"{device}, {th} thread{'s' if th != 1 else ''}" if cpu else device
        lines.append(f"**{size}: {rs[0].params / 1e6:.1f}M parameters in {rs[0].tensors} tensors, {dt}, {where}**")
        lines.append("")
        lines.append("| step | ms (median) | p20–p80 | GB/s | % of copy | × AdamW(fused) | vs eager SGG | "
                     "vs compiled SGG | extra peak MiB |" + (" CPU/wall | % of read |" if cpu else "") + " note |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else "") + "---|")
        for r in rs:
            lines.append(
                f"| {r.row} | {_f(r.ms, '.2f')} | {_f(r.p20, '.2f')}–{_f(r.p80, '.2f')} | {_f(r.gbs, '.1f')} | "
                f"{_f(r.pct_copy, '.0f')} | {_f(r.x_fused_adamw, '.2f')} | {_f(r.speedup_vs_eager, '.2f')} | "
                f"{_f(r.speedup_vs_compiled, '.2f')} | {_f(r.extra_peak_mib, '.1f')} |"
                + (f" {_f(r.cpu_per_wall, '.2f')} | {_f(r.pct_read, '.0f')} |" if cpu else "") + f" {r.note} |")
        lines.append("")
    head = headline(results)
    if head:
        lines.append("Headline (SGGAdamW per backend; × fused AdamW / × faster than eager SGG / "
                     "× faster than compiled SGG):")
        lines.append("")
        lines += [f"- {h}" for h in head]
        lines.append("")
    if notes:
        lines.append("Notes:")
        lines.append("")
        lines += [f"- {n}" for n in dict.fromkeys(notes)]
        lines.append("")
    return "\n".join(lines)


def headline(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.kind == "sgg" and math.isfinite(r.ms):
            where = f" ({r.threads} thr)" if r.threads else ""
            floor = (f", {_f(r.x_floor, '.2f')}× the two-pass floor" if math.isfinite(r.x_floor) else "")
            out.append(f"{r.size} {r.dtype}{where} {r.row}: {_f(r.x_fused_adamw, '.2f')}× fused AdamW, "
                       f"{_f(r.speedup_vs_eager, '.2f')}× vs eager, {_f(r.speedup_vs_compiled, '.2f')}× vs compiled"
                       + floor)
    return out


def write_csv(path: str, results: list[Result], info: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        fields = list(asdict(results[0]).keys()) if results else []
        w.writerow(["date", "device", "machine", "torch", "triton"] + fields)
        for r in results:
            w.writerow([info["date"], info["device"], info.get("gpu", info["cpu"]), info["torch"], info["triton"]]
                       + [f"{v:.6g}" if isinstance(v, float) else v for v in asdict(r).values()])


def plot(path: str, results: list[Result], copy_gbs: float, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dts = list(dict.fromkeys(r.dtype for r in results))
    fig, axes = plt.subplots(2, len(dts), figsize=(6.5 * len(dts), 8.5), squeeze=False)
    names = list(dict.fromkeys(r.row for r in results))
    cmap = plt.get_cmap("tab20")
    for j, dt in enumerate(dts):
        ax_bw, ax_ratio = axes[0][j], axes[1][j]
        for k, name in enumerate(names):
            rs = sorted((r for r in results if r.dtype == dt and r.row == name and math.isfinite(r.ms)),
                        key=lambda r: r.params)
            if not rs:
                continue
            style = dict(marker="o", color=cmap(k % 20), label=name,
                         linestyle="-" if name.startswith("SGGAdamW") else "--")
            ax_bw.plot([r.params for r in rs], [r.gbs for r in rs], **style)
            ax_ratio.plot([r.params for r in rs], [r.x_fused_adamw for r in rs], **style)
        ax_bw.axhline(copy_gbs, color="black", linewidth=1, linestyle=":", label="device copy")
        ax_ratio.axhline(1.29, color="gray", linewidth=1, linestyle=":", label="byte floor, momentum (1.29)")
        ax_ratio.axhline(1.57, color="gray", linewidth=1, linestyle="-.", label="byte floor, ema (1.57)")
        for ax in (ax_bw, ax_ratio):
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.grid(True, which="both", alpha=0.3)
        ax_bw.set_ylabel("achieved GB/s (byte model)")
        ax_ratio.set_ylabel("step time / fused AdamW")
        ax_ratio.set_yscale("log")
        ax_bw.set_title(f"{dt}, {info['device']}")
    axes[0][-1].legend(fontsize=7, loc="best")
    axes[1][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"sgg_fast step — {info.get('gpu', info['cpu'])} — torch {info['torch']} — {info['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _thread_settings(args, device: torch.device) -> list[str]:
    """The --threads values to time, in order ('all' → torch's default thread count)."""
    if device.type != "cpu":
        return ["default"]
    arg = args.threads if args.threads is not None else ("auto" if args.quick else "1,all")
    default = torch.get_num_threads()
    out = []
    for a in (x.strip() for x in arg.split(",")):
        if not a:
            continue
        if a == "all":
            a = str(default)
        elif a not in ("auto", "default"):
            int(a)  # ValueError for a bad value before any work
        if a not in out:
            out.append(a)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = args.t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    if args.size:
        sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    elif args.sweep:
        sizes = list(workloads.CPU_SWEEP if device.type == "cpu" else workloads.GPU_SWEEP)
    elif args.quick:
        sizes = [workloads.CPU_QUICK if device.type == "cpu" else "10M"]
    else:
        sizes = [workloads.CPU_DEFAULT if device.type == "cpu" else workloads.GPU_DEFAULT]
    for s in sizes:
        workloads.parse_size(s)  # unknown names fail before any work
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            print(f"unknown --dtype {d!r}; choose from {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    settings = _thread_settings(args, device)
    default_threads = torch.get_num_threads()
    info = measure.machine_info(device)
    copy_mib = measure.copy_buffer_bytes(device, args.quick) >> 20
    copy: dict = {}
    notes_threads: list[str] = []

    results: list[Result] = []
    notes: list[str] = []
    try:
        from tqdm import tqdm

        pbar = tqdm(total=0, desc="benchmark", unit="row", file=sys.stderr, disable=None, leave=False)
    except ImportError:  # e.g. a bare GPU image: no progress bar
        pbar = None
    try:
        for setting in settings:
            torch.set_num_threads(default_threads)
            notes_threads.append(measure.choose_threads(setting, device))
            th = torch.get_num_threads() if device.type == "cpu" else 0
            copy_start, _ = measure.copy_bandwidth(device, copy_mib << 20)
            _free(device)
            first = len(results)
            for size in sizes:
                for dt in dtypes:
                    rs, ns = run_config(size, dt, device, args, pbar)
                    results += rs
                    notes += ns
            copy_end, _ = measure.copy_bandwidth(device, copy_mib << 20)
            c = copy[th] = dict(mib=copy_mib, start=copy_start, end=copy_end, gbs=(copy_start + copy_end) / 2)
            for r in results[first:]:
                r.pct_copy = 100 * r.gbs / c["gbs"]
    finally:
        if pbar is not None:
            pbar.close()
    info["threads"] = "; ".join(notes_threads)
    copy_gbs = next(iter(copy.values()))["gbs"] if copy else math.nan
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # more runnable work than our own threads: others were using the cores
        info["noisy"] = max(float(info["load"].split()[0]), os.getloadavg()[0]) > os.cpu_count() + 0.5
    if device.type != "cpu":
        copy = {0: copy[0]} if 0 in copy else copy
    md = markdown(results, info, copy, notes, args, time.perf_counter() - t_start)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    write_csv(stem + ".csv", results, info)
    written = [stem + ".md", stem + ".csv"]
    if not args.no_plot and results:
        try:
            last = results[-1].threads  # one thread count per picture: the last one timed
            plot(stem + ".png", [r for r in results if r.threads == last],
                 copy.get(last, {}).get("gbs", copy_gbs), info)
            written.append(stem + ".png")
        except Exception as e:  # noqa: BLE001 - the table matters more than the picture
            print(f"(plot not written: {type(e).__name__}: {e})", file=sys.stderr)
    print(f"wrote {', '.join(written)} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
