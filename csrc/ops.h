// The entry points of spo_kernels._cpu (bound to Python in bindings.cpp; the contract is
// spo_kernels/backends/base.py) and the shared machinery of the logits and fused-linear paths.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "row_kernels_api.h"

namespace spo_cpu {

// ---- instruction-set dispatch (isa.cpp) -------------------------------------------------------

// The row-kernel table in use (the best variant this CPU runs, unless pinned by set_isa).
const KernelTable* kernels();
// Pin the row kernels to "generic", "avx2" or "avx512" (false if this CPU lacks it), or "auto".
bool set_isa(const std::string& isa);
// Name of the variant in use.
std::string isa();

// ---- per-token state of the forward (forward_state.cpp) ----------------------------------------

// Online log-sum-exp per plan token: running max, sum of exp(z - max), transformed target logit.
struct LseState {
  at::Tensor m, s, zt;
};
LseState lse_state(int64_t nc, const at::TensorOptions& opts);

// (seq_logps [S] float64, lse [nc]) from the per-token state; per-sequence sums in plan order in
// float64 (SPEC 7).
std::tuple<at::Tensor, at::Tensor> finish_forward(const LseState& st, const at::Tensor& seq_offsets);

// Softcap argument of the row kernels: <= 0 means off.
inline double cap_arg(double softcap) { return softcap > 0 ? softcap : 0.0; }

// Rows per parallel_for grain for rows of `cols` columns (~16k elements per grain).
inline int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// ---- logits path (logits.cpp) ----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> logits_forward(const at::Tensor& logits, const at::Tensor& token_idx,
                                                  const at::Tensor& targets, const at::Tensor& seq_offsets,
                                                  double softcap, double temperature);

void logits_backward(const at::Tensor& logits, const at::Tensor& token_idx, const at::Tensor& targets,
                     const at::Tensor& seq_id, const at::Tensor& lse, const at::Tensor& grad_seq, double softcap,
                     double temperature, at::Tensor out);

// ---- fused-linear path (linear.cpp, linear_frozen.cpp) --------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& token_idx,
                                                  const at::Tensor& targets, const at::Tensor& seq_offsets,
                                                  double softcap, double temperature, int64_t block_bytes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& token_idx, const at::Tensor& targets, const at::Tensor& seq_id, const at::Tensor& lse,
    const at::Tensor& grad_seq, double softcap, double temperature, bool need_hidden, bool need_weight,
    bool need_bias, int64_t block_bytes, bool bf16_grad_gemms);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_frozen(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& token_idx, const at::Tensor& targets, const at::Tensor& seq_offsets, double softcap,
    double temperature, int64_t block_bytes);

}  // namespace spo_cpu
