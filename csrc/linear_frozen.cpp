// The fused-linear forward for a frozen head (linear_forward_frozen): leaves the backward no GEMM.
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "linear_blocks.h"
#include "ops.h"

namespace spo_cpu {

// Frozen head (weight and bias need no gradient): the backward needs only dhidden, and
// dh_t = g_s * u_t @ W with u_t = (onehot - softmax(z_t)) * chain independent of g. So the forward
// takes tiles of tokens over the whole vocabulary (one GEMM), finishes their LSE, turns the tile into
// u in place and multiplies by W right away: two GEMMs per tile here and none in the backward,
// instead of one here and two (recompute + dz @ W) there. Returns (seq_logps, lse, u @ W [Nc, H]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_frozen(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_offsets_in,
    double softcap, double temperature, int64_t block_bytes) {
  check_linear(hidden, weight, bias_opt.has_value() ? *bias_opt : at::Tensor());
  const auto acc = acc_type(hidden.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == acc && weight.scalar_type() == acc,
              "spo_kernels._cpu: linear_forward_frozen takes float32/float64 hidden and weight");
  const int di = dtype_index(acc);
  const int64_t V = weight.size(0), H = weight.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, hidden.size(0), V);
  const at::Tensor &token_idx = plan.token_idx, &targets = plan.targets;
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const at::Tensor bias = bias_opt.has_value() ? as_acc(*bias_opt, acc) : at::Tensor();
  const auto opts = hidden.options().dtype(acc);
  const LseState st = lse_state(nc, opts);
  const at::Tensor &m = st.m, &s = st.s, &zt = st.zt;
  at::Tensor lse = at::empty({nc}, opts);
  at::Tensor dh_unit = at::empty({nc, H}, opts);
  if (nc > 0 && V > 0) {
    const int64_t esz = c10::elementSize(acc);
    const int64_t tile = std::min(nc, std::max<int64_t>(kMinFrozenTile, block_bytes / std::max<int64_t>(1, V * esz)));
    at::Tensor zbuf = at::empty({tile * V}, opts);
    at::Tensor ones = at::ones({tile}, opts);
    const KernelTable* kt = kernels();
    const LseFn lse_fn = kt->lse[di];
    const GradFn grad_fn = kt->grad[di];
    const double cap = cap_arg(softcap), inv_t = 1.0 / temperature;
    for (int64_t t0 = 0; t0 < nc; t0 += tile) {
      const int64_t len = std::min(tile, nc - t0);
      const at::Tensor h = gather_tile(hidden, token_idx, t0, len, acc);
      const at::Tensor z = logits_block(zbuf, h, weight, bias);
      void* zb = z.data_ptr();
      char* mp = static_cast<char*>(m.data_ptr()) + t0 * esz;
      char* sp = static_cast<char*>(s.data_ptr()) + t0 * esz;
      char* zp = static_cast<char*>(zt.data_ptr()) + t0 * esz;
      char* lp = static_cast<char*>(lse.data_ptr()) + t0 * esz;
      const void* gp = ones.data_ptr();
      const int64_t* tgt = targets.data_ptr<int64_t>() + t0;
      at::parallel_for(0, len, grain_for(V), [&](int64_t r0, int64_t r1) {
        lse_fn(zb, nullptr, V, V, r0, r1, tgt, 0, cap, inv_t, mp, sp, zp);
        AT_DISPATCH_FLOATING_TYPES(acc, "spo_frozen_lse", [&] {
          const scalar_t* mm = reinterpret_cast<const scalar_t*>(mp);
          const scalar_t* ss = reinterpret_cast<const scalar_t*>(sp);
          scalar_t* ll = reinterpret_cast<scalar_t*>(lp);
          for (int64_t r = r0; r < r1; ++r) ll[r] = mm[r] + std::log(ss[r]);
        });
        grad_fn(zb, zb, nullptr, V, V, V, r0, r1, tgt, 0, lp, gp, cap, inv_t);
      });
      at::Tensor dh_t = dh_unit.narrow(0, t0, len);
      at::mm_out(dh_t, z, weight);
    }
  }
  auto res = finish_forward(st, seq_offsets);
  return {std::get<0>(res), std::get<1>(res), dh_unit};
}

}  // namespace spo_cpu
