// The CPU kernels' interface: plain structs of raw pointers, so that the kernel translation units
// (compiled once per instruction set: kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp)
// share no C++ types with ATen beyond at::vec and the host side chooses one set at run time.
#pragma once

#include <cstdint>

namespace sgg_fast {
namespace cpu {

enum DType : int32_t { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

// Statistics of one tensor: g (its gradient), r (reference; nullptr: r = 0), p (parameter;
// nullptr: pp not needed). All three have the same dtype and, where present, element layout.
struct StatsTask {
  const void* g;
  const void* r;
  const void* p;
  int64_t numel;
  DType dtype;
};

// AdamW on u = alpha·g + beta·r for one tensor (DESIGN §1 D), all scalars precomputed on the
// host in double and rounded once to float: decay = 1 - lr·wd, step_size = lr / (1 - β1^t),
// bc2_sqrt = √(1 - β2^t). vmax (amsgrad): vmax ← max(vmax, v), and the denominator uses vmax
// instead of v (torch.optim.AdamW(amsgrad=True)). ref_mode: REF_MOMENTUM (r = m before the step,
// `r` unused), REF_EMA (r is updated to ref_beta·r + (1 - ref_beta)·g with the raw g), REF_SOURCE
// (read).
struct ApplyTask {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* r;     // nullptr for REF_MOMENTUM
  void* vmax;  // amsgrad's running max of v (max_exp_avg_sq); nullptr: amsgrad off
  int64_t numel;
  DType dtype;
  int32_t ref_mode;
  float alpha, beta;
  float decay, step_size, bc2_sqrt, eps;
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float ref_beta, one_minus_ref_beta;
};

// GradientGuidance: g ← alpha·g + beta·r in place (r nullptr: r = 0); REF_EMA also updates r
// with the raw g.
struct GuideTask {
  void* g;
  void* r;
  int64_t numel;
  DType dtype;
  int32_t ref_mode;
  float alpha, beta;
  float ref_beta, one_minus_ref_beta;
};

// Each function handles the elements [begin, end) of one tensor.
// stats writes (gg, rr, gr, pp) of that range to out[0..3], summed in a fixed order.
using StatsFn = void (*)(const StatsTask&, int64_t begin, int64_t end, float* out);
using ApplyFn = void (*)(const ApplyTask&, int64_t begin, int64_t end);
using GuideFn = void (*)(const GuideTask&, int64_t begin, int64_t end);

struct Kernels {
  StatsFn stats;
  ApplyFn apply;
  GuideFn guide;
  const char* isa;  // "default", "avx2", "avx512"
};

// nullptr members when the set was not compiled (non-x86 machine or a non-GCC compiler)
Kernels kernels_default();
Kernels kernels_avx2();
Kernels kernels_avx512();

}  // namespace cpu
}  // namespace sgg_fast
