// Argument validation shared by every entry point (see checks.h).
#include "checks.h"

#include "row_kernels_api.h"

namespace spo_cpu {
namespace {

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "spo_kernels._cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1, "spo_kernels._cpu: ", name, " must be 1-D int64");
}

// Values of an int64 index tensor in [0, hi): out-of-range plans would read or write out of bounds.
void check_range(const at::Tensor& t, int64_t hi, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= (p[i] >= 0) & (p[i] < hi);
  TORCH_CHECK(ok, "spo_kernels._cpu: ", name, " has values outside [0, ", hi, ")");
}

}  // namespace

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "spo_kernels._cpu: unsupported dtype ", t, " (float32/float64/bfloat16/float16)");
  }
  return -1;
}

PlanRows checked_plan(const at::Tensor& token_idx_in, const at::Tensor& targets_in,
                      const c10::optional<at::Tensor>& token_weights, int64_t num_rows, int64_t V,
                      at::ScalarType acc) {
  check_index(token_idx_in, "token_idx");
  check_index(targets_in, "targets");
  PlanRows p{token_idx_in.contiguous(), targets_in.contiguous(), at::Tensor(), token_idx_in.size(0)};
  TORCH_CHECK(p.targets.size(0) == p.nc, "spo_kernels._cpu: targets and token_idx differ in length");
  check_range(p.token_idx, num_rows, "token_idx");
  check_range(p.targets, V, "targets");
  if (token_weights.has_value() && token_weights->defined())
    p.token_weights = checked_per_token(*token_weights, p.nc, acc, "token_weights");
  return p;
}

at::Tensor checked_offsets(const at::Tensor& seq_offsets_in, int64_t nc) {
  check_index(seq_offsets_in, "seq_offsets");
  at::Tensor off = seq_offsets_in.contiguous();
  const int64_t* p = off.data_ptr<int64_t>();
  const int64_t n = off.numel();
  bool ok = n >= 1 && p[0] == 0 && p[n - 1] == nc;
  for (int64_t i = 1; ok && i < n; ++i) ok = p[i] >= p[i - 1];
  TORCH_CHECK(ok, "spo_kernels._cpu: seq_offsets must rise from 0 to the number of plan tokens (", nc, ")");
  return off;
}

at::Tensor checked_seq_id(const at::Tensor& seq_id_in, int64_t nc, int64_t num_seqs) {
  check_index(seq_id_in, "seq_id");
  TORCH_CHECK(seq_id_in.size(0) == nc, "spo_kernels._cpu: seq_id and token_idx differ in length");
  at::Tensor seq_id = seq_id_in.contiguous();
  check_range(seq_id, num_seqs, "seq_id");
  return seq_id;
}

at::Tensor checked_per_token(const at::Tensor& x, int64_t nc, at::ScalarType acc, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.size(0) == nc, "spo_kernels._cpu: ", name,
              " must be a CPU tensor [", nc, "] (one value per plan token)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "spo_kernels._cpu: ", name, " must be floating point");
  return as_acc(x, acc).contiguous();
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "spo_kernels._cpu: logits must be CPU [N, V]");
  dtype_index(logits.scalar_type());
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "spo_kernels._cpu: hidden [N, H] and weight [V, H] expected");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "spo_kernels._cpu: CPU tensors expected");
  dtype_index(hidden.scalar_type());
  dtype_index(weight.scalar_type());
  if (bias.defined())
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0) && bias.device().is_cpu(),
                "spo_kernels._cpu: bias must be a CPU tensor [V]");
}

}  // namespace spo_cpu
