"""Adapter for the pure-PyTorch backend (``sgg_fast.reference``)."""

from __future__ import annotations

import torch

from .. import reference
from . import register
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    description = "pure PyTorch (_foreach ops); any device; reads the skip flag on the host"
    device_types = ("cpu", "cuda", "xpu", "mps", "meta", "hpu", "privateuseone")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    # the fallback: tried after every fused backend
    auto_priority = {t: 100 for t in device_types}
    device_skip = False

    def not_supported_reasons(self, plan):
        # runs anywhere, several devices included (statistics meet on the first tensor's device)
        return [f"torch does not support {str(dt).replace('torch.', '')} parameters"
                for dt in plan.dtypes if dt not in self.dtypes]

    def stats(self, plan):
        return reference.tensor_stats(plan)

    def apply(self, plan, out):
        reference.apply_adamw(plan, out)

    def guide(self, plan, out):
        reference.guide_grads(plan, out)


register(TorchBackend())
