// AVX2 + FMA build of the CPU kernels, chosen at run time when the CPU has them.
// `#pragma GCC target` (not a per-file -mavx2 flag, which setuptools/BuildExtension cannot give
// one file) must come before any include; CPU_CAPABILITY names at::vec's namespace so that this
// copy of its inline code cannot collide with the default one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "isa_x86_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SGG_ISA_NAME avx2
#define SGG_ISA_STRING "avx2"
#include "kernels_impl.h"
#else
#include "kernels.h"
namespace sgg_fast {
namespace cpu {
Kernels kernels_avx2() { return Kernels{nullptr, nullptr, nullptr, "avx2"}; }
}  // namespace cpu
}  // namespace sgg_fast
#endif
