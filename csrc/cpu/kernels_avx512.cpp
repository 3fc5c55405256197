// AVX-512 (F/BW/VL/DQ) build of the CPU kernels, chosen at run time when the CPU has them.
// See kernels_avx2.cpp for why this is a pragma and what CPU_CAPABILITY does.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq")
#if __GNUC__ < 13
// GCC < 13 (PR 105593) reports "'__Y' is used uninitialized" inside avx512fintrin.h wherever
// an intrinsic built on _mm512_undefined_ps() (`__m512 __Y = __Y;`, deliberately undefined:
// _mm512_max_ps, the masked loads/stores, conversions) is inlined; this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "isa_x86_avx2_macros.h"
// and the AVX-512 ones, for this file only
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SGG_ISA_NAME avx512
#define SGG_ISA_STRING "avx512"
#include "kernels_impl.h"
#else
#include "kernels.h"
namespace sgg_fast {
namespace cpu {
Kernels kernels_avx512() { return Kernels{nullptr, nullptr, nullptr, "avx512"}; }
}  // namespace cpu
}  // namespace sgg_fast
#endif
