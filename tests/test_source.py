"""source_gradients: the mean source-task gradient, with .grad restored."""

from __future__ import annotations

import pytest
import torch

from sgg_fast import SGGAdamW, source_gradients


def test_mean_gradient_and_grads_restored():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    unused = torch.nn.Parameter(torch.randn(4))
    model.register_parameter("unused", unused)
    batches = [(torch.randn(6, 7), torch.randint(0, 3, (6,))) for _ in range(4)]
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, mk in zip(model.parameters(), marker):
        p.grad = mk.clone()
    refs = source_gradients(model, loss_fn, batches)
    # independent reference: the gradient of the mean loss (batches of equal size)
    params = [p for p in model.parameters() if p is not unused]
    total = sum(loss_fn(model, b) for b in batches) / len(batches)
    want = torch.autograd.grad(total, params)
    for p, w in zip(params, want):
        torch.testing.assert_close(refs[p], w, rtol=1e-5, atol=1e-7)
    assert torch.equal(refs[unused], torch.zeros(4))
    for p, mk in zip(model.parameters(), marker):
        assert torch.equal(p.grad, mk)
    opt = SGGAdamW(model.parameters(), reference="source")
    opt.set_reference(refs)
    assert torch.equal(opt.state[params[0]]["ref"], refs[params[0]])


def test_empty_batches_and_bad_loss():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="empty"):
        source_gradients(model, lambda m, b: m(b).sum(), [])
    with pytest.raises(ValueError, match="scalar"):
        source_gradients(model, lambda m, b: m(b), [torch.randn(3, 2)])
    assert model.weight.grad is None
