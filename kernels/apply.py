"""Apply kernels (DESIGN §3, launch 3 of a step): the fused guided AdamW update and the guided
in-place gradient rewrite of GradientGuidance. One multi-tensor launch each, over the same chunk
and pointer tables as the statistics launch (:mod:`.layout`).

:func:`launch_apply` — per element, in fp32 registers (DESIGN §1 D), with ``r`` as it stood
before this step (``exp_avg`` itself for ``reference="momentum"``)::

    u = α·g + β·r                                   (never stored)
    r ← ref_beta·r + (1-ref_beta)·g                 (reference="ema"; the raw g)
    m ← β1·m + (1-β1)·u ;  v ← β2·v + (1-β2)·u²
    p ← p·(1 - lr·wd) - lr/(1-β1^t) · m / (√v/√(1-β2^t) + eps),   t = step + 1

amsgrad (per tensor: meta column ``VM`` non-zero): ``vm ← max(vm, v)`` (NaN-propagating, like
``torch.maximum``; ``v`` in fp32 before it is rounded to the element type) and ``vm`` replaces
``v`` in the denominator. The constexpr ``AMS`` compiles that path only when some tensor of the
step has it; with ``AMS=False`` the kernel is the plain AdamW one.

α, β (per segment) and the skip flag come from the finalize output on the device; a skipped step
runs no iteration and writes nothing. Learning rate, betas, eps, weight decay and ref_beta come
from a per-group table and the step counts from a scratch copy the statistics launch made: all
runtime values (no recompilation per step, LR schedules work). The first chunk of each tensor
writes ``step = t`` (each segment's ``norm_ema`` is written by the finalize launch); every
program computes the bias corrections from the OLD step (the scratch copy), never from a value
another program writes.

:func:`launch_guide` — ``g ← α·g + β·r`` in place (and the ema update with the raw g).
"""

from __future__ import annotations

if not __name__.startswith("sgg_fast."):
    raise ImportError(f"{__name__} is part of sgg_fast: import it as sgg_fast.kernels (see kernels/README.md)")

import triton
import triton.language as tl

from sgg_fast import guidance as _G

from . import layout as L
from .launches import count_launch
from .stats import _F_ALIGNED, BLOCK, INTERPRET, NUM_WARPS, _chunk_meta, _load_f32, _ptr

_P_ = tl.constexpr(L.P)
_M_ = tl.constexpr(L.M)
_V_ = tl.constexpr(L.V)
_STEP = tl.constexpr(L.STEP)
_SEG = tl.constexpr(L.SEG)
_GROUP = tl.constexpr(L.GROUP)
_LR = tl.constexpr(L.LR)
_VM_ = tl.constexpr(L.VM)
_R_READ = tl.constexpr(L.R_READ)
_R_EMA = tl.constexpr(L.R_EMA)
_R_IS_M = tl.constexpr(L.R_IS_M)
_F_STEP = tl.constexpr(L.F_STEP)
_HC = tl.constexpr(L.HYP_COLS)
_H_LR = tl.constexpr(L.H_LR)
_H_DECAY = tl.constexpr(L.H_DECAY)
_H_EPS = tl.constexpr(L.H_EPS)
_H_B1 = tl.constexpr(L.H_B1)
_H_OMB1 = tl.constexpr(L.H_OMB1)
_H_B2 = tl.constexpr(L.H_B2)
_H_OMB2 = tl.constexpr(L.H_OMB2)
_H_LNB1 = tl.constexpr(L.H_LNB1)
_H_LNB2 = tl.constexpr(L.H_LNB2)
_H_RB = tl.constexpr(L.H_RB)
_H_OMRB = tl.constexpr(L.H_OMRB)
_H_WD = tl.constexpr(L.H_WD)
_NOUT = tl.constexpr(len(_G.OUT_COLS))
_O_ALPHA = tl.constexpr(_G.O_ALPHA)
_O_BETA = tl.constexpr(_G.O_BETA)
_O_SKIP = tl.constexpr(_G.O_SKIP)

#: below this |x|, expm1(x) uses its Taylor series (8 terms: truncation < 1e-9 relative)
_EXPM1_SERIES = tl.constexpr(0.35)


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16, round to nearest even (NaN stays NaN).

    Compiled: the hardware conversion (``cvt.rn.bf16.f32``). Under Triton's interpreter, whose
    cast truncates, integer arithmetic that gives the same bits (NaN as 0x7FC0)."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        hi = tl.where(x != x, 0x7FC0, rounded)
        y = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(tl.bfloat16)
    return y


