// The CPU kernels, written once with at::vec::Vectorized<float> and compiled once per
// instruction set. Include this header from a translation unit that first defines
//   SGG_ISA_NAME   the function suffix and namespace (default / avx2 / avx512)
// and, for the x86 variants, `#pragma GCC target(...)`, CPU_CAPABILITY and CPU_CAPABILITY_<ISA>
// (as ATen's own per-capability kernels do; at::vec then puts its types in a namespace of that
// name, so the variants do not collide).
//
// Every kernel: load → upcast to fp32 → compute in fp32 registers → round once → store.
// One pass over memory per kernel; the guided gradient u never leaves registers.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../sgg_common.h"
#include "kernels.h"

#define SGG_CAT_(a, b) a##b
#define SGG_CAT(a, b) SGG_CAT_(a, b)

namespace sgg_fast {
namespace cpu {
namespace SGG_ISA_NAME {

using Vec = at::vec::Vectorized<float>;
// Every loop step handles 2·W elements: one Vectorized<BFloat16/Half> holds exactly that many,
// so all dtypes share one loop shape.
constexpr int64_t W = Vec::size();
constexpr int64_t W2 = 2 * W;

// ---- load / store two fp32 vectors (2·W elements) from a tensor of dtype T -------------------
template <typename T>
struct IO {  // BFloat16 / Half
  using VT = at::vec::Vectorized<T>;
  static_assert(VT::size() == W2, "reduced-precision vector must hold 2·W elements");
  static inline void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p));
  }
  static inline void load_n(const T* p, int64_t n, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p, n));
  }
  static inline void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static inline void store_n(T* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
};

template <>
struct IO<float> {
  static inline void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + W);
  }
  static inline void load_n(const float* p, int64_t n, Vec& a, Vec& b) {
    a = Vec::loadu(p, std::min<int64_t>(n, W));
    b = n > W ? Vec::loadu(p + W, n - W) : Vec(0.f);
  }
  static inline void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + W);
  }
  static inline void store_n(float* p, int64_t n, const Vec& a, const Vec& b) {
    a.store(p, std::min<int64_t>(n, W));
    if (n > W) b.store(p + W, n - W);
  }
};

// Sum the lanes of a vector in a fixed order (lane 0 first), in double.
inline double lanes_sum(const Vec& v) {
  alignas(64) float buf[W];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < W; ++i) s += buf[i];
  return s;
}

// Software prefetch distance of the statistics pass. With only two read streams (g, r) one
// core leaves DRAM bandwidth unused (too few misses in flight for the hardware prefetcher).
// Measured on one thread, 16.8 M fp32 elements, against a same-run torch.sum over the same bytes:
// on a 2-core Xeon (SPR) 512 bytes ahead halved the pass's time (20 → 10 ms; 256-2048 alike);
// on a 2-core AMD EPYC (4 accumulators) 2048 bytes reached 0.89-1.02 of the read baseline
// (best of 40), 512 bytes 0.85-0.91 and 4096 bytes 0.85-0.92. The apply pass (4-5 streams)
// showed no gain from it and has none.
constexpr int64_t kPrefetchBytes = 2048;

// Prefetch the cache lines of the 4·W-element block (one main-loop step of the statistics
// pass) kPrefetchBytes ahead of x + i (a prefetch past the end of the tensor is harmless: it
// cannot fault).
template <typename T>
inline void prefetch_ahead(const T* x, int64_t i) {
  const char* a = reinterpret_cast<const char*>(x + i) + kPrefetchBytes;
  for (int64_t o = 0; o < 4 * W * int64_t(sizeof(T)); o += 64) __builtin_prefetch(a + o);
}

// ---- statistics -------------------------------------------------------------------------------
// Four independent accumulators per statistic (acc[0..3], each a W-lane fp32 vector): the main
// loop takes 4·W elements per step, element j of the chunk goes to lane j mod W of accumulator
// (j / W) mod 4, so each accumulator's add chain is a quarter of the chunk's length and four
// loads per stream are in flight. A remaining 2·W block and the masked tail go to acc[0] and
// acc[1]. Each lane sums at most ceil(chunk / (4·W)) + 2 products in fp32 (chunk = 32 Ki: ≤ 514
// for W = 16, ≤ 1026 for W = 8); the 4·W lanes are then summed in double in a fixed order
// (accumulator 0 lane 0 first), and chunks are summed in double by sgg_finalize in index
// order: the result depends only on the chunk's elements, not on the thread count.
constexpr int kAcc = 4;
constexpr int64_t W4 = kAcc * W;

