// The interface between the per-row kernels (row_kernels.h, compiled once per instruction set) and
// the torch-side ops (logits.cpp, linear.cpp, linear_frozen.cpp; the variant is chosen in isa.cpp).
// Plain C++: no torch headers here.
#pragma once

#include <cstdint>

namespace spo_cpu {

// Index of an element type in the tables below.
enum DTypeIndex : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// SPEC 2's logit transform: z <- multiplier * z, then cap * tanh(z / cap) when cap > 0, then
// z * inv_t (inv_t = 1 / temperature).
struct Xform {
  double multiplier, cap, inv_t;
};

// Per-token arrays of the online log-sum-exp, indexed like the rows of a call (element i of each
// belongs to row i). m, s, zt, u, q, zsum are of the accumulation type (double for double input,
// float otherwise).
struct RowState {
  void* m;   // running max of the transformed logits
  void* s;   // sum of exp(z - m)
  void* zt;  // transformed target logit (set by the call whose columns hold the target)
  // Statistics (SPEC 8), all null unless asked for; a separate instantiation of the kernel runs
  // then, so the path without them does no extra work.
  void* u;       // sum of exp(z - m) * (z - m)   (entropy = log s - u / s)
  void* q;       // sum of exp(z - m)^2           (log sum p^2 = log q - 2 log s)
  void* zsum;    // sum of z                      (mean logit = zsum / V)
  int64_t* arg;  // column of the first maximum   (is_argmax = arg == target)
};

// Online log-sum-exp over rows [r0, r1): folds columns [col0, col0 + n) of each row into its state:
// updates m and s (and the statistics when st.u is set), and stores the transformed target logit in
// zt when targets[i] falls in those columns. Calls for one row must come in increasing col0.
using LseFn = void (*)(const void* base, const int64_t* rows, int64_t stride, int64_t n, int64_t r0, int64_t r1,
                       const int64_t* targets, int64_t col0, const Xform& xf, const RowState& st);

// out = g * (onehot(target) - exp(z - lse)) * dz/dx for rows [r0, r1), columns [col0, col0 + n),
// z the transformed x; `out` may alias `x`.
using GradFn = void (*)(const void* x, void* out, const int64_t* rows, int64_t sx, int64_t so, int64_t n,
                        int64_t r0, int64_t r1, const int64_t* targets, int64_t col0, const void* lse,
                        const void* g, const Xform& xf);

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
