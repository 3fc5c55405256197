"""Layouts of the device-resident metadata tables shared by the host (the triton backend) and the
kernels. Plain integers here (no triton import); the kernel modules wrap them in ``tl.constexpr``.

Per-tensor table ``meta``: int64 ``[P, META_COLS]``, one row per tensor of the step plan, in plan
order (tensors of one segment are contiguous):

==========  ==================================================================================
``G``       address of the gradient ``g``
``R``       address of the reference ``r`` (the gradient's address when ``r = 0``: never read)
``P``       address of the parameter ``p`` (read by statistics only when ``mag_mode="param"``)
``M``       address of ``exp_avg`` (apply only; the gradient's address otherwise, never read)
``V``       address of ``exp_avg_sq`` (apply only; as ``M``)
``STEP``    address of the float32 ``step`` count (0: none, e.g. GradientGuidance)
``NU``      address of the float32 ``norm_ema`` (0: the segment is not ``mag_mode="relative"``)
``NUMEL``   number of elements (int64 arithmetic throughout)
``SEG``     segment index (row of the finalize output)
``GROUP``   row of the per-group AdamW hyper-parameter table
``FLAGS``   bit field, below
``LR``      address of the group's float32 tensor ``lr`` (0: the hyper table's ``H_LR``)
``VM``      address of ``max_exp_avg_sq`` (apply only; 0: amsgrad is off for this tensor's group)
==========  ==================================================================================

``FLAGS``: bits 0-1 the element type (:data:`DT_CODES`), bits 2-3 the reference kind
(:data:`R_NONE` ... :data:`R_IS_M`), bit 4 ``pp`` wanted, bit 5 has ``norm_ema``, bit 6 has a
``step``, bit 7 every address of the row (g, r, p, m, v and a non-zero VM) is 16-byte aligned (this
tensor takes the vector path; a view at an odd offset into a flat buffer takes the scalar path
alone). Every tensor of a row (g, r, p, m, v, vm) has the parameter's element type.

Chunk table ``chunks``: int64 ``[C, 2]``: (tensor row, first element) of each chunk of
``CHUNK`` elements; every tensor has at least one chunk (a 0-element tensor has one empty chunk,
so that its step count and norm_ema are still written by "the first chunk of the tensor").
Chunks are in plan order, so the chunks (and statistics partials) of a segment are contiguous.

Per-group table ``hyper``: float32 ``[NG, HYP_COLS]`` (AdamW settings, runtime values).
Segment table ``segs``: int64 ``[S, SEG_COLS]``: first chunk, one past the last chunk, and the
address of the segment's ``norm_ema`` (0: none).
"""

if not __name__.startswith("sgg_fast."):
    raise ImportError(f"{__name__} is part of sgg_fast: import it as sgg_fast.kernels (see kernels/README.md)")

G, R, P, M, V, STEP, NU, NUMEL, SEG, GROUP, FLAGS, LR, VM = range(13)
META_COLS = 13  # rows of 104 bytes

#: element type codes (bits 0-1 of FLAGS); DT_MIXED asks the kernels to dispatch per tensor
DT_F32, DT_BF16, DT_F16 = 0, 1, 2
DT_MIXED = -1

#: reference kinds (bits 2-3 of FLAGS)
R_NONE = 0   # r = 0 (e.g. GradientGuidance with reference="momentum" before the first step)
R_READ = 1   # r read from R (source; GradientGuidance's momentum buffer)
R_EMA = 2    # r read from R and updated r <- ref_beta*r + (1-ref_beta)*g after u is formed
R_IS_M = 3   # r is exp_avg before this step (SGGAdamW reference="momentum"): R == M

F_PP = 16     # bit 4: accumulate pp = sum p^2
F_NU = 32     # bit 5: write norm_ema
F_STEP = 64   # bit 6: has a step count
F_ALIGNED = 128  # bit 7: all addresses of the row 16-byte aligned

#: per-group hyper-parameter columns (float32)
(H_LR, H_DECAY, H_EPS, H_B1, H_OMB1, H_B2, H_OMB2, H_LNB1, H_LNB2, H_RB, H_OMRB, H_WD) = range(12)
HYP_COLS = 12

#: segment table columns
S_LO, S_HI, S_NU = range(3)
SEG_COLS = 3
