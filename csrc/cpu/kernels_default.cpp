// Portable build of the CPU kernels (at::vec's generic Vectorized: the compiler's baseline ISA).
#define SGG_ISA_NAME default_isa
#define SGG_ISA_STRING "default"
#include "kernels_impl.h"

namespace sgg_fast {
namespace cpu {
Kernels kernels_default() { return kernels_default_isa(); }
}  // namespace cpu
}  // namespace sgg_fast
