// Validation of the arguments every entry point of spo_kernels._cpu receives, and the small
// dtype helpers they share. The ops index raw memory with the plan, so a malformed plan must be an
// error (RuntimeError naming the argument) before any kernel runs, never a crash or a wrong number.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace spo_cpu {

// Index of a floating dtype in the row-kernel tables (row_kernels_api.h); errors on other dtypes.
int dtype_index(at::ScalarType t);

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x itself when its rows are contiguous (last stride 1), else a contiguous copy.
inline at::Tensor row_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// x in the dtype `acc` (no copy when it already is).
inline at::Tensor as_acc(const at::Tensor& x, at::ScalarType acc) { return x.scalar_type() == acc ? x : x.to(acc); }

// The plan's token rows, targets and optional token weights, checked: token_idx and targets int64,
// 1-D, CPU, equal lengths, rows in [0, num_rows) and targets in [0, V); token_weights (when given)
// floating [nc] on the CPU, converted to the accumulation dtype. All contiguous.
struct PlanRows {
  at::Tensor token_idx, targets;
  at::Tensor token_weights;  // undefined: every weight is 1
  int64_t nc;                // number of plan tokens
};

// The one gate every entry point passes its plan through.
PlanRows checked_plan(const at::Tensor& token_idx, const at::Tensor& targets,
                      const c10::optional<at::Tensor>& token_weights, int64_t num_rows, int64_t V,
                      at::ScalarType acc);

// seq_offsets [S+1] (forward): int64, rising from 0 to nc; returned contiguous.
at::Tensor checked_offsets(const at::Tensor& seq_offsets, int64_t nc);

// seq_id [nc] (backward): int64, values in [0, num_seqs); returned contiguous.
at::Tensor checked_seq_id(const at::Tensor& seq_id, int64_t nc, int64_t num_seqs);

// Per-token values saved by the forward (lse [nc]), in `acc`, contiguous.
at::Tensor checked_per_token(const at::Tensor& x, int64_t nc, at::ScalarType acc, const char* name);

// logits [N, V] on the CPU in a supported dtype.
void check_logits(const at::Tensor& logits);

// hidden [N, H] and weight [V, H] on the CPU in supported dtypes; bias [V] when given.
void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace spo_cpu
