// AVX-512 variant of the per-row kernels, selected at run time on CPUs that have AVX-512F/BW/VL/DQ.
#include "row_kernels_api.h"
#if SPO_CPU_X86_VARIANTS
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define SPO_ISA isa_avx512
#define SPO_ISA_NAME "avx512"
#include "row_kernels.h"
#endif
