"""amsgrad in the compiled CPU apply kernel: SGGAdamW(backend="cpu", amsgrad=True) with every
λ = 0 is torch.optim.AdamW(amsgrad=True), state max_exp_avg_sq under torch's name, and the cpu
backend runs it itself (no fallback to backend="torch")."""

from __future__ import annotations

import pytest
import torch

import _amsgrad_common as A
from sgg_fast import _ext

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.error()}", allow_module_level=True)

SHAPES = [(257, 129), (70001,), (3,)]
RTOL, ATOL = A.tolerances()
LR = A.LR


def test_amsgrad_matches_torch_adamw():
    A.check_matches_torch_adamw("cpu", SHAPES, "cpu", RTOL, ATOL)


def test_amsgrad_per_group_and_loaded_from_adamw():
    A.check_per_group_and_loaded_from_adamw("cpu", SHAPES, "cpu", RTOL, ATOL)


def test_amsgrad_bad_state_is_rejected_before_any_write():
    ops = torch.ops.sgg_fast
    from sgg_fast.guidance import OUT_COLS

    p, g, m, v = torch.randn(10), torch.randn(10), torch.zeros(10), torch.zeros(10)
    step = torch.zeros(())
    out = torch.zeros(1, len(OUT_COLS))
    out[0, OUT_COLS.index("alpha")] = 1.0
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs\[0\] has shape"):
        ops.sgg_adamw_apply([p], [g], [m], [v], [step], [torch.empty(0)], out, [0], [LR], [0.9], [0.999],
                            [1e-8], [0.0], [0.9], [0], [], [torch.zeros(9)])
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs must be empty or have one entry per parameter"):
        ops.sgg_adamw_apply([p], [g], [m], [v], [step], [torch.empty(0)], out, [0], [LR], [0.9], [0.999],
                            [1e-8], [0.0], [0.9], [0], [], [torch.zeros(10), torch.zeros(10)])
    assert torch.equal(p, before) and float(step) == 0.0
