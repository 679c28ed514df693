// The fused-linear forward for a frozen head (linear_forward_frozen): leaves the backward no GEMM.
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "linear_blocks.h"
#include "ops.h"

namespace spo_cpu {

// Frozen head (weight and bias need no gradient): the backward needs only dhidden, and
// dh_t = g_s * u_t @ W with u_t = w_t (onehot - softmax(z_t)) * chain independent of g. So the forward
// takes tiles of tokens over the whole vocabulary (one GEMM), finishes their LSE, turns the tile into
// u in place and multiplies by W right away: two GEMMs per tile here and none in the backward,
// instead of one here and two (recompute + dz @ W) there.
// Returns (seq_logps [S], lse [nc], stats [4, nc] or None, u @ W [nc, H]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_frozen(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_offsets_in,
    const c10::optional<at::Tensor>& token_weights, double multiplier, double softcap, double temperature,
    bool stats, int64_t block_bytes) {
  check_linear(hidden, weight, bias_opt.has_value() ? *bias_opt : at::Tensor());
  const Xform xf = make_xform(multiplier, softcap, temperature);
  const auto acc = acc_type(hidden.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == acc && weight.scalar_type() == acc,
              "spo_kernels._cpu: linear_forward_frozen takes float32/float64 hidden and weight");
  const int di = dtype_index(acc);
  const int64_t V = weight.size(0), H = weight.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, token_weights, hidden.size(0), V, acc);
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const at::Tensor bias = bias_opt.has_value() ? as_acc(*bias_opt, acc) : at::Tensor();
  const auto opts = hidden.options().dtype(acc);
  const LseState st = lse_state(nc, opts, stats);
  at::Tensor lse = at::empty({nc}, opts);
  at::Tensor dh_unit = at::empty({nc, H}, opts);
  if (nc > 0 && V > 0) {
    const int64_t esz = c10::elementSize(acc);
    const int64_t tile = std::min(nc, std::max<int64_t>(kMinFrozenTile, block_bytes / std::max<int64_t>(1, V * esz)));
    at::Tensor zbuf = at::empty({tile * V}, opts);
    // The scale of each token's row of u: its weight (the backward multiplies by g_s).
    const at::Tensor scale = plan.token_weights.defined() ? plan.token_weights : at::ones({nc}, opts);
    const KernelTable* kt = kernels();
    const LseFn lse_fn = kt->lse[di];
    const GradFn grad_fn = kt->grad[di];
    for (int64_t t0 = 0; t0 < nc; t0 += tile) {
      const int64_t len = std::min(tile, nc - t0);
      const at::Tensor h = gather_tile(hidden, plan.token_idx, t0, len, acc);
      const at::Tensor z = logits_block(zbuf, h, weight, bias);
      void* zb = z.data_ptr();
      const RowState rs = st.rows_from(t0);
      char* lp = static_cast<char*>(lse.data_ptr()) + t0 * esz;
      const void* gp = static_cast<const char*>(scale.data_ptr()) + t0 * esz;
      const int64_t* tgt = plan.targets.data_ptr<int64_t>() + t0;
      at::parallel_for(0, len, grain_for(V), [&](int64_t r0, int64_t r1) {
        lse_fn(zb, nullptr, V, V, r0, r1, tgt, 0, xf, rs);
        AT_DISPATCH_FLOATING_TYPES(acc, "spo_frozen_lse", [&] {
          const scalar_t* mm = static_cast<const scalar_t*>(rs.m);
          const scalar_t* ss = static_cast<const scalar_t*>(rs.s);
          scalar_t* ll = reinterpret_cast<scalar_t*>(lp);
          for (int64_t r = r0; r < r1; ++r) ll[r] = mm[r] + std::log(ss[r]);
        });
        grad_fn(zb, zb, nullptr, V, V, V, r0, r1, tgt, 0, lp, gp, xf);
      });
      at::Tensor dh_t = dh_unit.narrow(0, t0, len);
      at::mm_out(dh_t, z, weight);
    }
  }
  const ForwardResult res = finish_forward(st, plan, seq_offsets, V);
  return {res.seq_logps, res.lse, res.stats, dh_unit};
}

}  // namespace spo_cpu
