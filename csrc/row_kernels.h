// Per-row kernels of the cpu backend: plain C++ on raw pointers, no torch headers.
//
// This header is compiled several times, once per instruction set (row_kernels_*.cpp set the
// target and SPO_ISA, the namespace), and isa.cpp picks the best table at run time. The hot
// loops are written for the auto-vectorizer (`#pragma omp simd`, branch-free bodies, an exp built
// from arithmetic and bit operations), so the same source becomes SSE2, AVX2 or AVX-512 code.
//
// Row layout: row i of a call is at `base + (rows ? rows[i] : i) * stride` (elements) and has n
// columns, which are columns [col0, col0 + n) of the full vocabulary. Accumulator type A is double
// for double input and float otherwise; the RowState arrays (but arg), lse and g are A.

#ifndef SPO_ISA
#error "define SPO_ISA (the namespace of this instruction-set variant) before including row_kernels.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "row_kernels_api.h"

namespace spo_cpu {
namespace SPO_ISA {
namespace {

// ---- element types -------------------------------------------------------------------------

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

template <typename T, typename A> struct Elem;

template <> struct Elem<float, float> {
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double, double> {
  static inline double load(const double* p) { return *p; }
  static inline void store(double* p, double v) { *p = v; }
};
template <> struct Elem<bf16_t, float> {
  static inline float load(const bf16_t* p) { return bits_to_float(uint32_t(p->x) << 16); }
  static inline void store(bf16_t* p, float v) {
    // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u = float_to_bits(v);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p->x = uint16_t(v != v ? 0x7FC0u : r);
  }
};
template <> struct Elem<f16_t, float> {
  static inline float load(const f16_t* p) {
    uint32_t h = p->x;
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t em = h & 0x7FFFu;
    // exponent/mantissa moved into float position, then rebias by 2^(127-15); exact for normal and
    // subnormal halves. Inf/NaN (exponent 31) are built directly.
    float mag = bits_to_float(em << 13) * 5.192296858534828e33f;  // 2^112
    uint32_t special = 0x7F800000u | ((h & 0x3FFu) << 13);
    uint32_t u = (em >= 0x7C00u) ? special : float_to_bits(mag);
    return bits_to_float(u | sign);
  }
  static inline void store(f16_t* p, float v) {
    uint32_t u = float_to_bits(v);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    // normal range: rebias the exponent (-112 << 23), round to nearest even on the 13 dropped bits
    uint32_t normal = (a + 0xC8000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    // subnormal halves (|v| < 2^-14): adding 0.5 aligns the binary point so the FPU rounds for us
    uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? sub : normal;
    h = a >= 0x477FF000u ? 0x7C00u : h;              // rounds to +-inf (65520 and above)
    h = a > 0x7F800000u ? 0x7E00u : h;               // NaN
    p->x = uint16_t(h | sign);
  }
};

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ---- math ------------------------------------------------------------------------------------

// exp for float: range reduction x = k ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (truncation
// ~5e-9 relative), scale by 2^k built in the exponent bits. Inputs below ln(FLT_MIN) give 0, NaN
// gives NaN. Branch-free so that it vectorizes.
inline float fexp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float k = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - k * 0.693145751953125f;
  r = r - k * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ki = int32_t(k);
  float scale = bits_to_float(uint32_t(ki + 127) << 23);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}
inline double fexp(double x) { return std::exp(x); }

inline float ftanh(float x) {
  float a = std::fabs(x);
  float e = fexp(-2.0f * a);
  float t = (1.0f - e) / (1.0f + e);
  return std::copysign(t, x);
}
inline double ftanh(double x) { return std::tanh(x); }

// SPEC 2's transform folded into constants: with softcap (Cap), z = post * tanh(x * pre) with
// pre = multiplier / cap and post = cap / temperature, dz/dx = slope * (1 - tanh^2) with
// slope = multiplier / temperature; without, z = x * post and dz/dx = post with
// post = multiplier / temperature.
template <typename A>
struct XformConsts {
  A pre, post, slope;
  XformConsts(const Xform& xf, bool cap)
      : pre(cap ? A(xf.multiplier / xf.cap) : A(0)),
        post(cap ? A(xf.cap * xf.inv_t) : A(xf.multiplier * xf.inv_t)),
        slope(A(xf.multiplier * xf.inv_t)) {}
};

template <bool Cap, typename A>
inline A xform(A v, const XformConsts<A>& k) {
  if (Cap) return k.post * ftanh(v * k.pre);
  return v * k.post;
}
// The same, also returning dz/dx.
template <bool Cap, typename A>
inline A xform_chain(A v, const XformConsts<A>& k, A& chain) {
  if (Cap) {
    A t = ftanh(v * k.pre);
    chain = (A(1) - t * t) * k.slope;
    return k.post * t;
  }
  chain = k.post;
  return v * k.post;
}

// ---- forward: online log-sum-exp (and, when Stats, the statistics of RowState) --------------

constexpr int64_t kChunk = 2048;  // columns per L1-resident chunk

template <typename T, bool Cap, bool Stats>
void lse_rows_impl(const void* base_, const int64_t* rows, int64_t stride, int64_t n, int64_t r0, int64_t r1,
                   const int64_t* targets, int64_t col0, const Xform& xf, const RowState& st) {
  using A = typename AccOf<T>::type;
  using E = Elem<T, A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const T* base = static_cast<const T*>(base_);
  A* m = static_cast<A*>(st.m);
  A* s = static_cast<A*>(st.s);
  A* zt = static_cast<A*>(st.zt);
  A* u = static_cast<A*>(st.u);
  A* q = static_cast<A*>(st.q);
  A* zsum = static_cast<A*>(st.zsum);
  const XformConsts<A> k(xf, Cap);
  alignas(64) A buf[kChunk];
  for (int64_t i = r0; i < r1; ++i) {
    const T* x = base + (rows ? rows[i] : i) * stride;
    A mi = m[i], si = s[i];
    A ui = 0, qi = 0, zi = 0;
    int64_t ai = 0;
    if (Stats) ui = u[i], qi = q[i], zi = zsum[i], ai = st.arg[i];
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t len = n - c0 < kChunk ? n - c0 : kChunk;
      const T* xc = x + c0;
      A cm = kNegInf;
#pragma omp simd reduction(max : cm)
      for (int64_t j = 0; j < len; ++j) {
        A v = xform<Cap>(E::load(xc + j), k);
        buf[j] = v;
        cm = v > cm ? v : cm;
      }
      const bool new_max = cm > mi;
      if (new_max) {
        const A r = std::exp(mi - cm);  // 0 while mi is -inf
        if (Stats) {
          // Relative to the new max: e' = r e and (z - m') = (z - m) + (m - m').
          ui = si > 0 ? r * (ui + (mi - cm) * si) : A(0);
          qi = qi * r * r;
        }
        si = si * r;
        mi = cm;
      }
      if (mi == kNegInf) {  // nothing but -inf (or NaN) so far: no exponentials to add
        if (Stats) {
          A cz = 0;
#pragma omp simd reduction(+ : cz)
          for (int64_t j = 0; j < len; ++j) cz += buf[j];
          zi += cz;
        }
        continue;
      }
      A cs = 0;
      if (Stats) {
        // One pass for all the sums; when this chunk raised the max, also the first column holding it
        // (earlier chunks' ties keep theirs).
        A cu = 0, cq = 0, cz = 0;
        int64_t first = len;
        if (new_max) {
#pragma omp simd reduction(+ : cs, cu, cq, cz) reduction(min : first)
          for (int64_t j = 0; j < len; ++j) {
            const A d = buf[j] - mi;
            const A e = fexp(d);
            cs += e;
            cu += e > 0 ? e * d : A(0);  // a -inf logit has e = 0 and adds 0, not 0 * -inf
            cq += e * e;
            cz += buf[j];
            first = (buf[j] == mi && j < first) ? j : first;
          }
          ai = col0 + c0 + first;
        } else {
#pragma omp simd reduction(+ : cs, cu, cq, cz)
          for (int64_t j = 0; j < len; ++j) {
            const A d = buf[j] - mi;
            const A e = fexp(d);
            cs += e;
            cu += e > 0 ? e * d : A(0);
            cq += e * e;
            cz += buf[j];
          }
        }
        ui += cu;
        qi += cq;
        zi += cz;
      } else {
#pragma omp simd reduction(+ : cs)
        for (int64_t j = 0; j < len; ++j) cs += fexp(buf[j] - mi);
      }
      si += cs;
    }
    m[i] = mi;
    s[i] = si;
    if (Stats) u[i] = ui, q[i] = qi, zsum[i] = zi, st.arg[i] = ai;
    const int64_t t = targets[i] - col0;
    if (t >= 0 && t < n) zt[i] = xform<Cap>(E::load(x + t), k);
  }
}

template <typename T>
void lse_rows(const void* base, const int64_t* rows, int64_t stride, int64_t n, int64_t r0, int64_t r1,
              const int64_t* targets, int64_t col0, const Xform& xf, const RowState& st) {
  const bool stats = st.u != nullptr;
  if (xf.cap > 0) {
    if (stats)
      lse_rows_impl<T, true, true>(base, rows, stride, n, r0, r1, targets, col0, xf, st);
    else
      lse_rows_impl<T, true, false>(base, rows, stride, n, r0, r1, targets, col0, xf, st);
  } else {
    if (stats)
      lse_rows_impl<T, false, true>(base, rows, stride, n, r0, r1, targets, col0, xf, st);
    else
      lse_rows_impl<T, false, false>(base, rows, stride, n, r0, r1, targets, col0, xf, st);
  }
}

// ---- backward: g * (onehot(y) - exp(z - lse)) * chain, one pass per row ----------------------
//
// Each element is read and then written in the same iteration, and the target column's input is
// read before the loop, so `out` may be `x` itself (the in-place backward).

template <typename T, bool Cap>
void grad_rows_impl(const void* xbase_, void* obase_, const int64_t* rows, int64_t sx, int64_t so, int64_t n,
                    int64_t r0, int64_t r1, const int64_t* targets, int64_t col0, const void* lse_,
                    const void* g_, const Xform& xf) {
  using A = typename AccOf<T>::type;
  using E = Elem<T, A>;
  const T* xbase = static_cast<const T*>(xbase_);
  T* obase = static_cast<T*>(obase_);
  const A* lse = static_cast<const A*>(lse_);
  const A* gs = static_cast<const A*>(g_);
  const XformConsts<A> k(xf, Cap);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t row = rows ? rows[i] : i;
    const T* x = xbase + row * sx;
    T* o = obase + row * so;
    const A L = lse[i], g = gs[i];
    const int64_t t = targets[i] - col0;
    const bool has_t = t >= 0 && t < n;
    A zt = 0, ct = 0;
    if (has_t) zt = xform_chain<Cap>(E::load(x + t), k, ct);
    if (Cap) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        A ch;
        A y = xform_chain<Cap>(E::load(x + j), k, ch);
        E::store(o + j, -g * fexp(y - L) * ch);
      }
    } else {
      const A gi = -g * k.post;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) E::store(o + j, gi * fexp(E::load(x + j) * k.post - L));
    }
    if (has_t) E::store(o + t, g * (A(1) - fexp(zt - L)) * ct);
  }
}

template <typename T>
void grad_rows(const void* xbase, void* obase, const int64_t* rows, int64_t sx, int64_t so, int64_t n, int64_t r0,
               int64_t r1, const int64_t* targets, int64_t col0, const void* lse, const void* g, const Xform& xf) {
  if (xf.cap > 0)
    grad_rows_impl<T, true>(xbase, obase, rows, sx, so, n, r0, r1, targets, col0, lse, g, xf);
  else
    grad_rows_impl<T, false>(xbase, obase, rows, sx, so, n, r0, r1, targets, col0, lse, g, xf);
}

}  // namespace

const KernelTable* table() {
  static const KernelTable t = {
      SPO_ISA_NAME,
      {&lse_rows<float>, &lse_rows<double>, &lse_rows<bf16_t>, &lse_rows<f16_t>},
      {&grad_rows<float>, &grad_rows<double>, &grad_rows<bf16_t>, &grad_rows<f16_t>},
  };
  return &t;
}

}  // namespace SPO_ISA
}  // namespace spo_cpu
