// sgg_fast: what the CPU and CUDA implementations share.
//
//  * the column layout of the statistics / hyper-parameter / finalize-output tensors, mirrored
//    from sgg_fast/guidance.py (STAT_COLS, HYPER_COLS, OUT_COLS; a test compares them);
//  * finalize_row(): the scalar math of DESIGN §1 A-C for one segment, written operation by
//    operation in the same order as guidance.finalize() so that both round identically
//    (the extension is compiled with -ffp-contract=off / --fmad=false for that reason);
//  * the chunk counting rule shared with the Python adapter.
//
// This header is plain C++ (and CUDA when compiled by nvcc): no ATen includes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SGG_HD __host__ __device__ __forceinline__
#else
#define SGG_HD inline
#endif

namespace sgg_fast {

// ---- columns (guidance.py) ----------------------------------------------------------------
constexpr int NUM_STATS = 4;  // gg = Σg², rr = Σr², gr = Σg·r, pp = Σp²
constexpr int GG = 0, RR = 1, GR = 2, PP = 3;

constexpr int NUM_HYPER = 7;
constexpr int H_LDIR = 0, H_LMAG = 1, H_LALIGN = 2, H_MODE = 3, H_MAXNORM = 4, H_RATIO = 5,
              H_MBETA = 6;
constexpr int MAG_ABSOLUTE = 0, MAG_RELATIVE = 1, MAG_PARAM = 2;

constexpr int NUM_OUT = 13;
constexpr int O_ALPHA = 0, O_BETA = 1, O_NU = 2, O_GNORM = 3, O_RNORM = 4, O_COS = 5,
              O_CONFLICT = 6, O_UNORM = 7, O_SCALE = 8, O_DIRPEN = 9, O_MAGPEN = 10, O_BAD = 11,
              O_SKIP = 12;

// ---- constants of the math (guidance.py; the names are the same) ---------------------------
constexpr double BLEND_EPS = 1e-12;        // ‖w‖² below this disables the direction blend
constexpr double CANCEL_EPS = 16.0;        // g1g1 <= CANCEL_EPS·eps·gg after λ3 is rounding noise
constexpr double PARAM_NORM_FLOOR = 1e-3;  // floor of √pp in mag_mode="param"

// ---- reference modes (plan.REFERENCES order) -----------------------------------------------
constexpr int REF_MOMENTUM = 0, REF_EMA = 1, REF_SOURCE = 2;

// Number of statistics rows (chunks) of a tensor of n elements: at least one, so that every
// tensor owns a row and every segment at least one (sgg_fast/backends/cpp_backend.py uses the
// same rule to find each segment's rows).
SGG_HD int64_t num_chunks(int64_t n, int64_t chunk) {
  return n <= 0 ? 1 : (n + chunk - 1) / chunk;
}

template <typename T>
SGG_HD bool sgg_isfinite(T x) {
  return std::isfinite(x);
}

// max(x, lo) that propagates NaN like torch.clamp_min
template <typename T>
SGG_HD T clamp_min_nan(T x, T lo) {
  return x < lo ? lo : x;
}

// Finalize one segment: st = (gg, rr, gr, pp), h = its HYPER row, nu = its norm_ema.
// Writes every OUT column except O_SKIP, with O_NU as if the step is not skipped (the caller
// restores nu when any segment is bad). Returns true when the statistics are not finite.
//
// Line by line the same operations, in the same order and precision T, as
// sgg_fast.guidance.finalize (torch.where evaluates both branches; so do we where it matters
// for the result, i.e. nowhere: an unselected NaN never reaches the output).
template <typename T>
SGG_HD bool finalize_row(const T* st, const T* h, T nu, T* out) {
  const T zero = T(0), one = T(1);
  const T inf = std::numeric_limits<T>::infinity();
  const T gg = st[GG], rr = st[RR], gr = st[GR], pp = st[PP];
  const T l_dir = h[H_LDIR], l_mag = h[H_LMAG], l_align = h[H_LALIGN], mode = h[H_MODE];
  const T max_norm = h[H_MAXNORM], ratio = h[H_RATIO], mbeta = h[H_MBETA];

  const bool bad = !(sgg_isfinite(gg) && sgg_isfinite(rr) && sgg_isfinite(gr) && sgg_isfinite(pp));

  // A. alignment
  const bool has_r = rr > zero;
  const bool conflict = gr < zero;
  const T c = (has_r && conflict) ? ((-l_align) * gr) / (has_r ? rr : one) : zero;
  T g1g1 = clamp_min_nan((gg + (T(2) * c) * gr) + (c * c) * rr, zero);
  const T cancel = T(CANCEL_EPS * (double)std::numeric_limits<T>::epsilon());  // a power of 2
  const bool g1_zero = (c != zero) && (g1g1 <= cancel * gg);
  if (g1_zero) g1g1 = zero;
  const T g1r = gr + c * rr;

  // B. direction consistency
  const T n1 = std::sqrt(g1g1);
  const T nr = std::sqrt(rr);
  const bool ok = has_r && (g1g1 > zero);
  const T safe_n1 = ok ? n1 : one;
  const T safe_nr = ok ? nr : one;
  const T cos1 = g1r / (safe_n1 * safe_nr);
  const T a = one - l_dir;
  const T w2 = ((a * a) + (l_dir * l_dir)) + ((T(2) * l_dir) * a) * cos1;
  const bool blend = ok && (w2 > T(BLEND_EPS));
  const T wn = std::sqrt(blend ? w2 : one);
  const T a2 = blend ? a / wn : one;
  const T b2 = blend ? (l_dir * safe_n1) / (safe_nr * wn) : zero;
  const T n2 = n1;

  // C. magnitude control
  const bool is_abs = mode == T(MAG_ABSOLUTE);
  const bool is_rel = mode == T(MAG_RELATIVE);
  const bool nu_init = nu > zero;
  const T tau_rel = nu_init ? ratio * nu : inf;
  const T tau_param = ratio * clamp_min_nan(std::sqrt(pp), T(PARAM_NORM_FLOOR));
  const T tau = is_abs ? max_norm : (is_rel ? tau_rel : tau_param);
  const bool over = n2 > tau;
  const T s = over ? one - l_mag * (one - tau / (over ? n2 : one)) : one;
  const T n3 = s * n2;
  const bool finite_tau = sgg_isfinite(tau);
  const T excess = clamp_min_nan(n2 - (finite_tau ? tau : zero), zero);
  const T mag_pen = finite_tau ? T(0.5) * (excess * excess) : zero;

  const T nu_start = (sgg_isfinite(n2) && (n2 > zero)) ? n2 : nu;
  const T nu_new = is_rel ? (nu_init ? (mbeta * nu) + ((one - mbeta) * n3) : nu_start) : nu;

  const T alpha = g1_zero ? zero : s * a2;
  const T beta = g1_zero ? zero : s * ((a2 * c) + b2);

  const T gnorm = std::sqrt(gg);
  const T den = gnorm * nr;
  const T cosv = den > zero ? gr / (den > zero ? den : one) : zero;

  out[O_ALPHA] = alpha;
  out[O_BETA] = beta;
  out[O_NU] = nu_new;
  out[O_GNORM] = gnorm;
  out[O_RNORM] = nr;
  out[O_COS] = cosv;
  out[O_CONFLICT] = conflict ? one : zero;
  out[O_UNORM] = n3;
  out[O_SCALE] = s;
  out[O_DIRPEN] = one - cosv;
  out[O_MAGPEN] = mag_pen;
  out[O_BAD] = bad ? one : zero;
  return bad;
}

}  // namespace sgg_fast
