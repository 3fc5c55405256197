"""LLM-shaped parameter lists for the benchmarks (DESIGN §4 "Workloads").

A workload is the list of tensors a decoder-only transformer hands its optimizer: per layer the
four attention projections (q, k, v, o; k/v narrower with grouped-query attention), the three MLP
projections (gate, up, down) and two RMSNorm weight vectors; plus the token embedding, the final
norm and (when untied) the LM head. Two param groups, as fine-tuning scripts (e.g. the HF Trainer)
build them: matrices with weight decay, norm vectors without.

Sizes are named by their approximate parameter count; :func:`describe` gives the exact count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    kv: int | None = None        # k/v projection width (grouped-query attention); None: = hidden
    tied: bool = True            # LM head tied to the embedding (no extra tensor)

    def tensor_shapes(self) -> list[tuple[tuple[int, ...], bool]]:
        """``[(shape, decay)]`` in the order a model's ``parameters()`` would list them."""
        d, kv = self.hidden, self.kv or self.hidden
        out: list[tuple[tuple[int, ...], bool]] = [((self.vocab, d), True)]
        for _ in range(self.layers):
            out += [((d, d), True), ((kv, d), True), ((kv, d), True), ((d, d), True),   # q k v o
                    ((self.ffn, d), True), ((self.ffn, d), True), ((d, self.ffn), True),  # gate up down
                    ((d,), False), ((d,), False)]                                        # 2 norms
        out.append(((d,), False))                                                        # final norm
        if not self.tied:
            out.append(((self.vocab, d), True))
        return out

    @property
    def numel(self) -> int:
        n = 0
        for shape, _ in self.tensor_shapes():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n


#: named sizes (CPU: 1M … 64M; GPU: 10M … 8B). 1B/8B follow Llama-3.2-1B / Llama-3-8B.
SIZES: dict[str, Shape] = {
    "1M": Shape(hidden=128, layers=4, ffn=352, vocab=1536),
    "4M": Shape(hidden=256, layers=4, ffn=704, vocab=3072),
    "16M": Shape(hidden=512, layers=4, ffn=1408, vocab=6144),
    "50M": Shape(hidden=768, layers=6, ffn=2048, vocab=8192),
    "64M": Shape(hidden=1024, layers=4, ffn=2816, vocab=12288),
    "10M": Shape(hidden=384, layers=5, ffn=1024, vocab=4096),
    "135M": Shape(hidden=576, layers=30, ffn=1536, vocab=49152, kv=192),       # SmolLM2-135M
    "350M": Shape(hidden=1024, layers=28, ffn=2816, vocab=32000, kv=256),
    "1B": Shape(hidden=2048, layers=16, ffn=8192, vocab=128256, kv=512),        # Llama-3.2-1B
    "3B": Shape(hidden=3072, layers=28, ffn=8192, vocab=128256, kv=1024),       # Llama-3.2-3B
    "8B": Shape(hidden=4096, layers=32, ffn=14336, vocab=128256, kv=1024, tied=False),  # Llama-3-8B
}

CPU_DEFAULT = "16M"
CPU_QUICK = "4M"
CPU_SWEEP = ("1M", "4M", "16M", "50M")
GPU_DEFAULT = "1B"
GPU_SWEEP = ("10M", "135M", "350M", "1B", "3B", "8B")


def parse_size(name: str) -> Shape:
    for k, v in SIZES.items():
        if k.upper() == name.strip().upper():
            return v
    raise ValueError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")


def describe(name: str) -> str:
    s = parse_size(name)
    return (f"{name}: {s.numel / 1e6:.1f}M params in {len(s.tensor_shapes())} tensors "
            f"(hidden {s.hidden}, {s.layers} layers, ffn {s.ffn}, vocab {s.vocab})")


def make_params(name: str, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> list[torch.Tensor]:
    """Fresh leaf parameters of workload ``name`` with random (never zero) gradients.

    Generated on the target device (seeded), so an 8B list does not pass through the host.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape, _ in parse_size(name).tensor_shapes():
        p = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


def param_groups(name: str, params: list[torch.Tensor], weight_decay: float = 0.01) -> list[dict]:
    """Two groups: matrices with weight decay, norm vectors without."""
    decay = [p for p, (_, d) in zip(params, parse_size(name).tensor_shapes()) if d]
    no_decay = [p for p, (_, d) in zip(params, parse_size(name).tensor_shapes()) if not d]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