struct Acc {
  Vec v[kAcc];
  Acc() {
    for (int a = 0; a < kAcc; ++a) v[a] = Vec(0.f);
  }
  double sum() const {
    double s = 0.0;
    for (int a = 0; a < kAcc; ++a) s += lanes_sum(v[a]);
    return s;
  }
};

template <typename T, bool HAS_R, bool HAS_P>
void stats_t(const StatsTask& t, int64_t begin, int64_t end, float* out) {
  const T* g = static_cast<const T*>(t.g) + begin;
  const T* r = HAS_R ? static_cast<const T*>(t.r) + begin : nullptr;
  const T* p = HAS_P ? static_cast<const T*>(t.p) + begin : nullptr;
  const int64_t n = end - begin;
  Acc gg, rr, gr, pp;
  Vec ga, gb, ra, rb, pa, pb;
  // one 2·W block at x + i into accumulators a0, a0 + 1
  auto block = [&](int64_t i, int a0, bool full, int64_t k) {
    if (full) {
      IO<T>::load(g + i, ga, gb);
    } else {
      IO<T>::load_n(g + i, k, ga, gb);
    }
    gg.v[a0] = gg.v[a0] + ga * ga;
    gg.v[a0 + 1] = gg.v[a0 + 1] + gb * gb;
    if (HAS_R) {
      if (full) {
        IO<T>::load(r + i, ra, rb);
      } else {
        IO<T>::load_n(r + i, k, ra, rb);
      }
      rr.v[a0] = rr.v[a0] + ra * ra;
      rr.v[a0 + 1] = rr.v[a0 + 1] + rb * rb;
      gr.v[a0] = gr.v[a0] + ga * ra;
      gr.v[a0 + 1] = gr.v[a0 + 1] + gb * rb;
    }
    if (HAS_P) {
      if (full) {
        IO<T>::load(p + i, pa, pb);
      } else {
        IO<T>::load_n(p + i, k, pa, pb);
      }
      pp.v[a0] = pp.v[a0] + pa * pa;
      pp.v[a0 + 1] = pp.v[a0 + 1] + pb * pb;
    }
  };
  int64_t i = 0;
  for (; i + W4 <= n; i += W4) {
    prefetch_ahead(g, i);
    if (HAS_R) prefetch_ahead(r, i);
    if (HAS_P) prefetch_ahead(p, i);
    block(i, 0, true, W2);
    block(i + W2, 2, true, W2);
  }
  if (i + W2 <= n) {
    block(i, 0, true, W2);
    i += W2;
  }
  if (i < n) block(i, 0, false, n - i);  // masked loads fill the missing lanes with zeros
  out[GG] = static_cast<float>(gg.sum());
  out[RR] = static_cast<float>(rr.sum());
  out[GR] = static_cast<float>(gr.sum());
  out[PP] = static_cast<float>(pp.sum());
}

template <typename T>
void stats_dt(const StatsTask& t, int64_t begin, int64_t end, float* out) {
  if (t.r && t.p) return stats_t<T, true, true>(t, begin, end, out);
  if (t.r) return stats_t<T, true, false>(t, begin, end, out);
  if (t.p) return stats_t<T, false, true>(t, begin, end, out);
  return stats_t<T, false, false>(t, begin, end, out);
}

void stats(const StatsTask& t, int64_t begin, int64_t end, float* out) {
  switch (t.dtype) {
    case DT_F32:
      return stats_dt<float>(t, begin, end, out);
    case DT_BF16:
      return stats_dt<c10::BFloat16>(t, begin, end, out);
    case DT_F16:
      return stats_dt<c10::Half>(t, begin, end, out);
  }
}

