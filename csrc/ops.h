// The entry points of spo_kernels._cpu (bound to Python in bindings.cpp; the contract is
// spo_kernels/backends/base.py) and the shared machinery of the logits and fused-linear paths.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"
#include "row_kernels_api.h"

namespace spo_cpu {

// ---- instruction-set dispatch (isa.cpp) -------------------------------------------------------

// The row-kernel table in use (the best variant this CPU runs, unless pinned by set_isa).
const KernelTable* kernels();
// Pin the row kernels to "generic", "avx2" or "avx512" (false if this CPU lacks it), or "auto".
bool set_isa(const std::string& isa);
// Name of the variant in use.
std::string isa();

// ---- per-token state (token_state.cpp) --------------------------------------------------------

// The transform's arguments, checked: multiplier finite and nonzero, temperature finite and > 0,
// softcap <= 0 meaning off.
Xform make_xform(double multiplier, double softcap, double temperature);

// Per-token state of the online log-sum-exp over a plan of nc tokens (row_kernels_api.h's RowState).
struct LseState {
  at::Tensor m, s, zt;  // [nc] running max, sum of exp(z - m), transformed target logit
  at::Tensor stats;     // [3, nc]: u, q, zsum of RowState; undefined without statistics
  at::Tensor arg;       // [nc] int64 column of the first maximum; undefined without statistics
  // The kernels' view of plan tokens [t0, nc).
  RowState rows_from(int64_t t0) const;
};
LseState lse_state(int64_t nc, const at::TensorOptions& opts, bool stats);

struct ForwardResult {
  at::Tensor seq_logps;  // [S] float64: sum_t w_t logp_t per sequence
  at::Tensor lse;        // [nc] accumulation dtype
  at::Tensor stats;      // [4, nc] entropy, log sum p^2, mean logit, is_argmax (0/1); undefined when off
};

// The forward's results from the finished per-token state (sums in plan order, in float64: SPEC 7).
ForwardResult finish_forward(const LseState& st, const PlanRows& plan, const at::Tensor& seq_offsets, int64_t V);

// g_t = grad_seq[seq_id[t]] * w_t per plan token, in `acc`, contiguous.
at::Tensor token_grads(const at::Tensor& grad_seq, const at::Tensor& seq_id, const PlanRows& plan,
                       at::ScalarType acc);

// Rows per parallel_for grain for rows of `cols` columns (~16k elements per grain).
inline int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// ---- logits path (logits.cpp) ----------------------------------------------------------------
//
// Shared arguments: the plan (token_idx [nc] rows, targets [nc], token_weights [nc] or None,
// seq_offsets [S+1] in the forward, seq_id [nc] in the backward) and the transform (multiplier,
// softcap <= 0 for none, temperature). Forwards return (seq_logps [S] float64, lse [nc], stats [4, nc]
// or None), stats only when `stats` is true.

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_forward(
    const at::Tensor& logits, const at::Tensor& token_idx, const at::Tensor& targets,
    const at::Tensor& seq_offsets, const c10::optional<at::Tensor>& token_weights, double multiplier,
    double softcap, double temperature, bool stats);

void logits_backward(const at::Tensor& logits, const at::Tensor& token_idx, const at::Tensor& targets,
                     const at::Tensor& seq_id, const c10::optional<at::Tensor>& token_weights, const at::Tensor& lse,
                     const at::Tensor& grad_seq, double multiplier, double softcap, double temperature,
                     at::Tensor out);

// ---- fused-linear path (linear.cpp, linear_frozen.cpp) --------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& token_idx, const at::Tensor& targets, const at::Tensor& seq_offsets,
    const c10::optional<at::Tensor>& token_weights, double multiplier, double softcap, double temperature,
    bool stats, int64_t block_bytes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& token_idx, const at::Tensor& targets, const at::Tensor& seq_id,
    const c10::optional<at::Tensor>& token_weights, const at::Tensor& lse, const at::Tensor& grad_seq,
    double multiplier, double softcap, double temperature, bool need_hidden, bool need_weight, bool need_bias,
    int64_t block_bytes, bool bf16_grad_gemms);

// Frozen head: also returns w_t (onehot - softmax) @ W [nc, H], the backward's dhidden rows up to g_s.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_frozen(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& token_idx, const at::Tensor& targets, const at::Tensor& seq_offsets,
    const c10::optional<at::Tensor>& token_weights, double multiplier, double softcap, double temperature,
    bool stats, int64_t block_bytes);

}  // namespace spo_cpu
