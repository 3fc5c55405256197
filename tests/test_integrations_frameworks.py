"""SGGAdamW inside the frameworks people train with: transformers ``Trainer``, accelerate,
``torch.amp.GradScaler``, PEFT LoRA and Lightning. Tiny models built in code (no downloads).

In each: with every guidance λ = 0, SGGAdamW must train like ``torch.optim.AdamW`` in the same
loop ("to float rounding", tolerance below); with the default λs it must decrease the loss; the
framework's own features (accumulation, schedules, checkpoints, loss scaling) must keep working.

Tolerance. SGGAdamW (λ = 0) and AdamW compute the same recurrences with different rounding
(tests/_adamw_ref.py bounds it per element). The largest term is the bias correction
1 - β2^t when a fused kernel computes it in float32 (torch's own fused AdamW does too): its
condition number β2^t / (1 - β2^t) ≈ 1000 at t = 1 for β2 = 0.999 makes the early updates
differ by up to ~1000·u ≈ 6e-5 relative (u = 2⁻²⁴); the torch backend, which computes it in
double like AdamW, is bit-identical here. Relative to the total update ‖p_T - p_0‖ that is at most
≈ 6e-5 over the few steps here (the model feeds ulp-level parameter differences back into the
gradients, but not enough to matter over 4-8 steps), so ``REL = 1e-4``; SGG with its default λs
differs from AdamW by more than 1e-2 of the update (asserted: the tolerance can fail).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from sgg_fast import SGGAdamW

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ZERO = dict(lambda_dir=0.0, lambda_mag=0.0, lambda_align=0.0)
REL = 1e-4
KW = dict(lr=1e-2, weight_decay=0.01)


def _flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _rel(a, b, p0):
    """‖a - b‖ / ‖b - p0‖: the difference of two runs relative to the update of the second."""
    return float((a - b).norm() / (b - p0).norm())


class MLP(torch.nn.Module):
    def __init__(self, d_in=8, d_hid=16, d_out=3):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hid)
        self.fc2 = torch.nn.Linear(d_hid, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


# -- transformers.Trainer ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    return model, data


def _targs(tmp_path, **kw):
    import transformers
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01,
                max_grad_norm=1.0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **kw})


def _full_loss(model, data):
    import transformers
    batch = transformers.default_data_collator(data)
    model.eval()
    with torch.no_grad():
        out = float(model(**batch).loss)
    model.train()
    return out


def test_trainer_zero_lambdas_is_adamw_and_default_lambdas_learn(tmp_path, tiny_gpt2):
    import transformers

    from sgg_fast.integrations.transformers import SGGCallback, create_sgg_optimizer, sgg_training_args
    base, data = tiny_gpt2
    p0 = _flat(base)
    # Trainer's own AdamW (optim="adamw_torch"), accumulation 2, linear warmup then decay, clipping
    m_ref = copy.deepcopy(base)
    ref_tr = transformers.Trainer(model=m_ref, args=_targs(tmp_path / "ref", optim="adamw_torch"), train_dataset=data)
    ref_tr.train()
    lrs = [h["learning_rate"] for h in ref_tr.state.log_history if "learning_rate" in h]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[3] < lrs[2], lrs  # the schedule warmed up, then decayed
    # SGGAdamW with λ = 0 through the helper (Trainer's clipping is kept: no SGG magnitude control)
    m_sgg = copy.deepcopy(base)
    args = _targs(tmp_path / "sgg")
    opt = create_sgg_optimizer(m_sgg, args, **ZERO)
    tr = transformers.Trainer(model=m_sgg, args=args, train_dataset=data, optimizers=(opt, None),
                              callbacks=[SGGCallback()])
    tr.train()
    assert all(float(st["step"]) == 4 for st in opt.state.values())  # 8 micro-batches, 4 steps
    assert _rel(_flat(m_sgg), _flat(m_ref), p0) < REL
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert logged and all(h["sgg_skipped_steps"] == 0 for h in logged)
    # default λs (with the copy of args that leaves the norm to SGG): not AdamW, and it learns
    m_def = copy.deepcopy(base)
    sgg_args = sgg_training_args(_targs(tmp_path / "def"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no double-clipping warning with the copy
        tr = transformers.Trainer(model=m_def, args=sgg_args, train_dataset=data, callbacks=[SGGCallback()],
                                  optimizers=(create_sgg_optimizer(m_def, sgg_args), None))
        tr.train()
    assert _rel(_flat(m_def), _flat(m_ref), p0) > 1e-2
    assert _full_loss(m_def, data) < _full_loss(base, data) - 0.05


def test_trainer_resume_equals_uninterrupted(tmp_path, tiny_gpt2):
    import transformers

    from sgg_fast.integrations.transformers import SGGCallback, create_sgg_optimizer, sgg_training_args
    base, data = tiny_gpt2
    args = sgg_training_args(_targs(tmp_path, save_strategy="steps", save_steps=2))
    m1 = copy.deepcopy(base)
    transformers.Trainer(model=m1, args=args, train_dataset=data, callbacks=[SGGCallback()],
                         optimizers=(create_sgg_optimizer(m1, args), None)).train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists()
    m2 = copy.deepcopy(base)
    opt2 = create_sgg_optimizer(m2, args)
    tr2 = transformers.Trainer(model=m2, args=args, train_dataset=data, optimizers=(opt2, None))
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert tr2.state.global_step == 4 and all(float(st["step"]) == 4 for st in opt2.state.values())
    # the same computation in the same order from the same state: the same bits
    assert torch.equal(_flat(m2), _flat(m1))


def test_trainer_callback_warns_about_double_clipping(tmp_path, tiny_gpt2):
    import transformers

    from sgg_fast.integrations.transformers import SGGCallback
    base, data = tiny_gpt2
    m = copy.deepcopy(base)
    args = _targs(tmp_path, max_steps=1)  # max_grad_norm=1.0, SGG's default lambda_mag=1
    tr = transformers.Trainer(model=m, args=args, train_dataset=data, callbacks=[SGGCallback()],
                              optimizers=(SGGAdamW(m.parameters(), lr=1e-3), None))
    with pytest.warns(UserWarning, match="clips the gradient norm to 1.0 before SGGAdamW"):
        tr.train()
    assert args.max_grad_norm == 1.0


# -- accelerate -------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    acc = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerate_run(acc, make_opt, steps, state_in=None, state_out=None, start=0):
    """``steps`` optimizer steps of accumulation 2 over micro-batches of 4 (micro-batch ``start``
    onwards); optionally load a saved state first / save it at the end."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt(model)
    accelerator = acc.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, opt)
    if state_in:
        accelerator.load_state(state_in)
    x, y = _mlp_data(64)
    for i in range(start, start + 2 * steps):
        xb, yb = x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, xb, yb))
            opt.step()
            opt.zero_grad()
    if state_out:
        accelerator.save_state(state_out)
    return accelerator.unwrap_model(model), opt


