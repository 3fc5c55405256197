// sgg_fast: what the CPU and CUDA implementations share.
//
//  * the column layout of the statistics / hyper-parameter / finalize-output / ν tensors,
//    mirrored from sgg_fast/guidance.py (STAT_COLS, HYPER_COLS, OUT_COLS, NU_COLS; a test
//    compares them);
//  * finalize_row(): the scalar math of DESIGN §1 A-C for one segment, written operation by
//    operation in the same order as guidance.finalize() and the Triton _finalize_kernel
//    (kernels/stats.py) so that all three round identically (the C++ code is compiled with
//    -ffp-contract=off; in CUDA code the products that feed an addition are mul_nc, which nvcc
//    never contracts into an FMA, so the rest of the CUDA code may use FMA);
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

constexpr int NUM_HYPER = 10;
constexpr int H_LDIR = 0, H_LMAG = 1, H_LALIGN = 2, H_MODE = 3, H_MAXNORM = 4, H_RATIO = 5,
              H_MBETA = 6, H_GRSIGN = 7, H_ASIGN = 8, H_BSIGN = 9;
constexpr int MAG_ABSOLUTE = 0, MAG_RELATIVE = 1, MAG_PARAM = 2;

constexpr int NUM_OUT = 14;
constexpr int O_ALPHA = 0, O_BETA = 1, O_NU = 2, O_NUINIT = 3, O_GNORM = 4, O_RNORM = 5, O_COS = 6,
              O_CONFLICT = 7, O_UNORM = 8, O_SCALE = 9, O_DIRPEN = 10, O_MAGPEN = 11, O_BAD = 12,
              O_SKIP = 13;

// the per-segment ν state (guidance.NU_COLS): a float32 [2] tensor (ν, initialised 0/1)
constexpr int NUM_NU = 2;
constexpr int N_NU = 0, N_INIT = 1;

// ---- constants of the math (guidance.py; the names are the same) ---------------------------
constexpr double BLEND_EPS = 16.0;         // ‖w‖² <= BLEND_EPS·eps disables the direction blend
constexpr double CANCEL_EPS = 16.0;        // sin²(g, r) <= CANCEL_EPS·eps is rounding noise: g ∥ r
constexpr double PARAM_NORM_FLOOR = 1e-3;  // floor of √pp in mag_mode="param"

// ---- reference modes (plan.REFERENCES order) -----------------------------------------------
constexpr int REF_MOMENTUM = 0, REF_EMA = 1, REF_SOURCE = 2;

// Number of statistics rows (chunks) of a tensor of n elements: at least one, so that every
// tensor owns a row and every segment at least one (sgg_fast/backends/cpp_backend.py uses the
// same rule to find each segment's rows).
SGG_HD int64_t num_chunks(int64_t n, int64_t chunk) { return n <= 0 ? 1 : (n + chunk - 1) / chunk; }

template <typename T>
SGG_HD bool sgg_isfinite(T x) {
  return std::isfinite(x);
}

