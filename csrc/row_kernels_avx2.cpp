// AVX2 + FMA variant of the per-row kernels, selected at run time on CPUs that have them.
#include "row_kernels_api.h"
#if SPO_CPU_X86_VARIANTS
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#pragma GCC target("avx2,fma,f16c")
#define SPO_ISA isa_avx2
#define SPO_ISA_NAME "avx2"
#include "row_kernels.h"
#endif
