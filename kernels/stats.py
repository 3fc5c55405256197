"""Statistics and finalize kernels (DESIGN §3, launches 1 and 2 of a step).

Launch 1, :func:`launch_stats`: ONE multi-tensor launch over every tensor of the step. Program
``c`` reads chunk ``c`` (``CHUNK`` elements of one tensor, located through the device-resident
chunk and pointer tables of :mod:`.layout`) and writes its partial sums

    ``partials[c] = (Σ g², Σ r², Σ g·r, Σ p²)``      (fp32 accumulation, fp32/bf16/fp16 inputs)

to its own row: no atomics, so the result does not depend on scheduling. The first chunk of
each tensor also copies the tensor's step count into a scratch buffer, which the apply launch
reads (the apply launch increments the step counts, so it must not read them).

Launch 2, :func:`launch_finalize`: a grid of ``cdiv(S, SB)`` programs, one per tile of ``SB``
segments. Pass 1 sums the partials of each segment of the tile (rows ``lo:hi`` of the partials)
in a fixed order — a ``[SB, KB]`` tile of running sums, reduced along its rows at the end — so
results are bitwise reproducible run to run and do not depend on the grid. Pass 2 computes
exactly :func:`sgg_fast.guidance.finalize`'s output columns (α, β, ν, the ``last_stats()`` row,
``bad``) of the tile, mirroring its formulas operation by operation (IEEE ``div_rn``/``sqrt_rn``,
no FMA contraction; the third mirror is ``finalize_row`` in ``csrc/sgg_common.h``). Each program
then ORs whether its tile had a non-finite value into a global flag and takes a ticket (atomics
in a two-int32 workspace, ``acq_rel``); the program that draws the last ticket has seen every
tile's writes, and does pass 3 for all segments: the global ``skipped`` flag, and each relative
segment's new ``(ν, initialised)`` written into its own float32 [2] tensor (``plan.seg_nus``)
unless skipped. It resets the workspace to zero for the next launch. The flag is an OR and the
sums do not depend on which program runs when, so the result is deterministic.
"""

from __future__ import annotations

if not __name__.startswith("sgg_fast."):
    raise ImportError(f"{__name__} is part of sgg_fast: import it as sgg_fast.kernels (see kernels/README.md)")

import os

import torch
import triton
import triton.language as tl

from sgg_fast import guidance as _G

from . import layout as L
from .launches import count_launch

# ---- layout constants as compile-time constants -------------------------------------------
_MC = tl.constexpr(L.META_COLS)
_G_ = tl.constexpr(L.G)
_R_ = tl.constexpr(L.R)
_P_ = tl.constexpr(L.P)
_STEP = tl.constexpr(L.STEP)
_NUMEL = tl.constexpr(L.NUMEL)
_FLAGS = tl.constexpr(L.FLAGS)
_R_NONE = tl.constexpr(L.R_NONE)
_F_PP = tl.constexpr(L.F_PP)
_F_STEP = tl.constexpr(L.F_STEP)
_F_ALIGNED = tl.constexpr(L.F_ALIGNED)
#: Triton's interpreter (CPU tests) runs these kernels: the exact integer bf16 rounding and IEEE
#: division/sqrt are used there, the hardware instructions when compiled (kernels/apply.py)
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_SC = tl.constexpr(L.SEG_COLS)
_S_LO = tl.constexpr(L.S_LO)
_S_HI = tl.constexpr(L.S_HI)
_S_NU = tl.constexpr(L.S_NU)

_NOUT = tl.constexpr(len(_G.OUT_COLS))
_NHYP = tl.constexpr(len(_G.HYPER_COLS))
_NNU = tl.constexpr(len(_G.NU_COLS))
_PARAM_FLOOR = tl.constexpr(_G.PARAM_NORM_FLOOR)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_EPS32 = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps

# columns, by name (guidance.py / csrc/sgg_common.h)
_GG, _RR, _GR, _PP = (tl.constexpr(c) for c in (_G.GG, _G.RR, _G.GR, _G.PP))
(_H_LDIR, _H_LMAG, _H_LALIGN, _H_MODE, _H_MAXNORM, _H_RATIO, _H_MBETA, _H_GRSIGN, _H_ASIGN,
 _H_BSIGN) = (tl.constexpr(c) for c in (_G.H_LDIR, _G.H_LMAG, _G.H_LALIGN, _G.H_MODE, _G.H_MAXNORM,
                                        _G.H_RATIO, _G.H_MBETA, _G.H_GRSIGN, _G.H_ASIGN, _G.H_BSIGN))
