"""Triton kernels of sgg_fast, installed as the subpackage ``sgg_fast.kernels``.

Never import this folder as a top-level ``kernels`` package (a PyPI package of that name
exists). Modules here import triton; ``import sgg_fast`` does not import them.
"""
