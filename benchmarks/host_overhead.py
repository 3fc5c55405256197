"""Host overhead per tensor per step: ``python -m benchmarks.host_overhead`` (issue #15 item 12).

Many tiny tensors (default 100 and 500 tensors of 256 fp32 elements, one param group, CPU, one
torch thread): the arithmetic is negligible, so step time / number of tensors is the host cost of
one tensor (plan, tables, dispatch). Rows, timed in the same run in shuffled rounds: SGGAdamW on
each available CPU backend (``cpu``, ``torch``; momentum reference, all λ > 0 as in
``benchmarks/rows.py``), ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``.

Prints a markdown table (µs per step, µs per tensor per step, ratio to fused AdamW).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

from . import measure
from .rows import ADAMW_KW, SGG_KW

COUNTS = (100, 500)
ELEMENTS = 256


@dataclass
class HostRow:
    name: str
    make: object  # list[Tensor] -> optimizer


def host_rows() -> list[HostRow]:
    """The optimizers timed, in table order; SGG backends that cannot run here are left out."""
    from sgg_fast import SGGAdamW, _ext

    rows = [HostRow("AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, fused=True, **ADAMW_KW)),
            HostRow("AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, foreach=True, **ADAMW_KW))]
    backends = (["cpu"] if _ext.load() else []) + ["torch"]
    for b in backends:
        rows.append(HostRow(f"SGGAdamW[{b}] momentum",
                            lambda ps, b=b: SGGAdamW(ps, backend=b, reference="momentum", **ADAMW_KW, **SGG_KW)))
    return rows


def make_params(count: int, elements: int = ELEMENTS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for _ in range(count):
        p = torch.empty(elements).normal_(0.0, 0.02, generator=gen).requires_grad_(True)
        p.grad = torch.empty(elements).normal_(0.0, 1e-3, generator=gen)
        ps.append(p)
    return ps


def measure_counts(counts=COUNTS, elements: int = ELEMENTS, min_time: float = 1.0,
                   warmup: int = 5) -> list[dict]:
    """One dict per (count, row): median / p20 / p80 µs per step and µs per tensor per step."""
    out = []
    for count in counts:
        live = []
        for row in host_rows():
            params = make_params(count, elements)  # each row its own tensors (its own state)
            opt = row.make(params)
            for _ in range(warmup):
                opt.step()
            live.append((row, opt, []))
        rng = random.Random(0)
        start, rounds = time.perf_counter(), 0
        while rounds < 2000 and (rounds < 20 or time.perf_counter() - start < min_time * len(live)):
            order = list(live)
            rng.shuffle(order)
            for _row, opt, samples in order:
                t0 = time.perf_counter()
                opt.step()
                samples.append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        base = None
        for row, _opt, samples in live:
            t = measure._quantiles(samples)
            us = t.median_ms * 1e3
            if row.name == "AdamW(fused=True)":
                base = us
            out.append(dict(tensors=count, elements=elements, row=row.name, us_step=us,
                            p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3, us_per_tensor=us / count,
                            samples=t.n))
        for r in out:
            if r["tensors"] == count:
                r["x_fused_adamw"] = r["us_step"] / base
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| tensors × elements | step | µs / step (median) | p20–p80 | µs / tensor / step | × AdamW(fused) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['tensors']} × {r['elements']} | {r['row']} | {r['us_step']:.0f} | "
                     f"{r['p20_us']:.0f}–{r['p80_us']:.0f} | {r['us_per_tensor']:.2f} | {r['x_fused_adamw']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="tensor counts, comma-separated")
    ap.add_argument("--elements", type=int, default=ELEMENTS, help="elements per tensor")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed rounds per row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    info = measure.machine_info(torch.device("cpu"))
    res = measure_counts(counts, args.elements, args.min_time)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"host overhead — cpu {info['cpu']}, torch {info['torch']}, {args.threads} thread(s), "
          f"load {info['load']} at start, {load_end} at end, {info['date']}\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