(_O_ALPHA, _O_BETA, _O_NU, _O_NUINIT, _O_GNORM, _O_RNORM, _O_COS, _O_CONFLICT, _O_UNORM, _O_SCALE,
 _O_DIRPEN, _O_MAGPEN, _O_BAD, _O_SKIP) = (tl.constexpr(c) for c in range(len(_G.OUT_COLS)))
_N_NU, _N_INIT = tl.constexpr(_G.N_NU), tl.constexpr(_G.N_INIT)
_MAG_ABS, _MAG_REL = tl.constexpr(_G.MAG_MODES["absolute"]), tl.constexpr(_G.MAG_MODES["relative"])
assert _G.OUT_COLS.index("skipped") == len(_G.OUT_COLS) - 1 and _G.O_SKIP == len(_G.OUT_COLS) - 1

#: elements per inner iteration of a program (8 bf16 / 2x4 fp32 per thread with 4 warps:
#: full 16-byte vector loads)
BLOCK = 1024
#: elements per chunk (one program) on a GPU: chosen per parameter list by :func:`gpu_chunk`,
#: a power of two between these bounds, aiming at CHUNK_PROGRAMS_PER_SM programs per SM (enough
#: resident warps to saturate memory bandwidth for small lists; few, long programs and a small
#: partials buffer for large ones: 1e9 parameters -> 65536 -> ~15k programs, 240 kB partials)
CHUNK_MIN_GPU = 4096
CHUNK_MAX_GPU = 65536
CHUNK_PROGRAMS_PER_SM = 16
#: elements per chunk under TRITON_INTERPRET=1 (each program costs Python time there; small
#: so that the CPU tests cover tensors that span several chunks)
CHUNK_INTERPRET = 4096
#: finalize tile: TILE running sums per statistic (SB segments x TILE/SB partial rows), 4 tiles
#: of 2048 fp32 over 8 warps = 32 registers per thread; SB adapts to the number of segments so
#: that one large segment (granularity="global") reads 2048 partial rows per iteration. With
#: MAX_SEG_BLOCK segments per program, 272 segments (a 135M model, granularity="tensor") run as
#: 17 programs and 1000 as 63, instead of one program walking them all.
FINALIZE_TILE = 2048
MAX_SEG_BLOCK = 16
#: segments per iteration of finalize's pass 3 (the last program walks every segment: a few loads
#: and stores each, so a wide tile: 8 warps, one segment per thread)
FINALIZE_PASS3_TILE = 256
_P3 = tl.constexpr(FINALIZE_PASS3_TILE)
#: int32 slots of the finalize workspace (launch_finalize's ``sync``)
SYNC_BAD = 0  # OR of every tile's "non-finite" flag
SYNC_TICKET = 1  # programs finished with passes 1-2
SYNC_SLOTS = 2
_SYNC_BAD = tl.constexpr(SYNC_BAD)
_SYNC_TICKET = tl.constexpr(SYNC_TICKET)
#: num_warps of the multi-tensor kernels / of each finalize program
NUM_WARPS = 4
FINALIZE_WARPS = 8
#: finalize's register limit per thread (``.maxnreg``): without one, ptxas holds the PTX of
#: triton 3.6.0 (the GPU image's) to 64 registers and spills 8 bytes for SB >= 2 with
#: NU_MODE 2; with it, 92 registers and no spill (triton 3.8: 96-118, no spill). 8 warps x 128
#: registers is a quarter of an SM's register file (benchmarks/aot_check.py checks every variant)
FINALIZE_MAXNREG = 128