// ---- AdamW on the guided gradient ------------------------------------------------------------
struct ApplyVecs {
  Vec alpha, beta, decay, step_size, bc2_sqrt, eps, b1, omb1, b2, omb2, rbeta, omrb;
  explicit ApplyVecs(const ApplyTask& t)
      : alpha(t.alpha),
        beta(t.beta),
        decay(t.decay),
        step_size(t.step_size),
        bc2_sqrt(t.bc2_sqrt),
        eps(t.eps),
        b1(t.beta1),
        omb1(t.one_minus_beta1),
        b2(t.beta2),
        omb2(t.one_minus_beta2),
        rbeta(t.ref_beta),
        omrb(t.one_minus_ref_beta) {}
};

// One 2·W block of elements, in registers:
//   r = m (momentum) or the reference;  u = α·g + β·r
//   ema:  r ← ref_beta·r + (1 - ref_beta)·g          (raw g; after u is formed)
//   m ← β1·m + (1-β1)·u;   v ← β2·v + (1-β2)·u²
//   p ← p·(1 - lr·wd);     p ← p - step_size · m / (√v / √(1-β2^t) + eps)
//   amsgrad: vm ← max(vm, v) (NaN-propagating, like torch.maximum) and vm replaces v in the
//   denominator
template <int MODE, bool AMS>
inline void adamw_vec(const ApplyVecs& k, const Vec& g, Vec& r, Vec& m, Vec& v, Vec& vm, Vec& p) {
  const Vec rr = MODE == REF_MOMENTUM ? m : r;
  const Vec u = k.alpha * g + k.beta * rr;
  if (MODE == REF_EMA) r = k.rbeta * r + k.omrb * g;
  m = k.b1 * m + k.omb1 * u;
  v = k.b2 * v + k.omb2 * (u * u);
  if (AMS) vm = at::vec::maximum(vm, v);
  p = p * k.decay;
  p = p - (k.step_size * m) / ((AMS ? vm : v).sqrt() / k.bc2_sqrt + k.eps);
}

template <typename T, int MODE, bool AMS>
void apply_t(const ApplyTask& t, int64_t begin, int64_t end) {
  T* P = static_cast<T*>(t.p) + begin;
  const T* G = static_cast<const T*>(t.g) + begin;
  T* M = static_cast<T*>(t.m) + begin;
  T* V = static_cast<T*>(t.v) + begin;
  T* R = MODE == REF_MOMENTUM ? nullptr : static_cast<T*>(t.r) + begin;
  T* VM = AMS ? static_cast<T*>(t.vmax) + begin : nullptr;
  const ApplyVecs k(t);
  const int64_t n = end - begin;
  Vec g0, g1, r0(0.f), r1(0.f), m0, m1, v0, v1, vm0(0.f), vm1(0.f), p0, p1;
  int64_t i = 0;
  for (; i + W2 <= n; i += W2) {
    IO<T>::load(G + i, g0, g1);
    IO<T>::load(M + i, m0, m1);
    IO<T>::load(V + i, v0, v1);
    IO<T>::load(P + i, p0, p1);
    if (MODE != REF_MOMENTUM) IO<T>::load(R + i, r0, r1);
    if (AMS) IO<T>::load(VM + i, vm0, vm1);
    adamw_vec<MODE, AMS>(k, g0, r0, m0, v0, vm0, p0);
    adamw_vec<MODE, AMS>(k, g1, r1, m1, v1, vm1, p1);
    if (MODE == REF_EMA) IO<T>::store(R + i, r0, r1);
    if (AMS) IO<T>::store(VM + i, vm0, vm1);
    IO<T>::store(M + i, m0, m1);
    IO<T>::store(V + i, v0, v1);
    IO<T>::store(P + i, p0, p1);
  }
  if (i < n) {
    const int64_t c = n - i;
    IO<T>::load_n(G + i, c, g0, g1);
    IO<T>::load_n(M + i, c, m0, m1);
    IO<T>::load_n(V + i, c, v0, v1);
    IO<T>::load_n(P + i, c, p0, p1);
    if (MODE != REF_MOMENTUM) IO<T>::load_n(R + i, c, r0, r1);
    if (AMS) IO<T>::load_n(VM + i, c, vm0, vm1);
    adamw_vec<MODE, AMS>(k, g0, r0, m0, v0, vm0, p0);
    adamw_vec<MODE, AMS>(k, g1, r1, m1, v1, vm1, p1);
    if (MODE == REF_EMA) IO<T>::store_n(R + i, c, r0, r1);
    if (AMS) IO<T>::store_n(VM + i, c, vm0, vm1);
    IO<T>::store_n(M + i, c, m0, m1);
    IO<T>::store_n(V + i, c, v0, v1);
    IO<T>::store_n(P + i, c, p0, p1);
  }
}

