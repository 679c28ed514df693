// The interface between the per-row kernels (row_kernels.h, compiled once per instruction set) and
// the torch-side ops (logits.cpp, linear.cpp, linear_frozen.cpp; the variant is chosen in isa.cpp).
// Plain C++: no torch headers here.
#pragma once

#include <cstdint>

namespace spo_cpu {

// Index of an element type in the tables below.
enum DTypeIndex : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// Online log-sum-exp over rows [r0, r1): for each row updates the running max m[i] and the sum
// s[i] = sum exp(z - m[i]) with columns [col0, col0 + n), and stores the transformed target logit
// in zt[i] when targets[i] falls in those columns. cap <= 0: no softcap.
using LseFn = void (*)(const void* base, const int64_t* rows, int64_t stride, int64_t n, int64_t r0, int64_t r1,
                       const int64_t* targets, int64_t col0, double cap, double inv_t, void* m, void* s,
                       void* zt);

// out = g * (onehot(target) - exp(z - lse)) * dz/dx for rows [r0, r1), columns [col0, col0 + n);
// `out` may alias `x`.
using GradFn = void (*)(const void* x, void* out, const int64_t* rows, int64_t sx, int64_t so, int64_t n,
                        int64_t r0, int64_t r1, const int64_t* targets, int64_t col0, const void* lse,
                        const void* g, double cap, double inv_t);

struct KernelTable {
  const char* isa;
  LseFn lse[4];
  GradFn grad[4];
};

namespace isa_generic { const KernelTable* table(); }
namespace isa_avx2 { const KernelTable* table(); }
namespace isa_avx512 { const KernelTable* table(); }

}  // namespace spo_cpu

// The x86-64 variants need GCC's `#pragma GCC target` and run-time CPU detection.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPO_CPU_X86_VARIANTS 1
#else
#define SPO_CPU_X86_VARIANTS 0
#endif
