// The device table of the CUDA multi-tensor kernels, shared by the host code (ops_cuda.cpp,
// compiled by the C++ compiler) and the kernels (kernels.cu, compiled by nvcc).
//
// One launch serves any number of tensors: each tensor has a 128-byte TensorRec (pointers,
// size, first chunk, segment, hyper-parameters) in a device buffer `ws` (int64, 17 words per
// tensor: 16 for the record, 1 for the apply kernel's step counter). The host builds the records
// every call, compares them with the mirror `ws_host`, and copies them to the device (from a
// pinned buffer, asynchronously) only when they changed — so a steady training loop uploads
// nothing, and a CUDA graph captured after one eager step replays with the same table.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sgg_fast {
namespace cuda {

constexpr int kWsWordsPerTensor = 17;  // = WS_WORDS_PER_TENSOR in cpp_backend.py
constexpr int kRecWords = 16;

enum CudaDType : int32_t { CDT_F32 = 0, CDT_BF16 = 1, CDT_F16 = 2 };

// TensorRec.flags: every pointer of the tensor is 16-byte aligned and a chunk is a whole number
// of 16-byte vectors: the kernels use vector loads/stores for it
constexpr int32_t F_ALIGNED = 1;

// pointer slots
constexpr int S_G = 0, S_R = 1, S_P = 2, S_M = 3, S_V = 4, S_STEP = 5;

struct alignas(16) TensorRec {
  int64_t ptr[6];  // S_* slots; 0 = absent
  int64_t numel;
  int64_t chunk_begin;  // first chunk (block) of this tensor
  int64_t nchunks;      // max(1, ceil(numel / chunk))
  int64_t lr_ptr;       // float32 device scalar overriding lr, or 0
  int32_t seg;          // row of the finalize output
  int32_t dtype;        // CudaDType
  int32_t ref_mode;     // REF_MOMENTUM / REF_EMA / REF_SOURCE
  int32_t flags;        // F_* bits
  float lr, beta1, beta2, eps, weight_decay, ref_beta;
  float pad[2];
};
static_assert(sizeof(TensorRec) == kRecWords * 8, "TensorRec must be 16 int64 words");

// Launchers (kernels.cu). Every one checks its launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
// recs: device pointer to P records; chunk_tensor: device int32 [C], the tensor of each chunk
// (block); C: total chunks (grid size).
void launch_stats(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, float* partials, cudaStream_t stream);
// partials: [C, 4]; seg_offsets: [S + 1] (device); rows outside [0, C) are ignored.
template <typename T>
void launch_segment_sum(const T* partials, const int64_t* seg_offsets, int64_t C, int64_t S,
                        T* sums, cudaStream_t stream);
// nu: device array of S pointers to each segment's float32 (ν, initialised), updated in place.
template <typename T>
void launch_finalize(const T* partials, const int64_t* seg_offsets, int64_t C, const T* hyper,
                     float* const* nu, int64_t S, T* out, cudaStream_t stream);
void launch_apply(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, const float* out, unsigned long long* counters,
                  cudaStream_t stream);
void launch_guide(const TensorRec* recs, const int32_t* chunk_tensor, int64_t P, int64_t C,
                  int64_t chunk, const float* out, cudaStream_t stream);

// Elements per block of the apply/guide kernels: 256 threads × 64 elements, so that a block's
// fixed work (one table word, the 128-byte record, thread 0 reads α/β/lr/step and computes the
// bias corrections in double while the others wait) is amortised over 16 Ki elements (~450 KiB of
// traffic), and a 10 M-parameter model still has ~600 blocks for an H200's 132 SMs. Untuned (no GPU
// yet).
constexpr int64_t kCudaApplyChunk = 16384;
constexpr int kThreads = 256;

}  // namespace cuda
}  // namespace sgg_fast
