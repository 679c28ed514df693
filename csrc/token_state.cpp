// Per-token state shared by the logits and fused-linear paths: the forward's online log-sum-exp (and
// statistics) and its reduction to per-sequence sums; the backward's per-token gradient scale.
#include <cmath>
#include <limits>

#include "ops.h"

namespace spo_cpu {

Xform make_xform(double multiplier, double softcap, double temperature) {
  TORCH_CHECK(std::isfinite(multiplier) && multiplier != 0.0,
              "spo_kernels._cpu: multiplier must be finite and nonzero, got ", multiplier);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "spo_kernels._cpu: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(!std::isnan(softcap) && !std::isinf(softcap), "spo_kernels._cpu: softcap must be finite (<= 0: off)");
  return Xform{multiplier, softcap > 0 ? softcap : 0.0, 1.0 / temperature};
}

LseState lse_state(int64_t nc, const at::TensorOptions& opts, bool stats) {
  LseState st{at::full({nc}, -std::numeric_limits<double>::infinity(), opts), at::zeros({nc}, opts),
              at::zeros({nc}, opts), at::Tensor(), at::Tensor()};
  if (stats) {
    st.stats = at::zeros({3, nc}, opts);  // u, q, zsum
    st.arg = at::zeros({nc}, opts.dtype(at::kLong));
  }
  return st;
}

RowState LseState::rows_from(int64_t t0) const {
  const int64_t esz = m.element_size();
  auto at_row = [&](const at::Tensor& x) { return static_cast<void*>(static_cast<char*>(x.data_ptr()) + t0 * esz); };
  RowState r{at_row(m), at_row(s), at_row(zt), nullptr, nullptr, nullptr, nullptr};
  if (stats.defined()) {
    r.u = at_row(stats[0]);
    r.q = at_row(stats[1]);
    r.zsum = at_row(stats[2]);
    r.arg = arg.data_ptr<int64_t>() + t0;
  }
  return r;
}

// Rounding the per-sequence sums to fp32 cost ~5e-4 of a DPO loss at 8k tokens: they are float64.
ForwardResult finish_forward(const LseState& st, const PlanRows& plan, const at::Tensor& seq_offsets, int64_t V) {
  const int64_t nc = st.m.size(0);
  const int64_t S = seq_offsets.size(0) - 1;
  ForwardResult res;
  res.lse = at::empty_like(st.m);
  res.seq_logps = at::zeros({S}, st.m.options().dtype(at::kDouble));
  if (st.stats.defined()) res.stats = at::empty({4, nc}, st.m.options());
  const int64_t* off = seq_offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(st.m.scalar_type(), "spo_finish_forward", [&] {
    const scalar_t* mp = st.m.data_ptr<scalar_t>();
    const scalar_t* sp = st.s.data_ptr<scalar_t>();
    const scalar_t* zp = st.zt.data_ptr<scalar_t>();
    const scalar_t* wp = plan.token_weights.defined() ? plan.token_weights.data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = res.lse.data_ptr<scalar_t>();
    double* qp = res.seq_logps.data_ptr<double>();
    for (int64_t i = 0; i < nc; ++i) lp[i] = mp[i] + std::log(sp[i]);
    // Per-sequence sums of w_t logp_t, in plan order and in double: deterministic and accurate.
    for (int64_t q = 0; q < S; ++q) {
      double acc = 0.0;
      if (wp)
        for (int64_t i = off[q]; i < off[q + 1]; ++i) acc += double(wp[i]) * (double(zp[i]) - double(lp[i]));
      else
        for (int64_t i = off[q]; i < off[q + 1]; ++i) acc += double(zp[i]) - double(lp[i]);
      qp[q] = acc;
    }
    if (res.stats.defined()) {
      // SPEC 8 from the state relative to the max m: e = exp(z - m), s = sum e, u = sum e (z - m),
      // q = sum e^2. H = lse - sum p z = log s - u / s; log sum p^2 = log q - 2 log s.
      const scalar_t* up = st.stats[0].data_ptr<scalar_t>();
      const scalar_t* qq = st.stats[1].data_ptr<scalar_t>();
      const scalar_t* zs = st.stats[2].data_ptr<scalar_t>();
      const int64_t* ap = st.arg.data_ptr<int64_t>();
      const int64_t* tg = plan.targets.data_ptr<int64_t>();
      scalar_t* out = res.stats.data_ptr<scalar_t>();
      const scalar_t inv_v = scalar_t(1) / scalar_t(V);
      for (int64_t i = 0; i < nc; ++i) {
        const scalar_t log_s = std::log(sp[i]);
        out[i] = log_s - up[i] / sp[i];
        out[nc + i] = std::log(qq[i]) - 2 * log_s;
        out[2 * nc + i] = zs[i] * inv_v;
        out[3 * nc + i] = ap[i] == tg[i] ? scalar_t(1) : scalar_t(0);
      }
    }
  });
  return res;
}

at::Tensor token_grads(const at::Tensor& grad_seq, const at::Tensor& seq_id, const PlanRows& plan,
                       at::ScalarType acc) {
  TORCH_CHECK(grad_seq.dim() == 1 && grad_seq.device().is_cpu(), "spo_kernels._cpu: grad_seq must be CPU [S]");
  at::Tensor g = grad_seq.to(acc).index_select(0, seq_id);
  if (plan.token_weights.defined()) g.mul_(plan.token_weights);
  return g.contiguous();
}

}  // namespace spo_cpu
