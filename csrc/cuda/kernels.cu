// CUDA kernels of the sgg_fast ops: one launch per stage whatever the number of tensors.
//
//  stats     grid = total chunks; block c reads its tensor from the chunk → tensor table, sums (gg,
//  rr, gr, pp) over its ≤ chunk elements in fp32 and writes
//            one row of partials (no atomics: a fixed reduction tree → deterministic).
//  finalize  one block of 32 warps; groups of warps (all 32 for one segment, one each for 32+
//            segments) sum each segment's rows in double in a fixed order, the group's first
//            thread applies finalize_row (sgg_common.h, the math of guidance.finalize), then the
//            block ORs the bad flags into the global skip.
//  apply     grid = total chunks of kCudaApplyChunk elements; reads skip, α, β, lr and step from
//            device memory (no host sync, graph-capturable), forms u in registers, updates
//            p, m, v (and the ema reference). The last block of a tensor (a per-tensor counter
//            in the table, reset by that block) writes step + 1, after every block of that
//            tensor has read the old step.
//  guide     the same walk, g ← α·g + β·r in place.
//
// All index arithmetic is int64 (tensors over 2^31 elements). Element data moves in 16-byte
// vectors for tensors whose pointers are 16-byte aligned (a per-tensor flag set by the host),
// element by element otherwise. Loads upcast to fp32, math in fp32 (bias corrections in
// double), one rounding on store. FMA contraction is allowed except in finalize_row, whose
// products are rounded on their own (sgg_common.h mul_nc) to mirror guidance.finalize bitwise.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../sgg_common.h"
#include "cuda_table.h"