def test_accelerate_prepare_accumulate_save_load(tmp_path, fresh_accelerate):
    from sgg_fast.integrations.accelerate import log_sgg, unwrap
    acc = fresh_accelerate
    torch.manual_seed(0)
    p0 = _flat(MLP())
    ref, _ = _accelerate_run(acc, lambda m: torch.optim.AdamW(m.parameters(), **KW), 4)
    m0, opt0 = _accelerate_run(acc, lambda m: SGGAdamW(m.parameters(), **KW, **ZERO), 4)
    assert float(unwrap(opt0).state[next(iter(unwrap(opt0).state))]["step"]) == 4  # accumulation: 4 steps
    assert _rel(_flat(m0), _flat(ref), p0) < REL
    # default λs: 4 steps, then save; a new process-like run loads and continues 2 more
    make = lambda m: SGGAdamW(m.parameters(), **KW)
    full, _ = _accelerate_run(acc, make, 6)
    _accelerate_run(acc, make, 4, state_out=str(tmp_path / "state"))
    resumed, opt = _accelerate_run(acc, make, 2, state_in=str(tmp_path / "state"), start=8)
    assert float(unwrap(opt).state[next(iter(unwrap(opt).state))]["step"]) == 6
    assert torch.equal(_flat(resumed), _flat(full))
    assert _rel(_flat(full), _flat(_accelerate_run(acc, lambda m: torch.optim.AdamW(m.parameters(), **KW), 6)[0]),
                p0) > 1e-2
    x, y = _mlp_data(64)
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(_loss(full, x, y)) < float(_loss(MLP(), x, y))

    class Log:
        def __init__(self):
            self.seen = []

        def log(self, logs, step=None):
            self.seen.append((logs, step))

    fake = Log()
    assert log_sgg(fake, opt, step=6) == {"sgg_skipped_steps": 0} and fake.seen == [({"sgg_skipped_steps": 0}, 6)]