@triton.jit
def _store_as(addr, offs, x, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Store float32 ``x`` at ``addr[offs]`` (an int64 address) in the element type ``DT`` (a
    compile-time constant; mixed-type launches dispatch once per program, see :func:`_adamw_typed`)."""
    tl.static_assert(DT >= 0, "_store_as takes a fixed element type (dispatch per program on DT = -1)")
    if DT == 0:
        tl.store(_ptr(addr, tl.float32, ALIGNED) + offs, x, mask=mask)
    elif DT == 1:
        tl.store(_ptr(addr, tl.bfloat16, ALIGNED) + offs, _to_bf16(x), mask=mask)
    else:
        tl.store(_ptr(addr, tl.float16, ALIGNED) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _one_minus_pow(ln_b, t):
    """``1 - b^t = -expm1(t·ln b)`` in fp32 without the cancellation of ``1 - exp(...)`` for b
    near 1 (β2 = 0.999: ``1 - β2`` would lose 4 digits); ``ln b = -inf`` (b = 0) gives 1."""
    x = t * ln_b
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
        1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320))))))))
    em1 = tl.where(tl.abs(x) < _EXPM1_SERIES, series, tl.exp(x) - 1.0)
    return -em1


@triton.jit
def _adamw_block(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, offs, mask, read_r, is_ema, is_m,
                 alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                 DT: tl.constexpr, ALIGNED: tl.constexpr, AMS: tl.constexpr):
    """DESIGN §1 D on one block: u = α·g + β·r, the ema update, m, v, p (fp32 registers);
    ``AMS``: amsgrad, ``vm ← max(vm, v)`` in the denominator (``vm_addr`` is read only then).

    ``bc2``: √(1-β2^t) under the interpreter (IEEE sqrt and divisions: the bits of the torch
    and CPU backends), its reciprocal when compiled (one multiply; the GPU's sqrt and division
    instructions, within 2 ulp)."""
    g = _load_f32(g_addr, offs, mask, DT, ALIGNED)
    m = _load_f32(m_addr, offs, mask, DT, ALIGNED)
    r = _load_f32(r_addr, offs, mask & read_r, DT, ALIGNED)
    r = tl.where(is_m, m, r)                   # momentum reference: exp_avg before the step
    u = alpha * g + beta * r
    v = _load_f32(v_addr, offs, mask, DT, ALIGNED)
    p = _load_f32(p_addr, offs, mask, DT, ALIGNED)
    _store_as(r_addr, offs, rb * r + omrb * g, mask & is_ema, DT, ALIGNED)
    m = b1 * m + omb1 * u
    v = b2 * v + omb2 * (u * u)
    if AMS:
        vm = _load_f32(vm_addr, offs, mask, DT, ALIGNED)
        vm = tl.maximum(vm, v, propagate_nan=tl.PropagateNan.ALL)
        vd = vm
    else:
        vd = v
    if INTERPRET:
        denom = tl.div_rn(tl.sqrt_rn(vd), bc2) + eps
        p = p * decay - step_size * tl.div_rn(m, denom)
    else:
        denom = tl.sqrt(vd) * bc2 + eps
        p = p * decay - step_size * (m / denom)
    _store_as(p_addr, offs, p, mask, DT, ALIGNED)
    _store_as(m_addr, offs, m, mask, DT, ALIGNED)
    _store_as(v_addr, offs, v, mask, DT, ALIGNED)
    if AMS:
        _store_as(vm_addr, offs, vm, mask, DT, ALIGNED)


@triton.jit
def _adamw_full(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_full, read_r, is_ema, is_m,
                alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                BLOCK: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr, AMS: tl.constexpr):
    """The full blocks [start, start + n_full) of a chunk (VEC: 16-byte aligned addresses)."""
    full = tl.full([BLOCK], 1, tl.int1)
    for k in range(0, n_full, BLOCK):
        base = start + k
        if VEC:
            base = tl.multiple_of(base, 16)
        offs = base + tl.arange(0, BLOCK)  # int64: tensors over 2^31 elements
        _adamw_block(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, offs, full, read_r, is_ema, is_m,
                     alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb, DT, VEC, AMS)


@triton.jit
def _adamw_chunk(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                 is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                 BLOCK: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, AMS: tl.constexpr):
    """The ``n_here`` elements of a chunk from ``start``, in the fixed element type ``DT``: full
    blocks without a bounds mask (a uniform mask lets loads vectorise), 16-byte vector accesses
    for a tensor whose addresses are aligned (its FLAGS bit), then the tail."""
    n_full = (n_here // BLOCK) * BLOCK
    if ALIGNED:
        if (flags & _F_ALIGNED) != 0:
            _adamw_full(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_full, read_r, is_ema,
                        is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb, BLOCK, DT,
                        True, AMS)
        else:
            _adamw_full(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_full, read_r, is_ema,
                        is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb, BLOCK, DT,
                        False, AMS)
    else:
        _adamw_full(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_full, read_r, is_ema, is_m,
                    alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb, BLOCK, DT, False, AMS)
    if n_full < n_here:
        offs = start + n_full + tl.arange(0, BLOCK)
        _adamw_block(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, offs, offs < numel, read_r, is_ema,
                     is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb, DT, False, AMS)


@triton.jit
def _adamw_typed(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                 is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                 BLOCK: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, AMS: tl.constexpr):
    """:func:`_adamw_chunk` in the element type ``DT``, or for ``DT = -1`` (mixed types) in this
    tensor's type (FLAGS bits 0-1), dispatched once per program: each branch calls the chunk
    function with a fixed type. (A type branch per load and store instead made triton 3.6.0's
    compiler fail, "operand #0 does not dominate this use", on the aligned amsgrad kernel, and
    held more registers: 128 against 107.)"""
    if DT == -1:
        code = flags & 3
        if code == 0:
            _adamw_chunk(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                         is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                         BLOCK, 0, ALIGNED, AMS)
        elif code == 1:
            _adamw_chunk(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                         is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                         BLOCK, 1, ALIGNED, AMS)
        else:
            _adamw_chunk(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                         is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                         BLOCK, 2, ALIGNED, AMS)
    else:
        _adamw_chunk(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags, read_r,
                     is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb, omrb,
                     BLOCK, DT, ALIGNED, AMS)


@triton.jit
def _apply_kernel(
    meta_ptr,       # int64 [P, META_COLS]: per-tensor addresses, sizes and flags (layout.py)
    chunks_ptr,     # int64 [C, 2]: (tensor row, first element) of each chunk = program
    hyper_ptr,      # float32 [NG, HYP_COLS]: per-group lr, 1-lr·wd, eps, betas, ln betas, ref_beta
    out_ptr,        # float32 [S, len(OUT_COLS)]: finalize output (α, β per segment; skip)
    steps_ptr,      # float32 [P]: step counts before this step (written by the stats launch)
    CHUNK: tl.constexpr,    # elements per chunk (a multiple of BLOCK)
    BLOCK: tl.constexpr,    # elements per inner iteration
    DT: tl.constexpr,       # element type code of every tensor, or -1: per tensor (FLAGS), once per program
    ALIGNED: tl.constexpr,  # some tensor is 16-byte aligned: compile the vector path (FLAGS bit 7 picks it)
    AMS: tl.constexpr = False,  # some tensor has amsgrad: compile its path (meta column VM != 0 picks it)
):
    row, start, mrow, g_addr, r_addr, numel, flags = _chunk_meta(meta_ptr, chunks_ptr)
    p_addr = tl.load(mrow + _P_)
    m_addr = tl.load(mrow + _M_)
    v_addr = tl.load(mrow + _V_)
    seg = tl.load(mrow + _SEG)
    grp = tl.load(mrow + _GROUP)
    rkind = (flags >> 2) & 3
    read_r = (rkind == _R_READ) | (rkind == _R_EMA)
    is_ema = rkind == _R_EMA
    is_m = rkind == _R_IS_M

    live = tl.load(out_ptr + _O_SKIP) == 0  # row 0's skip flag (the same in every row)
    alpha = tl.load(out_ptr + seg * _NOUT + _O_ALPHA)
    beta = tl.load(out_ptr + seg * _NOUT + _O_BETA)
    h = hyper_ptr + grp * _HC
    # a tensor lr (the group's float32 device scalar, meta column LR) is read here, on the device
    lr_addr = tl.load(mrow + _LR)
    has_lrt = lr_addr != 0
    lr_t = tl.load(lr_addr.to(tl.pointer_type(tl.float32)), mask=has_lrt, other=0.0)
    lr = tl.where(has_lrt, lr_t, tl.load(h + _H_LR))
    decay = tl.where(has_lrt, 1.0 - lr_t * tl.load(h + _H_WD), tl.load(h + _H_DECAY))  # 1 - lr·wd
    eps = tl.load(h + _H_EPS)
    b1 = tl.load(h + _H_B1)
    omb1 = tl.load(h + _H_OMB1)        # 1 - β1
    b2 = tl.load(h + _H_B2)
    omb2 = tl.load(h + _H_OMB2)        # 1 - β2
    lnb1 = tl.load(h + _H_LNB1)        # ln β1 (-inf for β1 = 0)
    lnb2 = tl.load(h + _H_LNB2)
    rb = tl.load(h + _H_RB)            # ref_beta
    omrb = tl.load(h + _H_OMRB)        # 1 - ref_beta

    t = tl.load(steps_ptr + row) + 1.0
    step_size = tl.div_rn(lr, _one_minus_pow(lnb1, t))    # lr / (1 - β1^t)
    bc2_sqrt = tl.sqrt_rn(_one_minus_pow(lnb2, t))        # √(1 - β2^t)
    if INTERPRET:
        bc2 = bc2_sqrt
    else:
        bc2 = tl.div_rn(1.0, bc2_sqrt)                    # 1/√(1 - β2^t), once per program

    n_here = tl.where(live, tl.minimum(numel - start, CHUNK), 0)  # skipped step: no iteration
    if AMS:
        vm_addr = tl.load(mrow + _VM_)
        if vm_addr != 0:
            _adamw_typed(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags,
                         read_r, is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb,
                         omrb, BLOCK, DT, ALIGNED, True)
        else:
            _adamw_typed(g_addr, r_addr, p_addr, m_addr, v_addr, vm_addr, start, n_here, numel, flags,
                         read_r, is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb,
                         omrb, BLOCK, DT, ALIGNED, False)
    else:
        _adamw_typed(g_addr, r_addr, p_addr, m_addr, v_addr, g_addr, start, n_here, numel, flags,
                     read_r, is_ema, is_m, alpha, beta, b1, omb1, b2, omb2, eps, decay, step_size, bc2, rb,
                     omrb, BLOCK, DT, ALIGNED, False)

    first = live & (start == 0)
    step_addr = tl.load(mrow + _STEP)
    tl.store(step_addr.to(tl.pointer_type(tl.float32)), t, mask=first & ((flags & _F_STEP) != 0))


def launch_apply(meta, chunks, hyper, out, steps_old, *, chunk: int, dt: int, aligned: bool,
                 amsgrad: bool = False) -> None:
    """Launch 3 (SGGAdamW): the guided AdamW update of every tensor; one program per chunk.
    ``amsgrad``: some tensor has a ``max_exp_avg_sq`` (meta column VM)."""
    C = chunks.shape[0]
    if C == 0:
        return
    count_launch("apply")
    _apply_kernel[(C,)](meta, chunks, hyper, out, steps_old, CHUNK=chunk, BLOCK=BLOCK, DT=dt,
                        ALIGNED=aligned, AMS=amsgrad, num_warps=NUM_WARPS)


@triton.jit
def _guide_block(g_addr, r_addr, offs, mask, read_r, is_ema, alpha, beta, rb, omrb, DT: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """g ← α·g + β·r in place; r ← ref_beta·r + (1-ref_beta)·g (raw g) for the ema reference."""
    g = _load_f32(g_addr, offs, mask, DT, ALIGNED)
    r = _load_f32(r_addr, offs, mask & read_r, DT, ALIGNED)
    _store_as(g_addr, offs, alpha * g + beta * r, mask, DT, ALIGNED)
    _store_as(r_addr, offs, rb * r + omrb * g, mask & is_ema, DT, ALIGNED)


@triton.jit
def _guide_full(g_addr, r_addr, start, n_full, read_r, is_ema, alpha, beta, rb, omrb,
                BLOCK: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr):
    """The full blocks [start, start + n_full) of a chunk (VEC: 16-byte aligned addresses)."""
    full = tl.full([BLOCK], 1, tl.int1)
    for k in range(0, n_full, BLOCK):
        base = start + k
        if VEC:
            base = tl.multiple_of(base, 16)
        offs = base + tl.arange(0, BLOCK)
        _guide_block(g_addr, r_addr, offs, full, read_r, is_ema, alpha, beta, rb, omrb, DT, VEC)


@triton.jit
def _guide_chunk(g_addr, r_addr, start, n_here, numel, flags, read_r, is_ema, alpha, beta, rb, omrb,
                 BLOCK: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The ``n_here`` elements of a chunk from ``start`` in the fixed element type ``DT`` (as
    :func:`_adamw_chunk`: full blocks, vector path for aligned tensors, then the tail)."""
    n_full = (n_here // BLOCK) * BLOCK
    if ALIGNED:
        if (flags & _F_ALIGNED) != 0:
            _guide_full(g_addr, r_addr, start, n_full, read_r, is_ema, alpha, beta, rb, omrb, BLOCK, DT, True)
        else:
            _guide_full(g_addr, r_addr, start, n_full, read_r, is_ema, alpha, beta, rb, omrb, BLOCK, DT, False)
    else:
        _guide_full(g_addr, r_addr, start, n_full, read_r, is_ema, alpha, beta, rb, omrb, BLOCK, DT, False)
    if n_full < n_here:
        offs = start + n_full + tl.arange(0, BLOCK)
        _guide_block(g_addr, r_addr, offs, offs < numel, read_r, is_ema, alpha, beta, rb, omrb, DT, False)


@triton.jit
def _guide_kernel(
    meta_ptr,       # int64 [P, META_COLS]: per-tensor addresses, sizes and flags (layout.py)
    chunks_ptr,     # int64 [C, 2]: (tensor row, first element) of each chunk = program
    hyper_ptr,      # float32 [NG, HYP_COLS]: per-group table (only ref_beta is read here)
    out_ptr,        # float32 [S, len(OUT_COLS)]: finalize output (α, β per segment; skip)
    CHUNK: tl.constexpr,    # elements per chunk (a multiple of BLOCK)
    BLOCK: tl.constexpr,    # elements per inner iteration
    DT: tl.constexpr,       # element type code of every tensor, or -1: per tensor (FLAGS), once per program
    ALIGNED: tl.constexpr,  # some tensor is 16-byte aligned: compile the vector path (FLAGS bit 7 picks it)
):
    _row, start, mrow, g_addr, r_addr, numel, flags = _chunk_meta(meta_ptr, chunks_ptr)
    seg = tl.load(mrow + _SEG)
    grp = tl.load(mrow + _GROUP)
    rkind = (flags >> 2) & 3
    read_r = (rkind == _R_READ) | (rkind == _R_EMA)
    is_ema = rkind == _R_EMA

    live = tl.load(out_ptr + _O_SKIP) == 0
    alpha = tl.load(out_ptr + seg * _NOUT + _O_ALPHA)
    beta = tl.load(out_ptr + seg * _NOUT + _O_BETA)
    rb = tl.load(hyper_ptr + grp * _HC + _H_RB)
    omrb = tl.load(hyper_ptr + grp * _HC + _H_OMRB)

    n_here = tl.where(live, tl.minimum(numel - start, CHUNK), 0)
    if DT == -1:  # mixed element types: dispatch on this tensor's type once per program
        code = flags & 3
        if code == 0:
            _guide_chunk(g_addr, r_addr, start, n_here, numel, flags, read_r, is_ema, alpha, beta, rb, omrb,
                         BLOCK, 0, ALIGNED)
        elif code == 1:
            _guide_chunk(g_addr, r_addr, start, n_here, numel, flags, read_r, is_ema, alpha, beta, rb, omrb,
                         BLOCK, 1, ALIGNED)
        else:
            _guide_chunk(g_addr, r_addr, start, n_here, numel, flags, read_r, is_ema, alpha, beta, rb, omrb,
                         BLOCK, 2, ALIGNED)
    else:
        _guide_chunk(g_addr, r_addr, start, n_here, numel, flags, read_r, is_ema, alpha, beta, rb, omrb, BLOCK,
                     DT, ALIGNED)


def launch_guide(meta, chunks, hyper, out, *, chunk: int, dt: int, aligned: bool) -> None:
    """Launch 3 (GradientGuidance): ``g ← α·g + β·r`` in place; one program per chunk."""
    C = chunks.shape[0]
    if C == 0:
        return
    count_launch("guide")
    _guide_kernel[(C,)](meta, chunks, hyper, out, CHUNK=chunk, BLOCK=BLOCK, DT=dt, ALIGNED=aligned,
                        num_warps=NUM_WARPS)
