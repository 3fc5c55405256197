// The ISA macros that `#pragma GCC target("avx2,fma,f16c,bmi2", ...)` does not define but
// headers test (sleef.h declares its vector functions under #ifdef __AVX__ ...): included right
// after the pragma by kernels_avx2.cpp and kernels_avx512.cpp, for those files only.
#pragma once
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
