"""The benchmark rows (benchmarks/rows.py) build the optimizers they are named after."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import workloads  # noqa: E402
from benchmarks.eager_sgg import EagerSGGAdamW, sgg_adamw_group  # noqa: E402
from benchmarks.rows import BYTES_PER_ELEMENT, SGG_KW, build_rows  # noqa: E402
from conftest import cpu_backends  # noqa: E402
from sgg_fast import SGGAdamW  # noqa: E402


def test_rows_build_what_they_name_and_leave_the_groups_alone():
    params = workloads.make_params("1M", torch.float32, "cpu")
    groups = workloads.param_groups("1M", params)
    before = [sorted(g) for g in groups]
    rows, notes = build_rows(groups, compile=True)
    assert [sorted(g) for g in groups] == before, "building rows wrote settings into the caller's groups"
    names = [r.name for r in rows]
    for b in cpu_backends():
        if b != "triton":  # the interpreter is never timed
            for ref in ("momentum", "ema"):
                assert f"SGGAdamW[{b}] {ref}" in names
    assert "AdamW(fused=True)" in names and "eager SGG ema" in names
    for row in rows:
        opt = row.create(groups)
        if row.kind == "sgg":
            assert isinstance(opt, SGGAdamW) and opt.backend in row.name
        if row.kind in ("eager", "compiled"):
            assert isinstance(opt, EagerSGGAdamW) and (opt._fn is not sgg_adamw_group) == (row.kind == "compiled")
        if row.is_sgg:
            for g in opt.param_groups:
                assert g["reference"] == row.reference, (row.name, g["reference"])
                assert all(g[k] == v for k, v in SGG_KW.items()) and min(
                    g["lambda_dir"], g["lambda_mag"], g["lambda_align"]) > 0
            assert row.bytes_per_element == BYTES_PER_ELEMENT[row.reference]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [sorted(g) for g in groups] == before


def test_workload_shapes_are_llm_like():
    shape = workloads.parse_size("16M")
    shapes = shape.tensor_shapes()
    assert 15e6 < shape.numel < 17e6
    assert len(shapes) == 1 + 9 * shape.layers + 1  # embedding, 9 per layer, final norm
    assert sum(1 for s, decay in shapes if not decay) == 2 * shape.layers + 1
    ps = workloads.make_params("1M", torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 and p.grad is not None and p.grad.abs().sum() > 0 for p in ps)


def test_deepspeed_row_or_its_reason_and_the_pass_rows():
    """DeepSpeedCPUAdam is timed when deepspeed imports, else the table says why; the CPU pass
    rows (read baseline, statistics pass) read the same bytes and step without error."""
    from benchmarks.rows import deepspeed_unavailable_reason, pass_rows

    params = workloads.make_params("1M", torch.float32, "cpu")
    groups = workloads.param_groups("1M", params)
    rows, notes = build_rows(groups, compile=False)
    names = [r.name for r in rows]
    why = deepspeed_unavailable_reason()
    if why is None:
        assert "DeepSpeedCPUAdam(adamw_mode)" in names
    else:
        assert "DeepSpeedCPUAdam(adamw_mode)" not in names
        assert any(n.startswith("DeepSpeedCPUAdam not timed: deepspeed does not import") for n in notes)
    extra, _ = pass_rows(groups)
    assert [r.bytes_per_element for r in extra] == [2] * len(extra) and extra[0].name.startswith("read baseline")
    for row in extra:
        row.create(groups).step()


def test_host_overhead_rows_and_table_structure():
    """benchmarks/host_overhead.py times SGGAdamW per CPU backend beside fused and foreach AdamW
    on the same tiny tensors, and reports per-tensor cost and the ratio (structure only)."""
    from benchmarks import host_overhead
    from sgg_fast import _ext

    names = [r.name for r in host_overhead.host_rows()]
    assert names[:2] == ["AdamW(fused=True)", "AdamW(foreach=True)"]
    assert "SGGAdamW[torch] momentum" in names
    assert ("SGGAdamW[cpu] momentum" in names) == bool(_ext.load())
    ps = host_overhead.make_params(3, 8)
    assert len(ps) == 3 and all(p.numel() == 8 and p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
    res = host_overhead.measure_counts((3, 5), elements=8, min_time=0.0, warmup=1)
    assert [(r["tensors"], r["row"]) for r in res] == [(c, n) for c in (3, 5) for n in names]
    for r in res:
        assert r["samples"] >= 20 and r["us_step"] > 0
        assert abs(r["us_per_tensor"] * r["tensors"] - r["us_step"]) <= 1e-9 * r["us_step"]
        if r["row"] == "AdamW(fused=True)":
            assert r["x_fused_adamw"] == 1.0
    table = host_overhead.markdown(res).splitlines()
    assert len(table) == 2 + len(res) and "µs / tensor / step" in table[0]


def test_64m_workload_is_llm_shaped():
    shape = workloads.parse_size("64M")
    assert 63e6 < shape.numel < 65e6
    assert len(shape.tensor_shapes()) == 1 + 9 * shape.layers + 1