def test_accelerate_clip_helper_warns(fresh_accelerate):
    from sgg_fast.integrations.accelerate import clip_grad_norm_
    accelerator = fresh_accelerate.Accelerator(cpu=True)
    model = MLP()
    opt = SGGAdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    accelerator.backward(_loss(model, *_mlp_data(4)))
    with pytest.warns(UserWarning, match="accelerator.clip_grad_norm_ clips the gradient norm to 0.5"):
        clip_grad_norm_(accelerator, model.parameters(), 0.5, opt)
    assert float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()) <= 0.5 * (1 + 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_grad_norm_(accelerator, model.parameters(), 0.5, opt)  # once per optimizer


# -- torch.amp.GradScaler on CPU --------------------------------------------------------------
def _scaler_run(opt_cls, kw, inf_at=(), steps=4):
    torch.manual_seed(0)
    model = MLP()
    opt = opt_cls(model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = _mlp_data(16)
    scales, seen = [], []
    for t in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x, y)
        scaler.scale(loss.float()).backward()
        if t in inf_at:
            model.fc1.weight.grad[0, 0] = float("inf")
        before = _flat(model)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        seen.append((before, _flat(model)))
    return model, opt, scales, seen


def test_grad_scaler_cpu():
    p0 = _flat(_scaler_run(torch.optim.AdamW, KW, steps=0)[0])
    ref, _, ref_scales, _ = _scaler_run(torch.optim.AdamW, KW, inf_at=(1,))
    m, opt, scales, seen = _scaler_run(SGGAdamW, {**KW, **ZERO}, inf_at=(1,))
    assert scales == ref_scales and scales[1] == scales[0] / 2  # the inf step halved the scale
    assert torch.equal(seen[1][0], seen[1][1])  # and was skipped: the parameters did not move
    assert all(float(st["step"]) == 3 for st in opt.state.values())
    assert _rel(_flat(m), _flat(ref), p0) < REL
    # the guidance sees the unscaled gradient: its norm equals that of an unscaled backward
    torch.manual_seed(0)
    model = MLP()
    opt = SGGAdamW(model.parameters(), **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = _mlp_data(16)
    twin = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaler.scale(_loss(model, x, y).float()).backward()
        _loss(twin, x, y).float().backward()
    want = torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).norm()
    scaler.step(opt)
    torch.testing.assert_close(opt.last_stats()["grad_norm"][0], want, rtol=1e-5, atol=0)
    # default λs learn through the scaler
    m, _, _, _ = _scaler_run(SGGAdamW, KW, steps=8)
    torch.manual_seed(0)
    assert float(_loss(m, x, y)) < float(_loss(MLP(), x, y))


# -- PEFT LoRA --------------------------------------------------------------------------------
def _lora_run(make_opt, steps=5):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MLP()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                      lora_dropout=0.0, init_lora_weights="gaussian"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(trainable)
    x, y = _mlp_data(16)
    p0 = torch.cat([p.detach().reshape(-1).double() for p in trainable])
    loss0 = float(_loss(model, x, y))
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base weights stay frozen
    flat = torch.cat([p.detach().reshape(-1).double() for p in trainable])
    return flat, p0, loss0, float(_loss(model, x, y)), opt, trainable


def test_peft_lora():
    ref, p0, _, _, _, _ = _lora_run(lambda ps: torch.optim.AdamW(ps, **KW))
    got, _, _, _, opt, trainable = _lora_run(lambda ps: SGGAdamW(ps, **KW, **ZERO))
    assert len(trainable) == 4 and set(map(id, opt.state)) == set(map(id, trainable))  # LoRA A, B only
    assert _rel(got, ref, p0) < REL
    got, _, loss0, loss, _, _ = _lora_run(lambda ps: SGGAdamW(ps, **KW))
    assert _rel(got, ref, p0) > 1e-2
    assert loss < loss0


# -- Lightning --------------------------------------------------------------------------------
def _pl():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def _lightning_fit(make_opt, callbacks=(), steps=4, **trainer_kw):
    pl = _pl()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = MLP()

        def training_step(self, batch, batch_idx):
            return _loss(self.net, *batch)

        def configure_optimizers(self):
            return make_opt(self.net.parameters())

    x, y = _mlp_data(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    module = Module()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         callbacks=list(callbacks), log_every_n_steps=1, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, loader)
    return module.net, trainer


def test_lightning():
    from sgg_fast.integrations.lightning import SGGCallback
    torch.manual_seed(0)
    p0 = _flat(MLP())
    ref, _ = _lightning_fit(lambda ps: torch.optim.AdamW(ps, **KW))
    got, trainer = _lightning_fit(lambda ps: SGGAdamW(ps, **KW, **ZERO), callbacks=[SGGCallback()])
    opt = trainer.optimizers[0]
    assert isinstance(opt, SGGAdamW) and all(float(st["step"]) == 4 for st in opt.state.values())
    assert _rel(_flat(got), _flat(ref), p0) < REL
    assert float(trainer.callback_metrics["sgg_skipped_steps"]) == 0
    # default λs: not AdamW, learns
    got, _ = _lightning_fit(lambda ps: SGGAdamW(ps, **KW), callbacks=[SGGCallback()])
    assert _rel(_flat(got), _flat(ref), p0) > 1e-2
    x, y = _mlp_data(32)
    torch.manual_seed(0)
    assert float(_loss(got, x, y)) < float(_loss(MLP(), x, y))
    # gradient_clip_val before SGG's magnitude control: warned about
    with pytest.warns(UserWarning, match=r"Lightning \(Trainer\(gradient_clip_val=...\)\) clips the gradient norm"):
        _lightning_fit(lambda ps: SGGAdamW(ps, **KW), callbacks=[SGGCallback()], steps=1, gradient_clip_val=0.5)
