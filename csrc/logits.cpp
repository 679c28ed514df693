// The logits path: one pass per plan row, parallel over rows (at::parallel_for), through the per-row
// kernels of row_kernels.h: fused transform + online max/sum-exp in the forward; fused transform +
// exp + normalize + one-hot in the backward, written straight into the output row (which may be the
// input row: the in-place backward).
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace spo_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_forward(
    const at::Tensor& logits_in, const at::Tensor& token_idx_in, const at::Tensor& targets_in,
    const at::Tensor& seq_offsets_in, const c10::optional<at::Tensor>& token_weights, double multiplier,
    double softcap, double temperature, bool stats) {
  check_logits(logits_in);
  const Xform xf = make_xform(multiplier, softcap, temperature);
  const at::Tensor logits = row_contiguous(logits_in);
  const int di = dtype_index(logits.scalar_type());
  const auto acc = acc_type(logits.scalar_type());
  const int64_t V = logits.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, token_weights, logits.size(0), V, acc);
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const LseState st = lse_state(nc, logits.options().dtype(acc), stats);
  if (nc > 0 && V > 0) {
    const LseFn fn = kernels()->lse[di];
    const void* base = logits.data_ptr();
    const int64_t stride = logits.stride(0);
    const int64_t* rows = plan.token_idx.data_ptr<int64_t>();
    const int64_t* tg = plan.targets.data_ptr<int64_t>();
    const RowState rs = st.rows_from(0);
    at::parallel_for(0, nc, grain_for(V), [&](int64_t r0, int64_t r1) {
      fn(base, rows, stride, V, r0, r1, tg, 0, xf, rs);
    });
  }
  const ForwardResult res = finish_forward(st, plan, seq_offsets, V);
  return {res.seq_logps, res.lse, res.stats};
}

void logits_backward(const at::Tensor& logits_in, const at::Tensor& token_idx_in, const at::Tensor& targets_in,
                     const at::Tensor& seq_id_in, const c10::optional<at::Tensor>& token_weights,
                     const at::Tensor& lse_in, const at::Tensor& grad_seq, double multiplier, double softcap,
                     double temperature, at::Tensor out) {
  check_logits(logits_in);
  TORCH_CHECK(out.sizes() == logits_in.sizes() && out.scalar_type() == logits_in.scalar_type(),
              "spo_kernels._cpu: out must match logits' shape and dtype");
  const Xform xf = make_xform(multiplier, softcap, temperature);
  const at::Tensor logits = row_contiguous(logits_in);
  const int di = dtype_index(logits.scalar_type());
  const auto acc = acc_type(logits.scalar_type());
  const int64_t N = logits.size(0), V = logits.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, token_weights, N, V, acc);
  const int64_t nc = plan.nc;
  const at::Tensor seq_id = checked_seq_id(seq_id_in, nc, grad_seq.size(0));
  const at::Tensor lse = checked_per_token(lse_in, nc, acc, "lse");
  const at::Tensor g_tok = token_grads(grad_seq, seq_id, plan, acc);
  // Write into a row-contiguous target; copied back at the end when `out` is not one.
  const bool direct = out.stride(-1) == 1;
  at::Tensor dst = direct ? out : at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t so = dst.stride(0);
  const int64_t elsize = dst.element_size();
  char* dbase = static_cast<char*>(dst.data_ptr());
  // Rows outside the plan are zeroed.
  std::vector<uint8_t> in_plan(N, 0);
  const int64_t* rows = plan.token_idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < nc; ++i) in_plan[rows[i]] = 1;
  if (V > 0) {
    at::parallel_for(0, N, grain_for(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        if (!in_plan[r]) std::memset(dbase + r * so * elsize, 0, V * elsize);
    });
  }
  if (nc > 0 && V > 0) {
    const GradFn fn = kernels()->grad[di];
    const void* xb = logits.data_ptr();
    const int64_t sx = logits.stride(0);
    const int64_t* tg = plan.targets.data_ptr<int64_t>();
    const void *lp = lse.data_ptr(), *gp = g_tok.data_ptr();
    void* ob = dst.data_ptr();
    at::parallel_for(0, nc, grain_for(V), [&](int64_t r0, int64_t r1) {
      fn(xb, ob, rows, sx, so, V, r0, r1, tg, 0, lp, gp, xf);
    });
  }
  if (!direct) out.copy_(dst);
}

}  // namespace spo_cpu