// a·b rounded on its own: never contracted with a following addition into an FMA (CUDA:
// __fmul_rn/__dmul_rn, which nvcc does not fuse; C++: -ffp-contract=off already forbids it)
SGG_HD float mul_nc(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SGG_HD double mul_nc(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// max(x, lo) that propagates NaN like torch.clamp_min
template <typename T>
SGG_HD T clamp_min_nan(T x, T lo) {
  return x < lo ? lo : x;
}

// Finalize one segment: st = (gg, rr, gr, pp), h = its HYPER row, nu = its (ν, initialised).
// Writes every OUT column except O_SKIP, with O_NU / O_NUINIT as if the step is not skipped (the
// caller restores them when any segment is bad). Returns true when the segment is bad: its
// statistics, or α or β, are not finite.
//
// The math and its scaled form: the docstring of sgg_fast/guidance.py. Mirrors:
// guidance.finalize (torch) and _finalize_kernel (kernels/stats.py, Triton): line by line the
// same operations in the same order and precision T (IEEE sqrt and division, no FMA
// contraction: every product that feeds an addition is mul_nc), so that all three round
// identically.
// (torch.where evaluates both branches; an unselected NaN never reaches the output, so the
// ternaries below select the same values.)
template <typename T>
SGG_HD bool finalize_row(const T* st, const T* h, const T* nu, T* out) {
  const T zero = T(0), one = T(1);
  const T inf = std::numeric_limits<T>::infinity();
  const T eps = std::numeric_limits<T>::epsilon();
  const T gg = st[GG], rr = st[RR], gr_raw = st[GR], pp = st[PP];
  const T l_dir = h[H_LDIR], l_mag = h[H_LMAG], l_align = h[H_LALIGN], mode = h[H_MODE];
  const T max_norm = h[H_MAXNORM], ratio = h[H_RATIO], mbeta = h[H_MBETA];
  const T gr_sign = h[H_GRSIGN], alpha_sign = h[H_ASIGN], beta_sign = h[H_BSIGN];
  const T nu_old = nu[N_NU], nu_flag = nu[N_INIT];

  const T gr = gr_sign * gr_raw;
  const bool bad_stats =
      !(sgg_isfinite(gg) && sgg_isfinite(rr) && sgg_isfinite(gr) && sgg_isfinite(pp));

  // cosine of g and r, scaled: no ng·nr, no gr/rr
  const T ng = std::sqrt(gg);
  const T nr = std::sqrt(rr);
  const bool has_r = rr > zero;
  const bool both = (gg > zero) && has_r;
  T kap_raw = (gr / (both ? ng : one)) / (both ? nr : one);
  kap_raw = kap_raw < -one ? -one : (kap_raw > one ? one : kap_raw);
  const T kap = both ? kap_raw : zero;
  const bool conflict = gr < zero;

  // A. alignment
  const T l3 = (both && (kap < zero)) ? l_align : zero;
  const bool proj = l3 > zero;
  T sin2 = mul_nc(one - kap, one + kap);
  sin2 = sin2 <= T(CANCEL_EPS) * eps ? zero : sin2;
  const T t = mul_nc(one - l3, kap);
  const T q = proj ? sin2 + mul_nc(t, t) : one;
  const bool g1_zero = q == zero;
  const T rq = std::sqrt(q);

  // B. direction consistency
  const bool ok = has_r && (gg > zero) && (q > zero);
  const T opc1 = proj ? sin2 / (ok ? rq * (rq - t) : one) : one + kap;
  const T omd = one - l_dir;
  const T dd = one - mul_nc(T(2), l_dir);
  const T w2 = mul_nc(dd, dd) + mul_nc((T(2) * l_dir) * omd, opc1);
  const bool blend = ok && (w2 > T(BLEND_EPS) * eps);
  const T wn = std::sqrt(blend ? w2 : one);
  const T a2 = blend ? omd / wn : one;
  const T b = blend ? l_dir / wn : zero;
  const T bh = mul_nc(b, rq) - mul_nc(a2, l3 * kap);
  const T n2 = mul_nc(ng, rq);  // ‖g2‖ = ‖g1‖

  // C. magnitude control
  const bool is_abs = mode == T(MAG_ABSOLUTE);
  const bool is_rel = mode == T(MAG_RELATIVE);
  const bool nu_init = nu_flag != zero;
  const T tau_rel = nu_init ? ratio * nu_old : inf;
  const T npp = std::sqrt(pp);
  const T tau_param = ratio * (npp < T(PARAM_NORM_FLOOR) ? T(PARAM_NORM_FLOOR) : npp);
  const T tau = is_abs ? max_norm : (is_rel ? tau_rel : tau_param);
  const bool over = n2 > tau;
  const T s = over ? (one - l_mag) + mul_nc(l_mag, (over ? tau : zero) / (over ? n2 : one)) : one;
  const T n3 = s * n2;
  const bool finite_tau = sgg_isfinite(tau);
  T excess = n2 - (finite_tau ? tau : zero);
  excess = excess < zero ? zero : excess;
  const T mag_pen = finite_tau ? (T(0.5) * excess) * excess : zero;

  const T alpha = (g1_zero ? zero : s * a2) * alpha_sign;
  const T beta = (g1_zero ? zero : (bh * (s * ng)) / (has_r ? nr : one)) * beta_sign;
  const bool bad = bad_stats || !sgg_isfinite(alpha) || !sgg_isfinite(beta);

  const bool start = sgg_isfinite(n2) && (n2 > zero);
  const T nu_rel =
      nu_init ? mul_nc(mbeta, nu_old) + mul_nc(one - mbeta, n3) : (start ? n2 : nu_old);
  const T flag_rel = (nu_init || start) ? one : zero;

  out[O_ALPHA] = alpha;
  out[O_BETA] = beta;
  out[O_NU] = is_rel ? nu_rel : nu_old;
  out[O_NUINIT] = is_rel ? flag_rel : nu_flag;
  out[O_GNORM] = ng;
  out[O_RNORM] = nr;
  out[O_COS] = kap;
  out[O_CONFLICT] = conflict ? one : zero;
  out[O_UNORM] = n3;
  out[O_SCALE] = s;
  out[O_DIRPEN] = one - kap;
  out[O_MAGPEN] = mag_pen;
  out[O_BAD] = bad ? one : zero;
  return bad;
}

}  // namespace sgg_fast
