// CUDA kernels of the sgg_fast ops: one launch per stage whatever the number of tensors.
//
//  stats     grid = total chunks; block c finds its tensor in the device table (binary search
//            on chunk_begin), sums (gg, rr, gr, pp) over its ≤ chunk elements in fp32 and writes
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
// All index arithmetic is int64 (tensors over 2^31 elements). Loads upcast to fp32, math in
// fp32 (bias corrections in double), one rounding on store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "../sgg_common.h"
#include "cuda_table.h"

namespace sgg_fast {
namespace cuda {
namespace {

// ---- element access (upcast on load, round to nearest even on store) -------------------------
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
  }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) {
    p[i] = __float2bfloat16_rn(v);
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};

__device__ __forceinline__ int64_t find_tensor(const TensorRec* recs, int64_t P, int64_t c) {
  int64_t lo = 0, hi = P - 1;  // largest t with recs[t].chunk_begin <= c
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (recs[mid].chunk_begin <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Load this block's record into shared memory (thread 0 searches, everyone reads).
__device__ __forceinline__ void load_rec(const TensorRec* recs, int64_t P, TensorRec& rec,
                                         int64_t& t) {
  __shared__ int64_t t_sh;
  if (threadIdx.x == 0) {
    t_sh = find_tensor(recs, P, blockIdx.x);
    rec = recs[t_sh];
  }
  __syncthreads();
  t = t_sh;
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
__device__ __forceinline__ void stats_loop(const TensorRec& rec, int64_t b, int64_t e, float (&acc)[4]) {
  const T* g = reinterpret_cast<const T*>(rec.ptr[S_G]);
  const T* r = reinterpret_cast<const T*>(rec.ptr[S_R]);
  const T* p = reinterpret_cast<const T*>(rec.ptr[S_P]);
#pragma unroll 4
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const float gv = Elem<T>::ld(g, i);
    acc[GG] += gv * gv;
    if (HR) {
      const float rv = Elem<T>::ld(r, i);
      acc[RR] += rv * rv;
      acc[GR] += gv * rv;
    }
    if (HP) {
      const float pv = Elem<T>::ld(p, i);
      acc[PP] += pv * pv;
    }
  }
}

template <typename T>
__device__ __forceinline__ void stats_dt(const TensorRec& rec, int64_t b, int64_t e, float (&acc)[4]) {
  const bool hr = rec.ptr[S_R] != 0, hp = rec.ptr[S_P] != 0;
  if (hr && hp) stats_loop<T, true, true>(rec, b, e, acc);
  else if (hr) stats_loop<T, true, false>(rec, b, e, acc);
  else if (hp) stats_loop<T, false, true>(rec, b, e, acc);
  else stats_loop<T, false, false>(rec, b, e, acc);
}

__global__ void __launch_bounds__(kThreads) stats_kernel(const TensorRec* recs, int64_t P, int64_t chunk,
                                                         float* partials) {
  __shared__ TensorRec rec;
  int64_t t;
  load_rec(recs, P, rec, t);
  const int64_t c = blockIdx.x;
  const int64_t b = (c - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  switch (rec.dtype) {
    case CDT_F32: stats_dt<float>(rec, b, e, acc); break;
    case CDT_BF16: stats_dt<__nv_bfloat16>(rec, b, e, acc); break;
    default: stats_dt<__half>(rec, b, e, acc); break;
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
__device__ __forceinline__ void for_each_segment_sum(const T* partials, const int64_t* off, int64_t C,
                                                     int64_t S, const Done& done) {
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
__global__ void __launch_bounds__(kFinalizeThreads) segment_sum_kernel(const T* partials, const int64_t* off,
                                                                       int64_t C, int64_t S, T* sums) {
  for_each_segment_sum<T>(partials, off, C, S, [&](int64_t s, const double (&tot)[4]) {
    for (int k = 0; k < 4; ++k) sums[s * NUM_STATS + k] = static_cast<T>(tot[k]);
  });
}

// finalize_row (sgg_common.h) per segment; mirrors: guidance.finalize (torch), _finalize_kernel
// (kernels/stats.py, Triton). nu[s] -> the segment's float32 (ν, initialised), written back for
// mag_mode="relative" segments once the block knows that the step is not skipped.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const T* partials, const int64_t* off,
                                                                    int64_t C, const T* hyper,
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

template <typename T, int MODE>
__device__ __forceinline__ void apply_loop(const TensorRec& rec, const ApplyScalars& k, int64_t b, int64_t e) {
  T* p = reinterpret_cast<T*>(rec.ptr[S_P]);
  const T* g = reinterpret_cast<const T*>(rec.ptr[S_G]);
  T* m = reinterpret_cast<T*>(rec.ptr[S_M]);
  T* v = reinterpret_cast<T*>(rec.ptr[S_V]);
  T* r = reinterpret_cast<T*>(rec.ptr[S_R]);
  const float b1 = rec.beta1, omb1 = 1.f - rec.beta1, b2 = rec.beta2, omb2 = 1.f - rec.beta2;
  const float rb = rec.ref_beta, omrb = 1.f - rec.ref_beta, eps = rec.eps;
#pragma unroll 4
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const float gv = Elem<T>::ld(g, i);
    float mv = Elem<T>::ld(m, i);
    float vv = Elem<T>::ld(v, i);
    float pv = Elem<T>::ld(p, i);
    const float rv = MODE == REF_MOMENTUM ? mv : Elem<T>::ld(r, i);
    const float u = k.alpha * gv + k.beta * rv;
    if (MODE == REF_EMA) Elem<T>::st(r, i, rb * rv + omrb * gv);
    mv = b1 * mv + omb1 * u;
    vv = b2 * vv + omb2 * (u * u);
    pv = pv * k.decay;
    pv = pv - (k.step_size * mv) / (sqrtf(vv) / k.bc2_sqrt + eps);
    Elem<T>::st(m, i, mv);
    Elem<T>::st(v, i, vv);
    Elem<T>::st(p, i, pv);
  }
}

template <typename T>
__device__ __forceinline__ void apply_dt(const TensorRec& rec, const ApplyScalars& k, int64_t b, int64_t e) {
  switch (rec.ref_mode) {
    case REF_MOMENTUM: apply_loop<T, REF_MOMENTUM>(rec, k, b, e); break;
    case REF_EMA: apply_loop<T, REF_EMA>(rec, k, b, e); break;
    default: apply_loop<T, REF_SOURCE>(rec, k, b, e); break;
  }
}

__global__ void __launch_bounds__(kThreads) apply_kernel(const TensorRec* recs, int64_t P, int64_t chunk,
                                                         const float* out, unsigned long long* counters) {
  if (out[O_SKIP] != 0.f) return;  // the same for every block: the whole step is skipped
  __shared__ TensorRec rec;
  __shared__ ApplyScalars k;
  int64_t t;
  load_rec(recs, P, rec, t);
  if (threadIdx.x == 0) {
    const float* row = out + static_cast<int64_t>(rec.seg) * NUM_OUT;
    const float step = *reinterpret_cast<const float*>(rec.ptr[S_STEP]);
    const float t_new = step + 1.f;
    const double lr = rec.lr_ptr ? static_cast<double>(*reinterpret_cast<const float*>(rec.lr_ptr))
                                 : static_cast<double>(rec.lr);
    const double bc1 = 1.0 - pow(static_cast<double>(rec.beta1), static_cast<double>(t_new));
    const double bc2 = 1.0 - pow(static_cast<double>(rec.beta2), static_cast<double>(t_new));
    k.alpha = row[O_ALPHA];
    k.beta = row[O_BETA];
    k.decay = static_cast<float>(1.0 - lr * static_cast<double>(rec.weight_decay));
    k.step_size = static_cast<float>(lr / bc1);
    k.bc2_sqrt = static_cast<float>(sqrt(bc2));
    k.t_new = t_new;
  }
  __syncthreads();
  const int64_t b = (static_cast<int64_t>(blockIdx.x) - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  switch (rec.dtype) {
    case CDT_F32: apply_dt<float>(rec, k, b, e); break;
    case CDT_BF16: apply_dt<__nv_bfloat16>(rec, k, b, e); break;
    default: apply_dt<__half>(rec, k, b, e); break;
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
__device__ __forceinline__ void guide_loop(const TensorRec& rec, float alpha, float beta, int64_t b, int64_t e) {
  T* g = reinterpret_cast<T*>(rec.ptr[S_G]);
  T* r = reinterpret_cast<T*>(rec.ptr[S_R]);
  const float rb = rec.ref_beta, omrb = 1.f - rec.ref_beta;
#pragma unroll 4
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const float gv = Elem<T>::ld(g, i);
    float u = alpha * gv;
    if (HR) {
      const float rv = Elem<T>::ld(r, i);
      u = alpha * gv + beta * rv;
      if (EMA) Elem<T>::st(r, i, rb * rv + omrb * gv);
    }
    Elem<T>::st(g, i, u);
  }
}

template <typename T>
__device__ __forceinline__ void guide_dt(const TensorRec& rec, float alpha, float beta, int64_t b, int64_t e) {
  if (rec.ptr[S_R] == 0) guide_loop<T, false, false>(rec, alpha, beta, b, e);
  else if (rec.ref_mode == REF_EMA) guide_loop<T, true, true>(rec, alpha, beta, b, e);
  else guide_loop<T, true, false>(rec, alpha, beta, b, e);
}

__global__ void __launch_bounds__(kThreads) guide_kernel(const TensorRec* recs, int64_t P, int64_t chunk,
                                                         const float* out) {
  if (out[O_SKIP] != 0.f) return;
  __shared__ TensorRec rec;
  int64_t t;
  load_rec(recs, P, rec, t);
  const float* row = out + static_cast<int64_t>(rec.seg) * NUM_OUT;
  const float alpha = row[O_ALPHA], beta = row[O_BETA];
  const int64_t b = (static_cast<int64_t>(blockIdx.x) - rec.chunk_begin) * chunk;
  const int64_t e = b + chunk < rec.numel ? b + chunk : rec.numel;
  switch (rec.dtype) {
    case CDT_F32: guide_dt<float>(rec, alpha, beta, b, e); break;
    case CDT_BF16: guide_dt<__nv_bfloat16>(rec, alpha, beta, b, e); break;
    default: guide_dt<__half>(rec, alpha, beta, b, e); break;
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------
void launch_stats(const TensorRec* recs, int64_t P, int64_t C, int64_t chunk, float* partials,
                  cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  stats_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, P, chunk, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_segment_sum(const T* partials, const int64_t* seg_offsets, int64_t C, int64_t S, T* sums,
                        cudaStream_t stream) {
  if (S == 0) return;
  segment_sum_kernel<T><<<1, kFinalizeThreads, 0, stream>>>(partials, seg_offsets, C, S, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_finalize(const T* partials, const int64_t* seg_offsets, int64_t C, const T* hyper,
                     float* const* nu, int64_t S, T* out, cudaStream_t stream) {
  if (S == 0) return;
  finalize_kernel<T><<<1, kFinalizeThreads, 0, stream>>>(partials, seg_offsets, C, hyper, nu, S, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply(const TensorRec* recs, int64_t P, int64_t C, int64_t chunk, const float* out,
                  unsigned long long* counters, cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  apply_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, P, chunk, out, counters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_guide(const TensorRec* recs, int64_t P, int64_t C, int64_t chunk, const float* out,
                  cudaStream_t stream) {
  if (P == 0 || C == 0) return;
  guide_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(recs, P, chunk, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_segment_sum<float>(const float*, const int64_t*, int64_t, int64_t, float*, cudaStream_t);
template void launch_segment_sum<double>(const double*, const int64_t*, int64_t, int64_t, double*, cudaStream_t);
template void launch_finalize<float>(const float*, const int64_t*, int64_t, const float*,
                                     float* const*, int64_t, float*, cudaStream_t);
template void launch_finalize<double>(const double*, const int64_t*, int64_t, const double*,
                                      float* const*, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace sgg_fast
