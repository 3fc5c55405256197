"""One optimizer step on CUDA is three kernel launches (statistics, finalize, apply/guide) in every
mode, whatever the number of tensors, and no host sync: counted with torch.profiler (every CUDA
kernel the step runs, ours or torch's) under torch.cuda.set_sync_debug_mode("error"). Run by
benchmarks/gpu_check.sh on a lent GPU (``pytest -m cuda``)."""

from __future__ import annotations

import pytest
import torch

from sgg_fast import GradientGuidance, SGGAdamW

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# every reference x every mag_mode, the granularities in turn (each one meets every reference)
MODES = [dict(reference=r, mag_mode=m, granularity=("group", "tensor", "global")[(i + j) % 3])
         for i, r in enumerate(("momentum", "ema", "source")) for j, m in enumerate(("absolute", "relative", "param"))]


def _backend_or_skip(name: str) -> str:
    if name == "cuda":
        from sgg_fast import _ext

        if not (_ext.load() and _ext.has_cuda_kernels()):
            pytest.skip(f"the extension's CUDA kernels are not built: {_ext.error()}")
    else:
        pytest.importorskip("triton")
    return name


def _kernels_of(fn) -> list[str]:
    """Names of the CUDA kernels ``fn()`` launches (memcpy/memset excluded); ``fn`` runs with
    torch.cuda.set_sync_debug_mode("error"): a host sync inside it raises."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


def _params(n: int, dtype=torch.float32):
    torch.manual_seed(n)
    shapes = [(64, 33), (4097,), (), (0,)] + [(257,)] * max(0, n - 4)
    return [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes[:n]]


def _grads(ps, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, device="cuda", dtype=p.dtype, generator=g)


def _steps_launch_three(step, ps) -> None:
    _grads(ps, 0)
    step()                                  # warm-up: tables built and uploaded
    step()
    torch.cuda.synchronize()
    with torch.no_grad():
        for p in ps:                        # same gradient buffers: nothing to rebuild
            p.grad.mul_(0.5)
    names = _kernels_of(lambda: (step(), step()))
    assert len(names) == 6, names           # two steps


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()))
def test_sgg_adamw_step_is_three_launches(backend, mode):
    ps = _params(6)
    opt = SGGAdamW(ps, lr=1e-3, backend=_backend_or_skip(backend), max_norm=1.0, **mode)
    if mode["reference"] == "source":
        opt.set_reference([torch.randn_like(p) for p in ps])
    _steps_launch_three(opt.step, ps)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n", [4, 300])
def test_step_is_three_launches_whatever_the_number_of_tensors(backend, n):
    ps = _params(n, torch.bfloat16)
    opt = SGGAdamW(ps, lr=1e-3, backend=_backend_or_skip(backend), granularity="tensor")
    _steps_launch_three(opt.step, ps)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gradient_guidance_step_is_three_launches(backend):
    """The guidance part of GradientGuidance.step (the wrapped optimizer's own step, and the
    host read of the skip flag that decides whether to call it, come after it)."""
    ps = _params(6)
    wrapped = GradientGuidance(torch.optim.SGD(ps, lr=0.1), backend=_backend_or_skip(backend),
                               reference="ema")

    def guide_only():
        wrapped._engine.run(wrapped._prepare(), "guide")

    _steps_launch_three(guide_only, ps)
