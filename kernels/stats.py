"""Statistics and finalize kernels (DESIGN §3, launches 1 and 2 of a step).

Launch 1, :func:`launch_stats`: ONE multi-tensor launch over every tensor of the step. Program
``c`` reads chunk ``c`` (``CHUNK`` elements of one tensor, located through the device-resident
chunk and pointer tables of :mod:`.layout`) and writes its partial sums

    ``partials[c] = (Σ g², Σ r², Σ g·r, Σ p²)``      (fp32 accumulation, fp32/bf16/fp16 inputs)

to its own row: no atomics, so the result does not depend on scheduling. The first chunk of
each tensor also copies the tensor's step count into a scratch buffer, which the apply launch
reads (the apply launch increments the step counts, so it must not read them).

Launch 2, :func:`launch_finalize`: ONE program. Pass 1 sums the partials of each segment
(rows ``lo:hi`` of the partials) in a fixed order — a ``[SB, KB]`` tile of running sums,
reduced along its rows at the end — so results are bitwise reproducible run to run. Pass 2
computes exactly :func:`sgg_fast.guidance.finalize`'s output columns (α, β, ν, the
``last_stats()`` row, ``bad``, and the global ``skipped`` flag), mirroring its formulas
operation by operation (IEEE ``div_rn``/``sqrt_rn``, no FMA contraction).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sgg_fast import guidance as _G

from . import count_launch
from . import layout as L

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
_SC = tl.constexpr(L.SEG_COLS)
_S_LO = tl.constexpr(L.S_LO)
_S_HI = tl.constexpr(L.S_HI)
_S_NU = tl.constexpr(L.S_NU)

_NOUT = tl.constexpr(len(_G.OUT_COLS))
_NHYP = tl.constexpr(len(_G.HYPER_COLS))
_BLEND_EPS = tl.constexpr(_G.BLEND_EPS)
_PARAM_FLOOR = tl.constexpr(_G.PARAM_NORM_FLOOR)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# the finalize kernel reads HYPER_COLS and writes OUT_COLS by position
assert (_G.H_LDIR, _G.H_LMAG, _G.H_LALIGN, _G.H_MODE, _G.H_MAXNORM, _G.H_RATIO, _G.H_MBETA) == tuple(range(7))
assert (_G.O_ALPHA, _G.O_BETA, _G.O_NU, _G.O_GNORM, _G.O_RNORM, _G.O_COS, _G.O_CONFLICT, _G.O_UNORM,
        _G.O_SCALE, _G.O_DIRPEN, _G.O_MAGPEN, _G.O_BAD, _G.O_SKIP) == tuple(range(13))
assert _G.MAG_MODES == {"absolute": 0, "relative": 1, "param": 2}

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
#: that one large segment (granularity="global") reads 2048 partial rows per iteration
FINALIZE_TILE = 2048
MAX_SEG_BLOCK = 16
#: num_warps of the multi-tensor kernels / of the one-program finalize
NUM_WARPS = 4
FINALIZE_WARPS = 8


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
def _load_f32(addr, offs, mask, code, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Load ``addr[offs]`` (``addr``: an int64 address) as float32; 0 where ``mask`` is off.

    ``DT``: the element type of every tensor (0 fp32, 1 bf16, 2 fp16) known at compile time, or
    -1: dispatch on ``code`` (this tensor's type) at run time (a uniform branch per program).
    """
    if DT == 0:
        x = tl.load(_ptr(addr, tl.float32, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    elif DT == 1:
        x = tl.load(_ptr(addr, tl.bfloat16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    elif DT == 2:
        x = tl.load(_ptr(addr, tl.float16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        if code == 0:
            x = tl.load(_ptr(addr, tl.float32, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        elif code == 1:
            x = tl.load(_ptr(addr, tl.bfloat16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(_ptr(addr, tl.float16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _stats_block(g_addr, r_addr, p_addr, offs, mask, has_r, want_pp, code, DT: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """g², r², g·r, p² of one block (r = 0 unless ``has_r``, p = 0 unless ``want_pp``)."""
    g = _load_f32(g_addr, offs, mask, code, DT, ALIGNED)
    r = _load_f32(r_addr, offs, mask & has_r, code, DT, ALIGNED)
    p = _load_f32(p_addr, offs, mask & want_pp, code, DT, ALIGNED)
    return g * g, r * r, g * r, p * p


@triton.jit
def _stats_kernel(
    meta_ptr,       # int64 [P, META_COLS]: per-tensor addresses, sizes and flags (layout.py)
    chunks_ptr,     # int64 [C, 2]: (tensor row, first element) of each chunk = program
    partials_ptr,   # float32 [C, 4] out: (gg, rr, gr, pp) of each chunk
    steps_ptr,      # float32 [P] out: each tensor's step count before this step (COPY_STEPS)
    CHUNK: tl.constexpr,       # elements per chunk (a multiple of BLOCK)
    BLOCK: tl.constexpr,       # elements per inner iteration
    DT: tl.constexpr,          # element type code of every tensor, or -1: per tensor (FLAGS)
    ALIGNED: tl.constexpr,     # every address is 16-byte aligned (lets loads vectorise)
    COPY_STEPS: tl.constexpr,  # copy step counts into steps_ptr (SGGAdamW, not GradientGuidance)
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + pid * 2)
    start = tl.load(chunks_ptr + pid * 2 + 1)
    mrow = meta_ptr + row * _MC
    g_addr = tl.load(mrow + _G_)
    r_addr = tl.load(mrow + _R_)
    p_addr = tl.load(mrow + _P_)
    numel = tl.load(mrow + _NUMEL)
    flags = tl.load(mrow + _FLAGS)
    code = flags & 3
    has_r = ((flags >> 2) & 3) != _R_NONE
    want_pp = (flags & _F_PP) != 0

    acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pp = tl.zeros([BLOCK], dtype=tl.float32)
    n_here = tl.minimum(numel - start, CHUNK)  # 0 for the empty chunk of a 0-element tensor
    n_full = (n_here // BLOCK) * BLOCK
    # full blocks without a bounds mask (a uniform mask lets loads vectorise), then the tail
    full = tl.full([BLOCK], 1, tl.int1)
    for k in range(0, n_full, BLOCK):
        base = start + k
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        offs = base + tl.arange(0, BLOCK)  # int64: tensors over 2^31 elements
        gg, rr, gr, pp = _stats_block(g_addr, r_addr, p_addr, offs, full, has_r, want_pp, code, DT, ALIGNED)
        acc_gg += gg
        acc_rr += rr
        acc_gr += gr
        acc_pp += pp
    if n_full < n_here:
        offs = start + n_full + tl.arange(0, BLOCK)
        gg, rr, gr, pp = _stats_block(g_addr, r_addr, p_addr, offs, offs < numel, has_r, want_pp, code, DT, False)
        acc_gg += gg
        acc_rr += rr
        acc_gr += gr
        acc_pp += pp
    out = partials_ptr + pid * 4
    tl.store(out + 0, tl.sum(acc_gg, axis=0))
    tl.store(out + 1, tl.sum(acc_rr, axis=0))
    tl.store(out + 2, tl.sum(acc_gr, axis=0))
    tl.store(out + 3, tl.sum(acc_pp, axis=0))
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


@triton.jit(do_not_specialize=["S"])
def _finalize_kernel(
    partials_ptr,   # float32 [C, 4]: per-chunk (gg, rr, gr, pp), segment s owns rows lo..hi-1
    segs_ptr,       # int64 [S, SEG_COLS]: (lo, hi, address of the segment's norm_ema or 0)
    hyper_ptr,      # float32 [S, 7]: guidance hyper-parameters (guidance.HYPER_COLS)
    nu_ptr,         # float32 [S]: current norm_ema when NU_MODE == 1 (unused otherwise)
    red_ptr,        # float32 [S, 4] out: the summed statistics of each segment
    out_ptr,        # float32 [S, len(OUT_COLS)] out: guidance.finalize's columns
    S,              # number of segments
    cancel_tol,     # CANCEL_EPS * eps(float32): the λ3 cancellation guard's relative threshold
    SB: tl.constexpr,           # segments per tile
    KB: tl.constexpr,           # partial rows per tile
    NU_MODE: tl.constexpr,      # 0: ν = 0; 1: ν from nu_ptr; 2: ν read through segs' addresses
    REDUCE_ONLY: tl.constexpr,  # stop after writing red_ptr (Backend.reduce)
):
    # ---- pass 1: fixed-order segmented sums, and whether any segment is non-finite ----------
    any_bad = tl.full([], 0, tl.int32)
    for s0 in range(0, S, SB):
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
            t_gg += tl.load(base + 0, mask=m2, other=0.0)
            t_rr += tl.load(base + 1, mask=m2, other=0.0)
            t_gr += tl.load(base + 2, mask=m2, other=0.0)
            t_pp += tl.load(base + 3, mask=m2, other=0.0)
        gg = tl.sum(t_gg, axis=1)
        rr = tl.sum(t_rr, axis=1)
        gr = tl.sum(t_gr, axis=1)
        pp = tl.sum(t_pp, axis=1)
        red = red_ptr + sidx * 4
        tl.store(red + 0, gg, mask=smask)
        tl.store(red + 1, rr, mask=smask)
        tl.store(red + 2, gr, mask=smask)
        tl.store(red + 3, pp, mask=smask)
        ok = _finite(gg) & _finite(rr) & _finite(gr) & _finite(pp)
        any_bad = any_bad | tl.max((smask & ~ok).to(tl.int32), axis=0)

    if not REDUCE_ONLY:
        # pass 2 reads what pass 1 wrote (other threads of this one program): a CTA barrier
        # orders those global-memory accesses.
        tl.debug_barrier()
        skip = any_bad != 0
        for s0 in range(0, S, SB):
            sidx = s0 + tl.arange(0, SB)
            smask = sidx < S
            red = red_ptr + sidx * 4
            gg = tl.load(red + 0, mask=smask, other=0.0)
            rr = tl.load(red + 1, mask=smask, other=0.0)
            gr = tl.load(red + 2, mask=smask, other=0.0)
            pp = tl.load(red + 3, mask=smask, other=0.0)
            hrow = hyper_ptr + sidx * _NHYP
            l_dir = tl.load(hrow + 0, mask=smask, other=0.0)
            l_mag = tl.load(hrow + 1, mask=smask, other=0.0)
            l_align = tl.load(hrow + 2, mask=smask, other=0.0)
            mode = tl.load(hrow + 3, mask=smask, other=0.0)
            max_norm = tl.load(hrow + 4, mask=smask, other=1.0)
            ratio = tl.load(hrow + 5, mask=smask, other=1.0)
            mbeta = tl.load(hrow + 6, mask=smask, other=0.0)
            if NU_MODE == 1:
                nu = tl.load(nu_ptr + sidx, mask=smask, other=0.0)
            elif NU_MODE == 2:
                nu_addr = tl.load(segs_ptr + sidx * _SC + _S_NU, mask=smask, other=0)
                nu = tl.load(nu_addr.to(tl.pointer_type(tl.float32)), mask=smask & (nu_addr != 0), other=0.0)
            else:
                nu = tl.zeros([SB], dtype=tl.float32)

            bad = ~(_finite(gg) & _finite(rr) & _finite(gr) & _finite(pp))

            # A. alignment
            has_r = rr > 0
            conflict = gr < 0
            c = tl.where(has_r & conflict, tl.div_rn(-l_align * gr, tl.where(has_r, rr, 1.0)), 0.0)
            g1g1 = _clamp_min(gg + 2 * c * gr + c * c * rr, 0.0)
            g1_zero = (c != 0) & (g1g1 <= cancel_tol * gg)
            g1g1 = tl.where(g1_zero, 0.0, g1g1)
            g1r = gr + c * rr

            # B. direction consistency
            n1 = tl.sqrt_rn(g1g1)
            nr = tl.sqrt_rn(rr)
            ok = has_r & (g1g1 > 0)
            safe_n1 = tl.where(ok, n1, 1.0)
            safe_nr = tl.where(ok, nr, 1.0)
            cos1 = tl.div_rn(g1r, safe_n1 * safe_nr)
            omd = 1 - l_dir
            w2 = omd * omd + l_dir * l_dir + 2 * l_dir * omd * cos1
            blend = ok & (w2 > _BLEND_EPS)
            wn = tl.sqrt_rn(tl.where(blend, w2, 1.0))
            a2 = tl.where(blend, tl.div_rn(omd, wn), 1.0)
            b2 = tl.where(blend, tl.div_rn(l_dir * safe_n1, safe_nr * wn), 0.0)
            n2 = n1

            # C. magnitude control
            is_abs = mode == 0
            is_rel = mode == 1
            nu_init = nu > 0
            tau_rel = tl.where(nu_init, ratio * nu, float("inf"))
            tau_param = ratio * _clamp_min(tl.sqrt_rn(pp), _PARAM_FLOOR)
            tau = tl.where(is_abs, max_norm, tl.where(is_rel, tau_rel, tau_param))
            over = n2 > tau
            # (guarding tau too changes no selected value and keeps ∞·0 out of the unselected one)
            s = tl.where(over, 1 - l_mag * (1 - tl.div_rn(tl.where(over, tau, 0.0), tl.where(over, n2, 1.0))), 1.0)
            n3 = s * n2
            finite_tau = _finite(tau)
            excess = _clamp_min(n2 - tl.where(finite_tau, tau, 0.0), 0.0)
            mag_pen = tl.where(finite_tau, 0.5 * (excess * excess), 0.0)

            nu_start = tl.where(_finite(n2) & (n2 > 0), n2, nu)
            nu_new = tl.where(is_rel, tl.where(nu_init, mbeta * nu + (1 - mbeta) * n3, nu_start), nu)
            nu_new = tl.where(skip, nu, nu_new)

            alpha = tl.where(g1_zero, 0.0, s * a2)
            beta = tl.where(g1_zero, 0.0, s * (a2 * c + b2))

            gnorm = tl.sqrt_rn(gg)
            den = gnorm * nr
            cos = tl.where(den > 0, tl.div_rn(gr, tl.where(den > 0, den, 1.0)), 0.0)

            o = out_ptr + sidx * _NOUT
            tl.store(o + 0, alpha, mask=smask)
            tl.store(o + 1, beta, mask=smask)
            tl.store(o + 2, nu_new, mask=smask)
            tl.store(o + 3, gnorm, mask=smask)
            tl.store(o + 4, nr, mask=smask)
            tl.store(o + 5, cos, mask=smask)
            tl.store(o + 6, conflict.to(tl.float32), mask=smask)
            tl.store(o + 7, n3, mask=smask)
            tl.store(o + 8, s, mask=smask)
            tl.store(o + 9, 1 - cos, mask=smask)
            tl.store(o + 10, mag_pen, mask=smask)
            tl.store(o + 11, bad.to(tl.float32), mask=smask)
            tl.store(o + 12, tl.where(skip, 1.0, 0.0) + tl.zeros([SB], dtype=tl.float32), mask=smask)


def launch_finalize(partials, segs, hyper, nu, red, out, *, nu_mode: int, reduce_only: bool = False) -> None:
    """Launch 2 (one program): segment sums into ``red`` [S, 4] and, unless ``reduce_only``,
    guidance.finalize's columns into ``out`` [S, len(OUT_COLS)]."""
    S = segs.shape[0]
    if S == 0:
        return
    count_launch("reduce" if reduce_only else "finalize")
    cancel_tol = _G.CANCEL_EPS * 1.1920928955078125e-07  # torch.finfo(torch.float32).eps
    sb = min(MAX_SEG_BLOCK, triton.next_power_of_2(S))
    _finalize_kernel[(1,)](partials, segs, hyper, nu, red, out, S, cancel_tol,
                           SB=sb, KB=FINALIZE_TILE // sb, NU_MODE=nu_mode, REDUCE_ONLY=reduce_only,
                           num_warps=FINALIZE_WARPS, enable_fp_fusion=False)