template <typename T, bool AMS>
void apply_mode(const ApplyTask& t, int64_t begin, int64_t end) {
  switch (t.ref_mode) {
    case REF_MOMENTUM:
      return apply_t<T, REF_MOMENTUM, AMS>(t, begin, end);
    case REF_EMA:
      return apply_t<T, REF_EMA, AMS>(t, begin, end);
    default:
      return apply_t<T, REF_SOURCE, AMS>(t, begin, end);
  }
}

template <typename T>
void apply_dt(const ApplyTask& t, int64_t begin, int64_t end) {
  if (t.vmax) return apply_mode<T, true>(t, begin, end);
  return apply_mode<T, false>(t, begin, end);
}

void apply(const ApplyTask& t, int64_t begin, int64_t end) {
  switch (t.dtype) {
    case DT_F32:
      return apply_dt<float>(t, begin, end);
    case DT_BF16:
      return apply_dt<c10::BFloat16>(t, begin, end);
    case DT_F16:
      return apply_dt<c10::Half>(t, begin, end);
  }
}

// ---- GradientGuidance: g ← α·g + β·r in place ------------------------------------------------
template <typename T, bool HAS_R, bool EMA>
void guide_t(const GuideTask& t, int64_t begin, int64_t end) {
  T* G = static_cast<T*>(t.g) + begin;
  T* R = HAS_R ? static_cast<T*>(t.r) + begin : nullptr;
  const Vec alpha(t.alpha), beta(t.beta), rbeta(t.ref_beta), omrb(t.one_minus_ref_beta);
  const int64_t n = end - begin;
  Vec g0, g1, r0(0.f), r1(0.f);
  auto step = [&](Vec& g, Vec& r) {
    const Vec u = HAS_R ? alpha * g + beta * r : alpha * g;
    if (EMA) r = rbeta * r + omrb * g;
    g = u;
  };
  int64_t i = 0;
  for (; i + W2 <= n; i += W2) {
    IO<T>::load(G + i, g0, g1);
    if (HAS_R) IO<T>::load(R + i, r0, r1);
    step(g0, r0);
    step(g1, r1);
    if (EMA) IO<T>::store(R + i, r0, r1);
    IO<T>::store(G + i, g0, g1);
  }
  if (i < n) {
    const int64_t c = n - i;
    IO<T>::load_n(G + i, c, g0, g1);
    if (HAS_R) IO<T>::load_n(R + i, c, r0, r1);
    step(g0, r0);
    step(g1, r1);
    if (EMA) IO<T>::store_n(R + i, c, r0, r1);
    IO<T>::store_n(G + i, c, g0, g1);
  }
}

template <typename T>
void guide_dt(const GuideTask& t, int64_t begin, int64_t end) {
  if (!t.r) return guide_t<T, false, false>(t, begin, end);
  if (t.ref_mode == REF_EMA) return guide_t<T, true, true>(t, begin, end);
  return guide_t<T, true, false>(t, begin, end);
}

void guide(const GuideTask& t, int64_t begin, int64_t end) {
  switch (t.dtype) {
    case DT_F32:
      return guide_dt<float>(t, begin, end);
    case DT_BF16:
      return guide_dt<c10::BFloat16>(t, begin, end);
    case DT_F16:
      return guide_dt<c10::Half>(t, begin, end);
  }
}

}  // namespace SGG_ISA_NAME

Kernels SGG_CAT(kernels_, SGG_ISA_NAME)() {
  return Kernels{&SGG_ISA_NAME::stats, &SGG_ISA_NAME::apply, &SGG_ISA_NAME::guide, SGG_ISA_STRING};
}

}  // namespace cpu
}  // namespace sgg_fast