def gpu_chunk(total_elements: int, sm_count: int) -> int:
    """The chunk size for a parameter list of ``total_elements`` on a GPU with ``sm_count`` SMs."""
    target = max(1, total_elements // max(1, sm_count * CHUNK_PROGRAMS_PER_SM))
    chunk = 1 << max(0, target.bit_length() - 1)  # the power of two <= target
    return min(CHUNK_MAX_GPU, max(CHUNK_MIN_GPU, chunk))


@triton.jit
def _ptr(addr, ty: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 address ``addr`` as a pointer to ``ty`` (16-byte aligned when ``ALIGNED``: the
    hint on the pointer itself is what lets the compiler emit 16-byte vector accesses)."""
    ptr = addr.to(tl.pointer_type(ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_f32(addr, offs, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Load ``addr[offs]`` (``addr``: an int64 address) as float32; 0 where ``mask`` is off.

    ``DT``: the tensor's element type (0 fp32, 1 bf16, 2 fp16), a compile-time constant: a kernel
    launched with ``DT = -1`` (mixed types) dispatches on the tensor's type once per program and
    calls its chunk function with a fixed ``DT`` in each branch (:func:`_stats_kernel`). A type
    branch per load instead broke triton 3.6.0's compiler ("operand does not dominate this use")
    and cost registers.
    """
    tl.static_assert(DT >= 0, "_load_f32 takes a fixed element type (dispatch per program on DT = -1)")
    if DT == 0:
        x = tl.load(_ptr(addr, tl.float32, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    elif DT == 1:
        x = tl.load(_ptr(addr, tl.bfloat16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(_ptr(addr, tl.float16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _chunk_meta(meta_ptr, chunks_ptr):
    """This program's chunk of a multi-tensor launch: (its tensor's row in the meta table, the
    chunk's first element, the address of that row, and the row's g address, r address, numel
    and FLAGS)."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + pid * 2)
    start = tl.load(chunks_ptr + pid * 2 + 1)
    mrow = meta_ptr + row * _MC
    return row, start, mrow, tl.load(mrow + _G_), tl.load(mrow + _R_), tl.load(mrow + _NUMEL), tl.load(mrow + _FLAGS)


@triton.jit
def _stats_block(g_addr, r_addr, p_addr, offs, mask, has_r, want_pp, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """g², r², g·r, p² of one block (r = 0 unless ``has_r``, p = 0 unless ``want_pp``)."""
    g = _load_f32(g_addr, offs, mask, DT, ALIGNED)
    r = _load_f32(r_addr, offs, mask & has_r, DT, ALIGNED)
    p = _load_f32(p_addr, offs, mask & want_pp, DT, ALIGNED)
    return g * g, r * r, g * r, p * p


@triton.jit
def _stats_full(g_addr, r_addr, p_addr, start, n_full, has_r, want_pp, BLOCK: tl.constexpr, DT: tl.constexpr,
                VEC: tl.constexpr):
    """Running sums over the full blocks [start, start + n_full) of a chunk (VEC: the tensor's
    addresses are 16-byte aligned, so its loads may be 16-byte vectors)."""
    acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pp = tl.zeros([BLOCK], dtype=tl.float32)
    full = tl.full([BLOCK], 1, tl.int1)
    for k in range(0, n_full, BLOCK):
        base = start + k
        if VEC:
            base = tl.multiple_of(base, 16)
        offs = base + tl.arange(0, BLOCK)  # int64: tensors over 2^31 elements
        gg, rr, gr, pp = _stats_block(g_addr, r_addr, p_addr, offs, full, has_r, want_pp, DT, VEC)
        acc_gg += gg
        acc_rr += rr
        acc_gr += gr
        acc_pp += pp
    return acc_gg, acc_rr, acc_gr, acc_pp


@triton.jit
def _stats_chunk(g_addr, r_addr, p_addr, start, n_here, numel, flags, has_r, want_pp, BLOCK: tl.constexpr,
                 DT: tl.constexpr, ALIGNED: tl.constexpr):
    """(Σ g², Σ r², Σ g·r, Σ p²) of the ``n_here`` elements of a chunk from ``start``, in the fixed
    element type ``DT``: full blocks without a bounds mask (a uniform mask lets loads vectorise),
    16-byte vector accesses for a tensor whose addresses are aligned (its FLAGS bit), then the tail."""
    n_full = (n_here // BLOCK) * BLOCK
    if ALIGNED:
        if (flags & _F_ALIGNED) != 0:
            acc_gg, acc_rr, acc_gr, acc_pp = _stats_full(g_addr, r_addr, p_addr, start, n_full, has_r, want_pp,
                                                         BLOCK, DT, True)
        else:
            acc_gg, acc_rr, acc_gr, acc_pp = _stats_full(g_addr, r_addr, p_addr, start, n_full, has_r, want_pp,
                                                         BLOCK, DT, False)
    else:
        acc_gg, acc_rr, acc_gr, acc_pp = _stats_full(g_addr, r_addr, p_addr, start, n_full, has_r, want_pp,
                                                     BLOCK, DT, False)
    if n_full < n_here:
        offs = start + n_full + tl.arange(0, BLOCK)
        gg, rr, gr, pp = _stats_block(g_addr, r_addr, p_addr, offs, offs < numel, has_r, want_pp, DT, False)
        acc_gg += gg
        acc_rr += rr
        acc_gr += gr
        acc_pp += pp
    return tl.sum(acc_gg, axis=0), tl.sum(acc_rr, axis=0), tl.sum(acc_gr, axis=0), tl.sum(acc_pp, axis=0)


@triton.jit
def _stats_kernel(
    meta_ptr,       # int64 [P, META_COLS]: per-tensor addresses, sizes and flags (layout.py)
    chunks_ptr,     # int64 [C, 2]: (tensor row, first element) of each chunk = program
    partials_ptr,   # float32 [C, 4] out: (gg, rr, gr, pp) of each chunk
    steps_ptr,      # float32 [P] out: each tensor's step count before this step (COPY_STEPS)
    CHUNK: tl.constexpr,       # elements per chunk (a multiple of BLOCK)
    BLOCK: tl.constexpr,       # elements per inner iteration
    DT: tl.constexpr,          # element type code of every tensor, or -1: per tensor (FLAGS)
    ALIGNED: tl.constexpr,     # some tensor is 16-byte aligned: compile the vector path (FLAGS bit 7 picks it)
    COPY_STEPS: tl.constexpr,  # copy step counts into steps_ptr (SGGAdamW, not GradientGuidance)
):
    pid = tl.program_id(0).to(tl.int64)
    row, start, mrow, g_addr, r_addr, numel, flags = _chunk_meta(meta_ptr, chunks_ptr)
    p_addr = tl.load(mrow + _P_)
    has_r = ((flags >> 2) & 3) != _R_NONE
    want_pp = (flags & _F_PP) != 0

    n_here = tl.minimum(numel - start, CHUNK)  # 0 for the empty chunk of a 0-element tensor
    if DT == -1:  # mixed element types: dispatch on this tensor's type once per program
        code = flags & 3
        if code == 0:
            gg, rr, gr, pp = _stats_chunk(g_addr, r_addr, p_addr, start, n_here, numel, flags, has_r, want_pp,
                                          BLOCK, 0, ALIGNED)
        elif code == 1:
            gg, rr, gr, pp = _stats_chunk(g_addr, r_addr, p_addr, start, n_here, numel, flags, has_r, want_pp,
                                          BLOCK, 1, ALIGNED)
        else:
            gg, rr, gr, pp = _stats_chunk(g_addr, r_addr, p_addr, start, n_here, numel, flags, has_r, want_pp,
                                          BLOCK, 2, ALIGNED)
    else:
        gg, rr, gr, pp = _stats_chunk(g_addr, r_addr, p_addr, start, n_here, numel, flags, has_r, want_pp, BLOCK,
                                      DT, ALIGNED)
    out = partials_ptr + pid * 4
    tl.store(out + 0, gg)
    tl.store(out + 1, rr)
    tl.store(out + 2, gr)
    tl.store(out + 3, pp)
    if COPY_STEPS:
        first = (start == 0) & ((flags & _F_STEP) != 0)
        step_addr = tl.load(mrow + _STEP)
        step = tl.load(step_addr.to(tl.pointer_type(tl.float32)), mask=first, other=0.0)
        tl.store(steps_ptr + row, step, mask=first)


def launch_stats(meta, chunks, partials, steps_old, *, chunk: int, dt: int, aligned: bool,
                 copy_steps: bool) -> None:
    """Launch 1: per-chunk (gg, rr, gr, pp) into ``partials`` [C, 4]; one program per chunk."""
    C = chunks.shape[0]
    if C == 0:
        return
    count_launch("stats")
    _stats_kernel[(C,)](meta, chunks, partials, steps_old, CHUNK=chunk, BLOCK=BLOCK, DT=dt,
                        ALIGNED=aligned, COPY_STEPS=copy_steps, num_warps=NUM_WARPS)


@triton.jit
def _finite(x):
    """|x| <= FLT_MAX: false for ±inf and NaN (NaN compares false)."""
    return tl.abs(x) <= _FLT_MAX


@triton.jit
def _clamp_min(x, lo):
    """torch.clamp_min: NaN stays NaN (tl.maximum would return ``lo``)."""
    return tl.where(x < lo, lo, x)


@triton.jit
def _load_nu(nu_ptr, segs_ptr, sidx, smask, SB: tl.constexpr, NU_MODE: tl.constexpr):
    """(ν, initialised) of segments ``sidx``, and the address of their ν tensor (NU_MODE 2)."""
    nu_addr = tl.zeros([SB], dtype=tl.int64)
    if NU_MODE == 1:
        nu_old = tl.load(nu_ptr + sidx * _NNU + _N_NU, mask=smask, other=0.0)
        nu_flag = tl.load(nu_ptr + sidx * _NNU + _N_INIT, mask=smask, other=0.0)
    elif NU_MODE == 2:
        nu_addr = tl.load(segs_ptr + sidx * _SC + _S_NU, mask=smask, other=0)
        p = nu_addr.to(tl.pointer_type(tl.float32))
        live = smask & (nu_addr != 0)
        nu_old = tl.load(p + _N_NU, mask=live, other=0.0)
        nu_flag = tl.load(p + _N_INIT, mask=live, other=0.0)
    else:
        nu_old = tl.zeros([SB], dtype=tl.float32)
        nu_flag = tl.zeros([SB], dtype=tl.float32)
    return nu_old, nu_flag, nu_addr


@triton.jit(do_not_specialize=["S"])
def _finalize_kernel(
    partials_ptr,   # float32 [C, 4]: per-chunk (gg, rr, gr, pp), segment s owns rows lo..hi-1
    segs_ptr,       # int64 [S, SEG_COLS]: (lo, hi, address of the segment's float32 (ν, init) or 0)
    hyper_ptr,      # float32 [S, len(HYPER_COLS)]: guidance hyper-parameters (guidance.HYPER_COLS)
    nu_ptr,         # float32 [S, 2]: current (ν, initialised) when NU_MODE == 1 (unused otherwise)
    red_ptr,        # float32 [S, 4] out: the summed statistics of each segment
    out_ptr,        # float32 [S, len(OUT_COLS)] out: guidance.finalize's columns
    sync_ptr,       # int32 [SYNC_SLOTS], zero on entry and left zero: (bad flag, ticket)
    S,              # number of segments
    cancel_tol,     # CANCEL_EPS·eps(float32): sin²(g, r) below it is rounding noise (g ∥ r)
    blend_tol,      # BLEND_EPS·eps(float32): ‖w‖² below it disables the direction blend
    SB: tl.constexpr,           # segments per tile
    KB: tl.constexpr,           # partial rows per tile
    NU_MODE: tl.constexpr,      # 0: (ν, init) = (0, 0); 1: from nu_ptr; 2: through segs' addresses,
                                #    written back for relative segments unless the step is skipped
    REDUCE_ONLY: tl.constexpr,  # stop after writing red_ptr (Backend.reduce)
):
    # ---- pass 1: fixed-order segmented sums of this program's tile, and whether any of its
    # segments is non-finite ------------------------------------------------------------------
    any_bad = tl.full([], 0, tl.int32)
    s0 = tl.program_id(0) * SB
    sidx = s0 + tl.arange(0, SB)
    smask = sidx < S
    lo = tl.load(segs_ptr + sidx * _SC + _S_LO, mask=smask, other=0)
    hi = tl.load(segs_ptr + sidx * _SC + _S_HI, mask=smask, other=0)
    n = hi - lo
    maxn = tl.max(n, axis=0)
    t_gg = tl.zeros([SB, KB], dtype=tl.float32)
    t_rr = tl.zeros([SB, KB], dtype=tl.float32)
    t_gr = tl.zeros([SB, KB], dtype=tl.float32)
    t_pp = tl.zeros([SB, KB], dtype=tl.float32)
    for k0 in range(0, maxn, KB):
        kk = k0 + tl.arange(0, KB)
        m2 = smask[:, None] & (kk[None, :] < n[:, None])
        base = partials_ptr + (lo[:, None] + kk[None, :]) * 4
        t_gg += tl.load(base + _GG, mask=m2, other=0.0)
        t_rr += tl.load(base + _RR, mask=m2, other=0.0)
        t_gr += tl.load(base + _GR, mask=m2, other=0.0)
        t_pp += tl.load(base + _PP, mask=m2, other=0.0)
    gg = tl.sum(t_gg, axis=1)
    rr = tl.sum(t_rr, axis=1)
    gr = tl.sum(t_gr, axis=1)
    pp = tl.sum(t_pp, axis=1)
    red = red_ptr + sidx * 4
    tl.store(red + _GG, gg, mask=smask)
    tl.store(red + _RR, rr, mask=smask)
    tl.store(red + _GR, gr, mask=smask)
    tl.store(red + _PP, pp, mask=smask)
    ok = _finite(gg) & _finite(rr) & _finite(gr) & _finite(pp)
    any_bad = any_bad | tl.max((smask & ~ok).to(tl.int32), axis=0)

    if not REDUCE_ONLY:
        # pass 2 reads what pass 1 wrote (other threads of this program): a CTA barrier orders
        # those global-memory accesses.
        tl.debug_barrier()
        # ---- pass 2: guidance.finalize's math per segment of the tile (mirror of
        # guidance.finalize and of finalize_row in csrc/sgg_common.h: the same operations in
        # the same order, IEEE div_rn / sqrt_rn, no FMA contraction) -------------------------
        sidx = s0 + tl.arange(0, SB)
        smask = sidx < S
        red = red_ptr + sidx * 4
        gg = tl.load(red + _GG, mask=smask, other=0.0)
        rr = tl.load(red + _RR, mask=smask, other=0.0)
        gr_raw = tl.load(red + _GR, mask=smask, other=0.0)
        pp = tl.load(red + _PP, mask=smask, other=0.0)
        hrow = hyper_ptr + sidx * _NHYP
        l_dir = tl.load(hrow + _H_LDIR, mask=smask, other=0.0)
        l_mag = tl.load(hrow + _H_LMAG, mask=smask, other=0.0)
        l_align = tl.load(hrow + _H_LALIGN, mask=smask, other=0.0)
        mode = tl.load(hrow + _H_MODE, mask=smask, other=0.0)
        max_norm = tl.load(hrow + _H_MAXNORM, mask=smask, other=1.0)
        ratio = tl.load(hrow + _H_RATIO, mask=smask, other=1.0)
        mbeta = tl.load(hrow + _H_MBETA, mask=smask, other=0.0)
        gr_sign = tl.load(hrow + _H_GRSIGN, mask=smask, other=1.0)
        alpha_sign = tl.load(hrow + _H_ASIGN, mask=smask, other=1.0)
        beta_sign = tl.load(hrow + _H_BSIGN, mask=smask, other=1.0)
        nu_old, nu_flag, nu_addr = _load_nu(nu_ptr, segs_ptr, sidx, smask, SB, NU_MODE)

        gr = gr_sign * gr_raw
        bad_stats = ~(_finite(gg) & _finite(rr) & _finite(gr) & _finite(pp))

        # cosine of g and r, scaled: no ng·nr, no gr/rr
        ng = tl.sqrt_rn(gg)
        nr = tl.sqrt_rn(rr)
        has_r = rr > 0
        both = (gg > 0) & has_r
        kap_raw = tl.div_rn(tl.div_rn(gr, tl.where(both, ng, 1.0)), tl.where(both, nr, 1.0))
        kap_raw = tl.where(kap_raw < -1.0, -1.0, tl.where(kap_raw > 1.0, 1.0, kap_raw))
        kap = tl.where(both, kap_raw, 0.0)
        conflict = gr < 0

        # A. alignment
        l3 = tl.where(both & (kap < 0), l_align, 0.0)
        proj = l3 > 0
        sin2 = (1 - kap) * (1 + kap)
        sin2 = tl.where(sin2 <= cancel_tol, 0.0, sin2)
        t = (1 - l3) * kap
        q = tl.where(proj, sin2 + t * t, 1.0)
        g1_zero = q == 0
        rq = tl.sqrt_rn(q)

        # B. direction consistency
        ok = has_r & (gg > 0) & (q > 0)
        opc1 = tl.where(proj, tl.div_rn(sin2, tl.where(ok, rq * (rq - t), 1.0)), 1 + kap)
        omd = 1 - l_dir
        dd = 1 - 2 * l_dir
        w2 = dd * dd + ((2 * l_dir) * omd) * opc1
        blend = ok & (w2 > blend_tol)
        wn = tl.sqrt_rn(tl.where(blend, w2, 1.0))
        a2 = tl.where(blend, tl.div_rn(omd, wn), 1.0)
        b = tl.where(blend, tl.div_rn(l_dir, wn), 0.0)
        bh = b * rq - a2 * (l3 * kap)
        n2 = ng * rq  # ‖g2‖ = ‖g1‖

        # C. magnitude control
        is_abs = mode == _MAG_ABS
        is_rel = mode == _MAG_REL
        nu_init = nu_flag != 0
        tau_rel = tl.where(nu_init, ratio * nu_old, float("inf"))
        npp = tl.sqrt_rn(pp)
        tau_param = ratio * tl.where(npp < _PARAM_FLOOR, _PARAM_FLOOR, npp)
        tau = tl.where(is_abs, max_norm, tl.where(is_rel, tau_rel, tau_param))
        over = n2 > tau
        s = tl.where(over, (1 - l_mag) + l_mag * tl.div_rn(tl.where(over, tau, 0.0), tl.where(over, n2, 1.0)),
                     1.0)
        n3 = s * n2
        finite_tau = _finite(tau)
        excess = n2 - tl.where(finite_tau, tau, 0.0)
        excess = tl.where(excess < 0, 0.0, excess)
        mag_pen = tl.where(finite_tau, (0.5 * excess) * excess, 0.0)

        alpha = tl.where(g1_zero, 0.0, s * a2) * alpha_sign
        beta = tl.where(g1_zero, 0.0, tl.div_rn(bh * (s * ng), tl.where(has_r, nr, 1.0))) * beta_sign
        bad = bad_stats | ~_finite(alpha) | ~_finite(beta)
        any_bad = any_bad | tl.max((smask & bad).to(tl.int32), axis=0)

        start = _finite(n2) & (n2 > 0)
        nu_rel = tl.where(nu_init, mbeta * nu_old + (1 - mbeta) * n3, tl.where(start, n2, nu_old))
        flag_rel = tl.where(nu_init | start, 1.0, 0.0)

        o = out_ptr + sidx * _NOUT
        tl.store(o + _O_ALPHA, alpha, mask=smask)
        tl.store(o + _O_BETA, beta, mask=smask)
        tl.store(o + _O_NU, tl.where(is_rel, nu_rel, nu_old), mask=smask)
        tl.store(o + _O_NUINIT, tl.where(is_rel, flag_rel, nu_flag), mask=smask)
        tl.store(o + _O_GNORM, ng, mask=smask)
        tl.store(o + _O_RNORM, nr, mask=smask)
        tl.store(o + _O_COS, kap, mask=smask)
        tl.store(o + _O_CONFLICT, conflict.to(tl.float32), mask=smask)
        tl.store(o + _O_UNORM, n3, mask=smask)
        tl.store(o + _O_SCALE, s, mask=smask)
        tl.store(o + _O_DIRPEN, 1 - kap, mask=smask)
        tl.store(o + _O_MAGPEN, mag_pen, mask=smask)
        tl.store(o + _O_BAD, bad.to(tl.float32), mask=smask)

        # ---- the grid's join: OR this tile's flag into the workspace, then take a ticket.
        # The barrier makes every thread's stores of passes 1-2 precede the release of the
        # ticket (acq_rel, GPU scope); the program that draws the last ticket acquires every
        # other program's stores with it. ------------------------------------------------------
        tl.debug_barrier()
        tl.atomic_or(sync_ptr + _SYNC_BAD, any_bad, sem="relaxed")
        ticket = tl.atomic_add(sync_ptr + _SYNC_TICKET, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            tl.debug_barrier()
            # the flag after every program's OR (an atomic read: it bypasses the caches)
            bad_all = tl.atomic_or(sync_ptr + _SYNC_BAD, 0, sem="acquire")
            skip = bad_all != 0
            live = bad_all == 0
            # ---- pass 3 (last program, all tiles): the global skip; ν restored (skipped) or
            # written back (relative). Other programs' rows are read with .cg (L2, not L1). ---
            for t0 in range(0, S, _P3):
                tidx = t0 + tl.arange(0, _P3)
                tmask = tidx < S
                o3 = out_ptr + tidx * _NOUT
                nu_old3, nu_flag3, nu_addr3 = _load_nu(nu_ptr, segs_ptr, tidx, tmask, _P3, NU_MODE)
                tl.store(o3 + _O_NU, nu_old3, mask=tmask & skip)
                tl.store(o3 + _O_NUINIT, nu_flag3, mask=tmask & skip)
                if NU_MODE == 2:
                    mode3 = tl.load(hyper_ptr + tidx * _NHYP + _H_MODE, mask=tmask, other=0.0)
                    wb3 = tmask & live & (mode3 == _MAG_REL) & (nu_addr3 != 0)
                    p3 = nu_addr3.to(tl.pointer_type(tl.float32))
                    tl.store(p3 + _N_NU, tl.load(o3 + _O_NU, mask=wb3, other=0.0, cache_modifier=".cg"), mask=wb3)
                    tl.store(p3 + _N_INIT, tl.load(o3 + _O_NUINIT, mask=wb3, other=0.0, cache_modifier=".cg"),
                             mask=wb3)
                tl.store(o3 + _O_SKIP, tl.where(skip, 1.0, 0.0) + tl.zeros([_P3], dtype=tl.float32), mask=tmask)
            # the workspace back to zero for the next launch (stream order publishes it)
            tl.store(sync_ptr + _SYNC_BAD, 0)
            tl.store(sync_ptr + _SYNC_TICKET, 0)


def finalize_workspace(device) -> torch.Tensor:
    """The zeroed int32 workspace of :func:`launch_finalize` (kept zero between launches)."""
    return torch.zeros(SYNC_SLOTS, dtype=torch.int32, device=device)


def launch_finalize(partials, segs, hyper, nu, red, out, *, nu_mode: int, reduce_only: bool = False,
                    sync=None, max_seg_block: int = MAX_SEG_BLOCK) -> None:
    """Launch 2 (``cdiv(S, SB)`` programs): segment sums into ``red`` [S, 4] and, unless
    ``reduce_only``, guidance.finalize's columns into ``out`` [S, len(OUT_COLS)].

    ``nu_mode`` 0: every (ν, initialised) is (0, 0); 1: read from ``nu`` [S, 2]; 2: read through
    the addresses in ``segs[:, S_NU]`` (each a float32 [2] tensor, ``plan.seg_nus``) and written
    back there for relative segments unless the step is skipped. ``sync``: the workspace of
    :func:`finalize_workspace` on the tensors' device, zero on entry and left zero (a step
    engine keeps one, so no launch is spent zeroing it; None allocates one). Launches that share
    a workspace must run in one stream's order. ``max_seg_block``: the most segments per program
    (a power of two; the tests use large tiles to keep the interpreter fast)."""
    S = segs.shape[0]
    if S == 0:
        return
    if sync is None:
        sync = finalize_workspace(out.device)
    count_launch("reduce" if reduce_only else "finalize")
    sb = min(max_seg_block, triton.next_power_of_2(S))
    grid = (triton.cdiv(S, sb),)
    _finalize_kernel[grid](partials, segs, hyper, nu, red, out, sync, S, _G.CANCEL_EPS * _EPS32,
                           _G.BLEND_EPS * _EPS32, SB=sb, KB=FINALIZE_TILE // sb, NU_MODE=nu_mode,
                           REDUCE_ONLY=reduce_only, num_warps=FINALIZE_WARPS, maxnreg=FINALIZE_MAXNREG,
                           enable_fp_fusion=False)
