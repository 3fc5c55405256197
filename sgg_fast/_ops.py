"""Fake (meta) implementations of the ``torch.ops.sgg_fast`` ops, so that ``torch.compile`` can
trace a function that calls them (output shapes and dtypes only; the mutating ops declare their
mutations in the schema and return nothing).

Imported by :mod:`sgg_fast._ext` once the extension is loaded (and by torch itself through the
schema's ``set_python_module`` when it needs a fake implementation first).
"""

from __future__ import annotations

import torch
from torch.library import register_fake

#: columns of the statistics rows and of the finalize output (sgg_fast.guidance)
_NUM_STATS = 4
_NUM_OUT = 14


def num_chunks(numel, chunk_size: int):
    """Rows owned by one tensor in ``sgg_stats``' output: ``max(1, ceil(numel / chunk_size))``."""
    return torch.sym_max(1, (numel + chunk_size - 1) // chunk_size)


@register_fake("sgg_fast::sgg_stats")
def _stats_fake(grads, refs, params, chunk_size, ws=None, ws_host=None):
    rows = 0
    for g in grads:
        rows = rows + num_chunks(g.numel(), chunk_size)
    like = grads[0] if len(grads) else torch.empty(0)
    return like.new_empty((rows, _NUM_STATS), dtype=torch.float32)


@register_fake("sgg_fast::sgg_segment_sum")
def _segment_sum_fake(partials, seg_offsets):
    return partials.new_empty((seg_offsets.shape[0] - 1, _NUM_STATS))


@register_fake("sgg_fast::sgg_finalize")
def _finalize_fake(partials, seg_offsets, hyper, nu):
    # nu (a list of [2] tensors) is mutated in place: nothing to return for it
    return partials.new_empty((seg_offsets.shape[0] - 1, _NUM_OUT))


@register_fake("sgg_fast::sgg_adamw_apply")
def _apply_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    refs,
    out,
    seg_index,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    ref_beta,
    ref_mode,
    lr_tensors,
    max_exp_avg_sqs,
    ws=None,
    ws_host=None,
):
    return None


@register_fake("sgg_fast::sgg_guide_apply")
def _guide_fake(grads, refs, out, seg_index, ref_beta, ref_mode, ws=None, ws_host=None):
    return None
