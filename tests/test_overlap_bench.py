"""benchmarks/overlap_bench.py runs end to end (CPU, tiny model) and benchmarks/torch_llama.py has
the parameters of transformers' LlamaForCausalLM (what the GPU image, without transformers, runs)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import overlap_bench, torch_llama


@pytest.mark.parametrize("preset", ["tiny", "llama-100m-untied"])
def test_torch_llama_has_transformers_parameters(preset):
    transformers = pytest.importorskip("transformers")
    cfg = overlap_bench.PRESETS[preset]
    with torch.device("meta"):
        ours = torch_llama.LlamaLike(SimpleNamespace(**cfg))
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **cfg))
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(ours) == shapes(theirs) and len(shapes(ours)) > 10
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == cfg["tie_word_embeddings"]


def test_overlap_bench_interleaved_plain_torch(tmp_path):
    out = tmp_path / "rows.jsonl"
    rc = overlap_bench.main(["--config", "tiny", "--impl", "torch", "--device", "cpu", "--batch", "1", "--seq",
                             "8", "--steps", "2", "--warmup", "1", "--interleave", "--threads", "1",
                             "--variants", "a,b,d,e", "--json", str(out)])
    assert rc == 0
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["a", "b", "d", "e"]
    assert all(r["interleaved"] and r["clock"] == "wall" and r["samples"] == 2 for r in rows.values())
    assert rows["a"]["x_a"] == 1.0 and rows["b"]["x_b"] == 1.0
    assert all(math.isfinite(r["loss_last"]) and r["total_ms"] > 0 for r in rows.values())
    # the step in backward frees the gradients as it goes: the same peak as PyTorch's pattern (b),
    # below the ordinary loop's; the statistics mode holds them like the ordinary loop
    assert rows["e"]["peak_mib"] == pytest.approx(rows["b"]["peak_mib"], abs=0.5)
    assert rows["e"]["peak_mib"] < rows["a"]["peak_mib"] - 0.5 * rows["a"]["grad_mib"]
    assert rows["d"]["peak_mib"] == pytest.approx(rows["a"]["peak_mib"], abs=0.5)
    assert rows["e"]["hooks_cpu_ms"] > 0 and rows["d"]["hooks_cpu_ms"] > 0  # the hooks ran