namespace sgg_fast {
namespace cuda {
namespace {

// ---- element access ----------------------------------------------------------------------------
// Elem<T>: a value's bits (Bits), upcast to fp32 on load, round to nearest even on store. Data
// moves in 16-byte vectors (Elem<T>::N elements) when a tensor's record has F_ALIGNED (every
// pointer of the tensor 16-byte aligned and the chunk a multiple of N, set by the host), else
// element by element; both paths do the same fp32 math per element.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr int N = 4;
  static __device__ __forceinline__ float up(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits down(float v) { return __float_as_uint(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  static constexpr int N = 8;
  static __device__ __forceinline__ float up(Bits b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  static __device__ __forceinline__ Bits down(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
  static constexpr int N = 8;
  static __device__ __forceinline__ float up(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits down(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

// One element (the unaligned path and the tail of a chunk); RO as for ldv below.
template <typename T, bool RO>
__device__ __forceinline__ float ld1(const void* __restrict__ p, int64_t i) {
  const typename Elem<T>::Bits* q = reinterpret_cast<const typename Elem<T>::Bits*>(p) + i;
  return Elem<T>::up(RO ? __ldg(q) : __ldcg(q));
}
template <typename T>
__device__ __forceinline__ void st1(void* __restrict__ p, int64_t i, float v) {
  __stcg(reinterpret_cast<typename Elem<T>::Bits*>(p) + i, Elem<T>::down(v));
}

// N elements from 16 bytes at element i (a multiple of N). RO: read-only for the whole kernel
// (ld.global.nc); otherwise the data is written later in the kernel (ld.global.cg, L2 only).
template <typename T>
union Vec {
  uint4 u;
  typename Elem<T>::Bits b[Elem<T>::N];
};
template <typename T, bool RO>
__device__ __forceinline__ void ldv(const void* __restrict__ p, int64_t i, float (&x)[Elem<T>::N]) {
  const uint4* q =
      reinterpret_cast<const uint4*>(reinterpret_cast<const typename Elem<T>::Bits*>(p) + i);
  Vec<T> v;
  v.u = RO ? __ldg(q) : __ldcg(q);
#pragma unroll
  for (int k = 0; k < Elem<T>::N; ++k) x[k] = Elem<T>::up(v.b[k]);
}
template <typename T>
__device__ __forceinline__ void stv(void* __restrict__ p, int64_t i, const float (&x)[Elem<T>::N]) {
  Vec<T> v;
#pragma unroll
  for (int k = 0; k < Elem<T>::N; ++k) v.b[k] = Elem<T>::down(x[k]);
  __stcg(reinterpret_cast<uint4*>(reinterpret_cast<typename Elem<T>::Bits*>(p) + i), v.u);
}

// Walk elements [b, e) of this block: body(i, n) for groups of n = N consecutive elements
// starting at i (vector path, when ALIGNED) and then for single elements (n = 1). The
// vector groups are b, b + N, ... up to the last full group; the rest is the scalar tail.
template <typename T, typename VecBody, typename OneBody>
__device__ __forceinline__ void walk(bool aligned, int64_t b, int64_t e, const VecBody& vec,
                                     const OneBody& one) {
  constexpr int N = Elem<T>::N;
  int64_t tail = b;
  if (aligned) {
    const int64_t nvec = (e - b) / N;
#pragma unroll 2
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) vec(b + j * N);
    tail = b + nvec * N;
  }
  for (int64_t i = tail + threadIdx.x; i < e; i += blockDim.x) one(i);
}

// The block's tensor: one word of the chunk → tensor table (built by the host once per list
// of tensor sizes), then the 128-byte record, copied to shared memory by 16 threads at once.
__device__ __forceinline__ int load_rec(const TensorRec* __restrict__ recs,
                                        const int32_t* __restrict__ chunk_tensor, TensorRec& rec) {
  const int t = __ldg(chunk_tensor + blockIdx.x);
  if (threadIdx.x < kRecWords)
    reinterpret_cast<int64_t*>(&rec)[threadIdx.x] =
        __ldg(reinterpret_cast<const long long*>(recs + t) + threadIdx.x);
  __syncthreads();
  return t;
}

// Sum v over the block in a fixed tree; the result is valid in thread 0.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float sh[N][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k)
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) sh[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = lane < kThreads / 32 ? sh[k][lane] : 0.f;
      for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
}

// ---- stats -----------------------------------------------------------------------------------
template <typename T, bool HR, bool HP>
__device__ __forceinline__ void stats_loop(const TensorRec& rec, int64_t b, int64_t e,
                                           float (&acc)[4]) {
  constexpr int N = Elem<T>::N;
  const void* __restrict__ g = reinterpret_cast<const void*>(rec.ptr[S_G]);
  const void* __restrict__ r = reinterpret_cast<const void*>(rec.ptr[S_R]);
  const void* __restrict__ p = reinterpret_cast<const void*>(rec.ptr[S_P]);
  auto add = [&](float gv, float rv, float pv) {
    acc[GG] += gv * gv;
    if (HR) {
      acc[RR] += rv * rv;
      acc[GR] += gv * rv;
    }
    if (HP) acc[PP] += pv * pv;
  };
  walk<T>((rec.flags & F_ALIGNED) != 0, b, e,
          [&](int64_t i) {
            float gv[N], rv[N], pv[N];
            ldv<T, true>(g, i, gv);
            if (HR) ldv<T, true>(r, i, rv);
            if (HP) ldv<T, true>(p, i, pv);
#pragma unroll
            for (int k = 0; k < N; ++k) add(gv[k], HR ? rv[k] : 0.f, HP ? pv[k] : 0.f);
          },
          [&](int64_t i) {
            add(ld1<T, true>(g, i), HR ? ld1<T, true>(r, i) : 0.f, HP ? ld1<T, true>(p, i) : 0.f);
          });
}

template <typename T>
__device__ __forceinline__ void stats_dt(const TensorRec& rec, int64_t b, int64_t e,
                                         float (&acc)[4]) {
  const bool hr = rec.ptr[S_R] != 0, hp = rec.ptr[S_P] != 0;
  if (hr && hp)
    stats_loop<T, true, true>(rec, b, e, acc);
  else if (hr)
    stats_loop<T, true, false>(rec, b, e, acc);
  else if (hp)
    stats_loop<T, false, true>(rec, b, e, acc);
  else
    stats_loop<T, false, false>(rec, b, e, acc);
}

__global__ void __launch_bounds__(kThreads)
    stats_kernel(const TensorRec* __restrict__ recs, const int32_t* __restrict__ chunk_tensor,
                 int64_t chunk, float* __restrict__ partials) {
  __shared__ TensorRec rec;
  load_rec(recs, chunk_tensor, rec);
  const int64_t c = blockIdx.x;
  const int64_t b = (c - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  switch (rec.dtype) {
    case CDT_F32:
      stats_dt<float>(rec, b, e, acc);
      break;
    case CDT_BF16:
      stats_dt<__nv_bfloat16>(rec, b, e, acc);
      break;
    default:
      stats_dt<__half>(rec, b, e, acc);
      break;
  }
  block_sum<4>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) partials[c * NUM_STATS + k] = acc[k];
  }
}

// ---- segment sums / finalize (one block) -----------------------------------------------------
constexpr int kFinalizeThreads = 1024;
constexpr int kFinalizeWarps = kFinalizeThreads / 32;

// The block's 32 warps form groups of G warps (G = 32 / groups, a power of two chosen so that
// few segments get many warps and many segments one warp each); group k sums segments k,
// k + groups, ... in lock step, so every __syncthreads is reached by all threads. Within a
// group, thread j adds rows j, j + 32·G, ... in double; lanes then warps are combined in a
// fixed order: the sums are deterministic.
__device__ __forceinline__ int finalize_groups(int64_t S) {
  int groups = kFinalizeWarps;
  while (groups > 1 && groups / 2 >= S) groups /= 2;
  return groups;
}

// Calls done(s, acc) on thread 0 of the segment's group for every segment s < S.
template <typename T, typename Done>
__device__ __forceinline__ void for_each_segment_sum(const T* partials, const int64_t* off,
                                                     int64_t C, int64_t S, const Done& done) {
  __shared__ double sh[kFinalizeWarps][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups = finalize_groups(S);
  const int G = kFinalizeWarps / groups;  // warps per group
  const int group = warp / G, wig = warp % G;
  const int64_t rounds = (S + groups - 1) / groups;
  for (int64_t it = 0; it < rounds; ++it) {
    const int64_t s = group + it * groups;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    if (s < S) {
      int64_t lo = off[s], hi = off[s + 1];
      lo = lo < 0 ? 0 : lo;
      hi = hi > C ? C : hi;
#pragma unroll 4
      for (int64_t c = lo + wig * 32 + lane; c < hi; c += 32 * G)
        for (int k = 0; k < 4; ++k) acc[k] += static_cast<double>(partials[c * NUM_STATS + k]);
    }
    for (int k = 0; k < 4; ++k)
      for (int o = 16; o > 0; o >>= 1) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], o);
    if (lane == 0)
      for (int k = 0; k < 4; ++k) sh[warp][k] = acc[k];
    __syncthreads();
    if (s < S && wig == 0 && lane == 0) {
      double tot[4] = {0.0, 0.0, 0.0, 0.0};
      for (int w = 0; w < G; ++w)
        for (int k = 0; k < 4; ++k) tot[k] += sh[warp + w][k];
      done(s, tot);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    segment_sum_kernel(const T* partials, const int64_t* off, int64_t C, int64_t S, T* sums) {
  for_each_segment_sum<T>(partials, off, C, S, [&](int64_t s, const double (&tot)[4]) {
    for (int k = 0; k < 4; ++k) sums[s * NUM_STATS + k] = static_cast<T>(tot[k]);
  });
}

// finalize_row (sgg_common.h) per segment; mirrors: guidance.finalize (torch), _finalize_kernel
// (kernels/stats.py, Triton). nu[s] -> the segment's float32 (ν, initialised), written back for
// mag_mode="relative" segments once the block knows that the step is not skipped.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const T* partials, const int64_t* off, int64_t C, const T* hyper,
                    float* const* nu, int64_t S, T* out) {
  int bad = 0;
  for_each_segment_sum<T>(partials, off, C, S, [&](int64_t s, const double (&tot)[4]) {
    const T st[4] = {static_cast<T>(tot[0]), static_cast<T>(tot[1]), static_cast<T>(tot[2]),
                     static_cast<T>(tot[3])};
    const T old[NUM_NU] = {static_cast<T>(nu[s][N_NU]), static_cast<T>(nu[s][N_INIT])};
    bad |= finalize_row<T>(st, hyper + s * NUM_HYPER, old, out + s * NUM_OUT) ? 1 : 0;
  });
  const int skip = __syncthreads_or(bad);  // the global skip: any segment bad
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    T* row = out + s * NUM_OUT;
    if (skip) {
      row[O_NU] = static_cast<T>(nu[s][N_NU]);
      row[O_NUINIT] = static_cast<T>(nu[s][N_INIT]);
    } else if (hyper[s * NUM_HYPER + H_MODE] == T(MAG_RELATIVE)) {
      float* dst = nu[s];
      dst[N_NU] = static_cast<float>(row[O_NU]);
      dst[N_INIT] = static_cast<float>(row[O_NUINIT]);
    }
    row[O_SKIP] = skip ? T(1) : T(0);
  }
}

// ---- apply (SGGAdamW) ------------------------------------------------------------------------
struct ApplyScalars {
  float alpha, beta, decay, step_size, bc2_sqrt, t_new;
};

// The AdamW update of one element with u = α·g + β·r (the CPU kernel's math, in fp32):
// r ← ρ·r + (1 − ρ)·g (ema), m ← β1·m + (1 − β1)·u, v ← β2·v + (1 − β2)·u²,
// p ← p·(1 − lr·wd) − step_size·m / (√v / √bc2 + eps).
template <int MODE>
struct AdamW1 {
  float alpha, beta, decay, step_size, bc2_sqrt, b1, omb1, b2, omb2, rb, omrb, eps;
  __device__ __forceinline__ void operator()(float gv, float& mv, float& vv, float& pv,
                                             float& rv) const {
    if (MODE == REF_MOMENTUM) rv = mv;
    const float u = alpha * gv + beta * rv;
    if (MODE == REF_EMA) rv = rb * rv + omrb * gv;
    mv = b1 * mv + omb1 * u;
    vv = b2 * vv + omb2 * (u * u);
    pv = pv * decay;
    pv = pv - (step_size * mv) / (sqrtf(vv) / bc2_sqrt + eps);
  }
};

template <typename T, int MODE>
__device__ __forceinline__ void apply_loop(const TensorRec& rec, const ApplyScalars& k, int64_t b,
                                           int64_t e) {
  constexpr int N = Elem<T>::N;
  void* __restrict__ p = reinterpret_cast<void*>(rec.ptr[S_P]);
  const void* __restrict__ g = reinterpret_cast<const void*>(rec.ptr[S_G]);
  void* __restrict__ m = reinterpret_cast<void*>(rec.ptr[S_M]);
  void* __restrict__ v = reinterpret_cast<void*>(rec.ptr[S_V]);
  void* __restrict__ r = reinterpret_cast<void*>(rec.ptr[S_R]);
  const AdamW1<MODE> f{
      k.alpha,         k.beta,    k.decay,         k.step_size,  k.bc2_sqrt,         rec.beta1,
      1.f - rec.beta1, rec.beta2, 1.f - rec.beta2, rec.ref_beta, 1.f - rec.ref_beta, rec.eps};
  walk<T>((rec.flags & F_ALIGNED) != 0, b, e,
          [&](int64_t i) {
            float gv[N], mv[N], vv[N], pv[N], rv[N];
            ldv<T, true>(g, i, gv);
            ldv<T, false>(m, i, mv);
            ldv<T, false>(v, i, vv);
            ldv<T, false>(p, i, pv);
            if (MODE != REF_MOMENTUM) ldv<T, false>(r, i, rv);
#pragma unroll
            for (int j = 0; j < N; ++j) f(gv[j], mv[j], vv[j], pv[j], rv[j]);
            if (MODE == REF_EMA) stv<T>(r, i, rv);
            stv<T>(m, i, mv);
            stv<T>(v, i, vv);
            stv<T>(p, i, pv);
          },
          [&](int64_t i) {
            float mv = ld1<T, false>(m, i), vv = ld1<T, false>(v, i), pv = ld1<T, false>(p, i);
            float rv = MODE == REF_MOMENTUM ? 0.f : ld1<T, false>(r, i);
            f(ld1<T, true>(g, i), mv, vv, pv, rv);
            if (MODE == REF_EMA) st1<T>(r, i, rv);
            st1<T>(m, i, mv);
            st1<T>(v, i, vv);
            st1<T>(p, i, pv);
          });
}

template <typename T>
__device__ __forceinline__ void apply_dt(const TensorRec& rec, const ApplyScalars& k, int64_t b,
                                         int64_t e) {
  switch (rec.ref_mode) {
    case REF_MOMENTUM:
      apply_loop<T, REF_MOMENTUM>(rec, k, b, e);
      break;
    case REF_EMA:
      apply_loop<T, REF_EMA>(rec, k, b, e);
      break;
    default:
      apply_loop<T, REF_SOURCE>(rec, k, b, e);
      break;
  }
}

__global__ void __launch_bounds__(kThreads)
    apply_kernel(const TensorRec* __restrict__ recs, const int32_t* __restrict__ chunk_tensor,
                 int64_t chunk, const float* __restrict__ out,
                 unsigned long long* __restrict__ counters) {
  if (__ldg(out + O_SKIP) != 0.f) return;  // the same for every block: the whole step is skipped
  __shared__ TensorRec rec;
  __shared__ ApplyScalars k;
  const int t = load_rec(recs, chunk_tensor, rec);
  if (threadIdx.x == 0) {
    // the step counter is written by this kernel (last block of the tensor): not ld.global.nc
    const float* row = out + static_cast<int64_t>(rec.seg) * NUM_OUT;
    const float step = __ldcg(reinterpret_cast<const float*>(rec.ptr[S_STEP]));
    const float t_new = step + 1.f;
    const double lr = rec.lr_ptr
                          ? static_cast<double>(__ldg(reinterpret_cast<const float*>(rec.lr_ptr)))
                          : static_cast<double>(rec.lr);
    const double bc1 = 1.0 - pow(static_cast<double>(rec.beta1), static_cast<double>(t_new));
    const double bc2 = 1.0 - pow(static_cast<double>(rec.beta2), static_cast<double>(t_new));
    k.alpha = __ldg(row + O_ALPHA);
    k.beta = __ldg(row + O_BETA);
    k.decay = static_cast<float>(1.0 - lr * static_cast<double>(rec.weight_decay));
    k.step_size = static_cast<float>(lr / bc1);
    k.bc2_sqrt = static_cast<float>(sqrt(bc2));
    k.t_new = t_new;
  }
  __syncthreads();
  const int64_t b = (static_cast<int64_t>(blockIdx.x) - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  switch (rec.dtype) {
    case CDT_F32:
      apply_dt<float>(rec, k, b, e);
      break;
    case CDT_BF16:
      apply_dt<__nv_bfloat16>(rec, k, b, e);
      break;
    default:
      apply_dt<__half>(rec, k, b, e);
      break;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // every block of tensor t read the old step before counting itself; the last one writes
    __threadfence();
    const unsigned long long done = atomicAdd(&counters[t], 1ull) + 1ull;
    if (done == static_cast<unsigned long long>(rec.nchunks)) {
      *reinterpret_cast<float*>(rec.ptr[S_STEP]) = k.t_new;
      counters[t] = 0ull;
    }
  }
}

// ---- guide (GradientGuidance) ----------------------------------------------------------------
template <typename T, bool HR, bool EMA>
__device__ __forceinline__ void guide_loop(const TensorRec& rec, float alpha, float beta, int64_t b,
                                           int64_t e) {
  constexpr int N = Elem<T>::N;
  void* __restrict__ g = reinterpret_cast<void*>(rec.ptr[S_G]);
  void* __restrict__ r = reinterpret_cast<void*>(rec.ptr[S_R]);
  const float rb = rec.ref_beta, omrb = 1.f - rec.ref_beta;
  // g ← α·g + β·r (α·g without a reference); r ← ρ·r + (1 − ρ)·g (ema)
  auto one = [&](float gv, float& rv) {
    const float u = HR ? alpha * gv + beta * rv : alpha * gv;
    if (EMA) rv = rb * rv + omrb * gv;
    return u;
  };
  walk<T>((rec.flags & F_ALIGNED) != 0, b, e,
          [&](int64_t i) {
            float gv[N], rv[N];
            ldv<T, false>(g, i, gv);
            if (HR) ldv<T, false>(r, i, rv);
#pragma unroll
            for (int j = 0; j < N; ++j) gv[j] = one(gv[j], rv[j]);
            if (EMA) stv<T>(r, i, rv);
            stv<T>(g, i, gv);
          },
          [&](int64_t i) {
            float rv = HR ? ld1<T, false>(r, i) : 0.f;
            const float u = one(ld1<T, false>(g, i), rv);
            if (EMA) st1<T>(r, i, rv);
            st1<T>(g, i, u);
          });
}

template <typename T>
__device__ __forceinline__ void guide_dt(const TensorRec& rec, float alpha, float beta, int64_t b,
                                         int64_t e) {
  if (rec.ptr[S_R] == 0)
    guide_loop<T, false, false>(rec, alpha, beta, b, e);
  else if (rec.ref_mode == REF_EMA)
    guide_loop<T, true, true>(rec, alpha, beta, b, e);
  else
    guide_loop<T, true, false>(rec, alpha, beta, b, e);
}

__global__ void __launch_bounds__(kThreads)
    guide_kernel(const TensorRec* __restrict__ recs, const int32_t* __restrict__ chunk_tensor,
                 int64_t chunk, const float* __restrict__ out) {
  if (__ldg(out + O_SKIP) != 0.f) return;
  __shared__ TensorRec rec;
  load_rec(recs, chunk_tensor, rec);
  const float* row = out + static_cast<int64_t>(rec.seg) * NUM_OUT;
  const float alpha = __ldg(row + O_ALPHA), beta = __ldg(row + O_BETA);
  const int64_t b = (static_cast<int64_t>(blockIdx.x) - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  switch (rec.dtype) {
    case CDT_F32:
      guide_dt<float>(rec, alpha, beta, b, e);
      break;
    case CDT_BF16:
      guide_dt<__nv_bfloat16>(rec, alpha, beta, b, e);
      break;
    default:
      guide_dt<__half>(rec, alpha, beta, b, e);
      break;
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------
void launch_stats(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, float* partials, cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  stats_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, chunk_tensor, chunk,
                                                                  partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_segment_sum(const T* partials, const int64_t* seg_offsets, int64_t C, int64_t S,
                        T* sums, cudaStream_t stream) {
  if (S == 0) return;
  segment_sum_kernel<T><<<1, kFinalizeThreads, 0, stream>>>(partials, seg_offsets, C, S, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_finalize(const T* partials, const int64_t* seg_offsets, int64_t C, const T* hyper,
                     float* const* nu, int64_t S, T* out, cudaStream_t stream) {
  if (S == 0) return;
  finalize_kernel<T>
      <<<1, kFinalizeThreads, 0, stream>>>(partials, seg_offsets, C, hyper, nu, S, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, const float* out, unsigned long long* counters,
                  cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  apply_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, chunk_tensor, chunk, out,
                                                                  counters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_guide(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, const float* out, cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  guide_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, chunk_tensor, chunk, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_segment_sum<float>(const float*, const int64_t*, int64_t, int64_t, float*,
                                        cudaStream_t);
template void launch_segment_sum<double>(const double*, const int64_t*, int64_t, int64_t, double*,
                                         cudaStream_t);
template void launch_finalize<float>(const float*, const int64_t*, int64_t, const float*,
                                     float* const*, int64_t, float*, cudaStream_t);
template void launch_finalize<double>(const double*, const int64_t*, int64_t, const double*,
                                      float* const*, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace sgg_fast
