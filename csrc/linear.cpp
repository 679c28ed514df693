// The fused-linear path (forward and backward).
//
// Each (token tile, vocabulary block) is one BLAS GEMM (+ bias through addmm), then the per-row
// kernels of row_kernels.h run on it in place:
//   forward:  online log-sum-exp across blocks (running max and sum per token), target logit picked
//             from the block that holds it;
//   backward: dz = g * (onehot - exp(z - lse)) * chain in place, then dh_tile += dz @ W_blk and
//             dW_blk = dz^T @ h_tile (+= over token tiles): every dW block is produced by GEMMs with
//             K = tokens and written once, never re-read per token chunk.
// The full [tokens, V] logits never exist. Everything is in fixed order (no atomics), so results
// are deterministic. bf16/fp16 operands are upcast to fp32 per tile / per block for the logits
// GEMMs (a bf16 GEMM would round the logits to bf16); with bf16 operands on a CPU with native bf16
// GEMMs the two gradient GEMMs take dz rounded to bf16 (bf16_grad_gemms).
#include <ATen/Parallel.h>

#include "checks.h"
#include "linear_blocks.h"
#include "ops.h"

namespace spo_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_offsets_in,
    const c10::optional<at::Tensor>& token_weights, double multiplier, double softcap, double temperature,
    bool stats, int64_t block_bytes) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  check_linear(hidden, weight, bias);
  const Xform xf = make_xform(multiplier, softcap, temperature);
  const auto acc = acc_type(hidden.scalar_type());
  const int di = dtype_index(acc);
  const int64_t V = weight.size(0);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, token_weights, hidden.size(0), V, acc);
  const at::Tensor& token_idx = plan.token_idx;
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const auto opts = hidden.options().dtype(acc);
  const LseState st = lse_state(nc, opts, stats);
  if (nc > 0 && V > 0) {
    const int64_t esz = c10::elementSize(acc);
    const Tiling tl = make_tiling(nc, V, esz, block_bytes);
    const int64_t ntiles = (nc + tl.tile - 1) / tl.tile;
    at::Tensor zbuf = at::empty({tl.tile * tl.block}, opts);
    at::Tensor h_single = ntiles == 1 ? gather_tile(hidden, token_idx, 0, nc, acc) : at::Tensor();
    const LseFn fn = kernels()->lse[di];
    const int64_t* tg = plan.targets.data_ptr<int64_t>();
    for (int64_t v0 = 0; v0 < V; v0 += tl.block) {
      const int64_t vb = std::min(tl.block, V - v0);
      const at::Tensor w_blk = as_acc(weight.narrow(0, v0, vb), acc);
      const at::Tensor b_blk = bias.defined() ? as_acc(bias.narrow(0, v0, vb), acc) : at::Tensor();
      for (int64_t t0 = 0; t0 < nc; t0 += tl.tile) {
        const int64_t len = std::min(tl.tile, nc - t0);
        const at::Tensor h = ntiles == 1 ? h_single : gather_tile(hidden, token_idx, t0, len, acc);
        const at::Tensor z = logits_block(zbuf, h, w_blk, b_blk);
        const void* zb = z.data_ptr();
        const RowState rs = st.rows_from(t0);
        const int64_t* tgt = tg + t0;
        at::parallel_for(0, len, grain_for(vb), [&](int64_t r0, int64_t r1) {
          fn(zb, nullptr, vb, vb, r0, r1, tgt, v0, xf, rs);
        });
      }
    }
  }
  const ForwardResult res = finish_forward(st, plan, seq_offsets, V);
  return {res.seq_logps, res.lse, res.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_id_in,
    const c10::optional<at::Tensor>& token_weights, const at::Tensor& lse_in, const at::Tensor& grad_seq,
    double multiplier, double softcap, double temperature, bool need_hidden, bool need_weight, bool need_bias,
    int64_t block_bytes, bool bf16_grad_gemms) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  check_linear(hidden, weight, bias);
  need_bias = need_bias && bias.defined();
  const Xform xf = make_xform(multiplier, softcap, temperature);
  const auto acc = acc_type(hidden.scalar_type());
  const int di = dtype_index(acc);
  const int64_t V = weight.size(0), H = weight.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, token_weights, hidden.size(0), V, acc);
  const at::Tensor& token_idx = plan.token_idx;
  const int64_t nc = plan.nc;
  const at::Tensor seq_id = checked_seq_id(seq_id_in, nc, grad_seq.size(0));
  const at::Tensor lse = checked_per_token(lse_in, nc, acc, "lse");
  const at::Tensor g_tok = token_grads(grad_seq, seq_id, plan, acc);
  const auto opts = hidden.options().dtype(acc);

  at::Tensor dh = need_hidden ? at::zeros_like(hidden, at::MemoryFormat::Contiguous) : at::Tensor();
  // dW / db in the parameter's dtype; blocks are computed in the accumulation dtype and written once.
  at::Tensor dw = need_weight ? at::empty({V, H}, weight.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::Tensor();
  at::Tensor db = need_bias ? at::empty({V}, bias.options()) : at::Tensor();
  if (nc == 0 || V == 0 || !(need_hidden || need_weight || need_bias)) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
    return {dh, dw, db};
  }
  const int64_t esz = c10::elementSize(acc);
  const Tiling tl = make_tiling(nc, V, esz, block_bytes);
  const int64_t ntiles = (nc + tl.tile - 1) / tl.tile;
  at::Tensor zbuf = at::empty({tl.tile * tl.block}, opts);
  at::Tensor h_single = ntiles == 1 ? gather_tile(hidden, token_idx, 0, nc, acc) : at::Tensor();
  at::Tensor dh_acc = need_hidden ? at::zeros({nc, H}, opts) : at::Tensor();
  // bf16 operands on a CPU with native bf16 GEMMs: the logits (forward and recompute) stay fp32
  // GEMMs, but dz (rounded to bf16) @ W and dz^T @ h run as bf16 GEMMs accumulating in fp32; their
  // results are bf16 gradients anyway (dh blocks are summed in fp32).
  const bool lowp = bf16_grad_gemms && hidden.scalar_type() == at::kBFloat16 &&
                    weight.scalar_type() == at::kBFloat16 && (need_hidden || need_weight);
  at::Tensor h_single_lp = lowp && need_weight && ntiles == 1 ? hidden.index_select(0, token_idx) : at::Tensor();
  at::Tensor zlp_buf = lowp ? at::empty({tl.tile * tl.block}, hidden.options()) : at::Tensor();
  // dW blocks go straight into dw when it has the GEMM's output dtype and one GEMM makes each block;
  // else through an fp32 block buffer.
  const bool dw_direct = need_weight && (weight.scalar_type() == acc || (lowp && ntiles == 1));
  at::Tensor dwbuf = need_weight && !dw_direct ? at::empty({tl.block, H}, opts) : at::Tensor();
  at::Tensor dbbuf = need_bias ? at::empty({tl.block}, opts) : at::Tensor();
  const GradFn fn = kernels()->grad[di];
  const int64_t* tg = plan.targets.data_ptr<int64_t>();

  for (int64_t v0 = 0; v0 < V; v0 += tl.block) {
    const int64_t vb = std::min(tl.block, V - v0);
    const at::Tensor w_blk = as_acc(weight.narrow(0, v0, vb), acc);
    const at::Tensor b_blk = bias.defined() ? as_acc(bias.narrow(0, v0, vb), acc) : at::Tensor();
    at::Tensor dw_blk = need_weight ? (dw_direct ? dw.narrow(0, v0, vb) : dwbuf.narrow(0, 0, vb)) : at::Tensor();
    at::Tensor db_blk = need_bias ? dbbuf.narrow(0, 0, vb) : at::Tensor();
    for (int64_t t0 = 0; t0 < nc; t0 += tl.tile) {
      const int64_t len = std::min(tl.tile, nc - t0);
      const at::Tensor h = ntiles == 1 ? h_single : gather_tile(hidden, token_idx, t0, len, acc);
      at::Tensor z = logits_block(zbuf, h, w_blk, b_blk);
      void* zb = z.data_ptr();
      const void* lp = static_cast<const char*>(lse.data_ptr()) + t0 * esz;
      const void* gp = static_cast<const char*>(g_tok.data_ptr()) + t0 * esz;
      const int64_t* tgt = tg + t0;
      at::parallel_for(0, len, grain_for(vb), [&](int64_t r0, int64_t r1) {
        fn(zb, zb, nullptr, vb, vb, vb, r0, r1, tgt, v0, lp, gp, xf);
      });
      // z now holds dz for this (token tile, vocabulary block).
      if (lowp) {
        at::Tensor dz = zlp_buf.narrow(0, 0, len * vb).view({len, vb});
        dz.copy_(z);
        if (need_hidden) dh_acc.narrow(0, t0, len).add_(at::mm(dz, weight.narrow(0, v0, vb)));
        if (need_weight) {
          const at::Tensor h_lp = ntiles == 1 ? h_single_lp : hidden.index_select(0, token_idx.narrow(0, t0, len));
          if (dw_direct)
            at::mm_out(dw_blk, dz.t(), h_lp);
          else if (t0 == 0)
            dw_blk.copy_(at::mm(dz.t(), h_lp));
          else
            dw_blk.add_(at::mm(dz.t(), h_lp));
        }
      } else {
        if (need_hidden) {
          at::Tensor dh_t = dh_acc.narrow(0, t0, len);
          dh_t.addmm_(z, w_blk);
        }
        if (need_weight) {
          if (t0 == 0)
            at::mm_out(dw_blk, z.t(), h);
          else
            dw_blk.addmm_(z.t(), h);
        }
      }
      if (need_bias) {
        if (t0 == 0)
          at::sum_out(db_blk, z, at::IntArrayRef{0});
        else
          db_blk.add_(z.sum(0));
      }
    }
    if (need_weight && !dw_direct) dw.narrow(0, v0, vb).copy_(dw_blk);
    if (need_bias) db.narrow(0, v0, vb).copy_(db_blk);
  }
  if (need_hidden) dh.index_copy_(0, token_idx, dh_acc.scalar_type() == dh.scalar_type() ? dh_acc : dh_acc.to(dh.scalar_type()));
  return {dh, dw, db};
}

}  // namespace spo_cpu
