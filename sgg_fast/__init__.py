"""sgg_fast: Structured Gradient Guidance as a fused, drop-in replacement for torch.optim.AdamW.

``import sgg_fast`` imports neither triton nor a compiled extension; backends load them lazily.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Resolve ``sgg_fast.kernels`` to ``<checkout>/kernels`` when running from a source checkout
    that was not installed (an install maps it through ``package_dir``).

    ``kernels/`` has no ``__init__.py`` (kernels/README.md: a regular package there would shadow
    Hugging Face's ``kernels``), so ``sgg_fast.kernels`` is a namespace-style package whose one
    location is that folder."""

    _dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

    def find_spec(self, name, path=None, target=None):
        if name != "sgg_fast.kernels" or not os.path.isfile(os.path.join(self._dir, "layout.py")):
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [self._dir]
        return spec


# first in sys.meta_path: a checkout's own kernels win over another install's mapping (e.g. an
# editable install of a different checkout of sgg_fast in the same environment)
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")):
    sys.meta_path.insert(0, _SourceTreeKernels())

from .backends import available_backends  # noqa: E402
from .optimizer import SGGAdamW  # noqa: E402
from .overlap import overlap_backward  # noqa: E402
from .source import source_gradients  # noqa: E402
from .wrapper import GradientGuidance  # noqa: E402

__version__ = "0.1.0"

__all__ = ["SGGAdamW", "GradientGuidance", "overlap_backward", "source_gradients", "available_backends", "__version__"]
