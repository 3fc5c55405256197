"""sgg_fast: Structured Gradient Guidance as a fused, drop-in replacement for torch.optim.AdamW.

``import sgg_fast`` imports neither triton nor a compiled extension; backends load them lazily.
"""

from .backends import available_backends
from .optimizer import SGGAdamW
from .source import source_gradients
from .wrapper import GradientGuidance

__version__ = "0.1.0"

__all__ = ["SGGAdamW", "GradientGuidance", "source_gradients", "available_backends", "__version__"]
