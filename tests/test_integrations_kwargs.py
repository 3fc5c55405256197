"""The transformers helpers take exactly SGGAdamW's arguments, with its rules (issue 24, 8-10)."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.integrations.transformers import (  # noqa: E402
    create_sgg_optimizer,
    sgg_optimizer_cls_and_kwargs,
    sgg_optimizer_kwargs,
    sgg_training_args,
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.lin(x))


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


EXTRA = dict(amsgrad=True, maximize=True, foreach=False, capturable=True, fused=None, process_group=None,
             decoupled_weight_decay=True, backend="torch")


@pytest.mark.parametrize("name", list(EXTRA))
def test_every_sggadamw_argument_is_accepted(tmp_path, name):
    args = _args(tmp_path, max_grad_norm=0.0)
    kw = {name: EXTRA[name]}
    opt = create_sgg_optimizer(Tiny(), args, **kw)
    if name in opt.defaults:
        assert opt.defaults[name] == EXTRA[name]
    assert sgg_optimizer_kwargs(args, **kw)[name] == EXTRA[name]
    cls, kwargs = sgg_optimizer_cls_and_kwargs(args, **kw)
    assert cls is SGGAdamW and kwargs[name] == EXTRA[name]


def test_the_allowed_set_is_the_signature(tmp_path):
    args = _args(tmp_path, max_grad_norm=0.0)
    names = [n for n in inspect.signature(SGGAdamW.__init__).parameters if n not in ("self", "params")]
    defaults = {n: p.default for n, p in inspect.signature(SGGAdamW.__init__).parameters.items() if n in names}
    kwargs = sgg_optimizer_kwargs(args, **defaults)  # every argument at its default value is accepted
    assert set(names) <= set(kwargs)


def test_explicit_weight_decay_wins(tmp_path):
    args = _args(tmp_path, weight_decay=0.0, max_grad_norm=0.0)
    opt = create_sgg_optimizer(Tiny(), args, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and decay["params"][0].dim() == 2  # Trainer's rule: the Linear weight
    opt2 = create_sgg_optimizer(Tiny(), _args(tmp_path, weight_decay=0.05, max_grad_norm=0.0))
    assert opt2.param_groups[0]["weight_decay"] == 0.05  # args.weight_decay without an explicit one


@pytest.mark.parametrize("fn", [sgg_training_args, sgg_optimizer_kwargs, sgg_optimizer_cls_and_kwargs])
def test_typos_and_bad_values_are_refused(tmp_path, fn):
    args = _args(tmp_path)
    before = args.max_grad_norm
    with pytest.raises(TypeError, match="unknown SGGAdamW arguments \\['lambda_magg'\\]"):
        fn(args, lambda_magg=0)
    with pytest.raises(ValueError, match="lambda_mag"):
        fn(args, lambda_mag=-1)
    with pytest.raises(ValueError, match="mag_mode"):
        fn(args, mag_mode="nope")
    assert args.max_grad_norm == before
