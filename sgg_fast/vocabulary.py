"""The words of a step: reference kinds, magnitude modes, granularities, non-finite policies.

The one list a new reference kind (or mode) starts from: validation checks settings against these
tuples, the plan and the backends index them (``REF_*`` are positions in :data:`REFERENCES`), and
:mod:`sgg_fast.guidance` codes the magnitude modes in this order. A leaf: it imports nothing of
the package.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeIs

#: ``reference=``: exp_avg before the step, an EMA of raw gradients, or a fixed source direction
REFERENCES = ("momentum", "ema", "source")
REF_MOMENTUM, REF_EMA, REF_SOURCE = range(len(REFERENCES))
#: ``mag_mode=``: τ = max_norm, mag_ratio·ν, or mag_ratio·max(‖p‖, 1e-3) (guidance.MAG_MODES codes)
MAG_MODES = ("absolute", "relative", "param")
#: ``granularity=``: one segment per param_group, per tensor, or one for all
GRANULARITIES = ("group", "tensor", "global")
#: ``nonfinite=``: skip the whole step on the device, or raise FloatingPointError
NONFINITE = ("skip", "raise")


def dtensor_type() -> Any:
    """The DTensor class if ``torch.distributed.tensor`` is loaded (else no tensor can be one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> TypeIs[DTensor]:
    """``t`` is a DTensor (FSDP2 / tensor parallel), without importing torch.distributed."""
    DT = dtensor_type()
    return DT is not None and isinstance(t, DT)
