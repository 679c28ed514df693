// spo_kernels._cpu: the cpu backend's four ops (see spo_kernels/backends/__init__.py for the contract).
//
// Logits path: one pass per plan row, parallel over rows (at::parallel_for), through the per-row
// kernels of row_kernels.h (fused transform + online max/sum-exp forward; fused transform + exp +
// normalize + one-hot backward writing straight into the output row, which may be the input row).
//
// Fused-linear path: the completion tokens' hidden states are gathered into tiles of at most
// kMaxTileTokens rows; the vocabulary is walked in blocks of Vb rows of W, chosen so that one logits
// block [tokens, Vb] stays within the block budget. Each block is one BLAS GEMM (+ bias through
// addmm), then the per-row kernels run on it in place:
//   forward:  online log-sum-exp across blocks (running max and sum per token), target logit picked
//             from the block that holds it;
//   backward: dz = g * (onehot - exp(z - lse)) * chain in place, then dh_tile += dz @ W_blk and
//             dW_blk = dz^T @ h_tile (+= over token tiles): every dW block is produced by GEMMs with
//             K = tokens and written once, never re-read per token chunk.
// The full [tokens, V] logits never exist. Everything is in fixed order (no atomics), so results
// are deterministic. bf16/fp16 operands are upcast to fp32 per tile / per block for the logits
// GEMMs (a bf16 GEMM would round the logits to bf16); with bf16 operands on a CPU with native bf16
// GEMMs the two gradient GEMMs take dz rounded to bf16 (bf16_grad_gemms).
// A frozen head gets its own forward (linear_forward_frozen) that leaves the backward no GEMM.

// ATen + torch's pybind11 casters only (not all of torch/extension.h): half the compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "row_kernels_api.h"

namespace spo_cpu {
namespace {

constexpr int64_t kMaxTileTokens = 4096;
constexpr int64_t kMinFrozenTile = 128;  // tokens per whole-vocabulary tile of the frozen-head forward

bool cpu_has(const std::string& isa) {
#if SPO_CPU_X86_VARIANTS
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "generic";
}

const KernelTable* table_for(const std::string& isa) {
#if SPO_CPU_X86_VARIANTS
  if (isa == "avx512") return isa_avx512::table();
  if (isa == "avx2") return isa_avx2::table();
#endif
  return isa_generic::table();
}

const KernelTable* best_table() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa)) return table_for(isa);
  return isa_generic::table();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

// Pin the row kernels to one instruction-set variant ("auto": the best this CPU runs); for tests.
bool set_isa(const std::string& isa) {
  if (isa == "auto") {
    g_table.store(best_table(), std::memory_order_release);
    return true;
  }
  if (!cpu_has(isa)) return false;
  g_table.store(table_for(isa), std::memory_order_release);
  return true;
}

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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

double cap_arg(double softcap) { return softcap > 0 ? softcap : 0.0; }

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

// seq_offsets [S+1]: starts at 0, non-decreasing, ends at the number of plan tokens.
void check_offsets(const at::Tensor& off, int64_t nc) {
  const int64_t* p = off.data_ptr<int64_t>();
  const int64_t n = off.numel();
  bool ok = n >= 1 && p[0] == 0 && p[n - 1] == nc;
  for (int64_t i = 1; ok && i < n; ++i) ok = p[i] >= p[i - 1];
  TORCH_CHECK(ok, "spo_kernels._cpu: seq_offsets must rise from 0 to the number of plan tokens (", nc, ")");
}

int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Rows of the plan → (seq_logps, lse) from the per-token state of the online log-sum-exp. The
// per-sequence sums are float64 (SPEC 7): rounding them to fp32 cost ~5e-4 of a DPO loss at 8k tokens.
std::tuple<at::Tensor, at::Tensor> finish_forward(const at::Tensor& m, const at::Tensor& s, const at::Tensor& zt,
                                                  const at::Tensor& seq_offsets) {
  const int64_t nc = m.size(0);
  const int64_t S = seq_offsets.size(0) - 1;
  at::Tensor lse = at::empty_like(m);
  at::Tensor seq = at::zeros({S}, m.options().dtype(at::kDouble));
  const int64_t* off = seq_offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "spo_finish_forward", [&] {
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* zp = zt.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    double* qp = seq.data_ptr<double>();
    for (int64_t i = 0; i < nc; ++i) lp[i] = mp[i] + std::log(sp[i]);
    // Per-sequence sums, in plan order and in double: deterministic and accurate.
    for (int64_t q = 0; q < S; ++q) {
      double acc = 0.0;
      for (int64_t i = off[q]; i < off[q + 1]; ++i) acc += double(zp[i]) - double(lp[i]);
      qp[q] = acc;
    }
  });
  return {seq, lse};
}

at::Tensor row_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// The plan's token rows and targets: int64, contiguous, equal lengths, in range of the rows / vocabulary.
struct PlanRows {
  at::Tensor token_idx, targets;
  int64_t nc;
};

PlanRows checked_plan(const at::Tensor& token_idx_in, const at::Tensor& targets_in, int64_t num_rows, int64_t V) {
  check_index(token_idx_in, "token_idx");
  check_index(targets_in, "targets");
  PlanRows p{token_idx_in.contiguous(), targets_in.contiguous(), token_idx_in.size(0)};
  TORCH_CHECK(p.targets.size(0) == p.nc, "spo_kernels._cpu: targets and token_idx differ in length");
  check_range(p.token_idx, num_rows, "token_idx");
  check_range(p.targets, V, "targets");
  return p;
}

at::Tensor checked_offsets(const at::Tensor& seq_offsets_in, int64_t nc) {
  check_index(seq_offsets_in, "seq_offsets");
  at::Tensor off = seq_offsets_in.contiguous();
  check_offsets(off, nc);
  return off;
}

// Per-token state of the online log-sum-exp: running max, sum of exp(z - max), target logit.
struct LseState {
  at::Tensor m, s, zt;
};

LseState lse_state(int64_t nc, const at::TensorOptions& opts) {
  return {at::full({nc}, -std::numeric_limits<double>::infinity(), opts), at::zeros({nc}, opts),
          at::zeros({nc}, opts)};
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "spo_kernels._cpu: hidden [N, H] and weight [V, H] expected");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "spo_kernels._cpu: CPU tensors expected");
}

// ------------------------------------------------------------------------------------------------
// logits path
// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> logits_forward(const at::Tensor& logits_in, const at::Tensor& token_idx_in,
                                                  const at::Tensor& targets_in, const at::Tensor& seq_offsets_in,
                                                  double softcap, double temperature) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.device().is_cpu(), "spo_kernels._cpu: logits must be CPU [N, V]");
  const at::Tensor logits = row_contiguous(logits_in);
  const int di = dtype_index(logits.scalar_type());
  const auto acc = acc_type(logits.scalar_type());
  const int64_t V = logits.size(1);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, logits.size(0), V);
  const at::Tensor &token_idx = plan.token_idx, &targets = plan.targets;
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const LseState st = lse_state(nc, logits.options().dtype(acc));
  const at::Tensor &m = st.m, &s = st.s, &zt = st.zt;
  if (nc > 0 && V > 0) {
    const LseFn fn = kernels()->lse[di];
    const void* base = logits.data_ptr();
    const int64_t stride = logits.stride(0);
    const int64_t* rows = token_idx.data_ptr<int64_t>();
    const int64_t* tg = targets.data_ptr<int64_t>();
    void *mp = m.data_ptr(), *sp = s.data_ptr(), *zp = zt.data_ptr();
    const double cap = cap_arg(softcap), inv_t = 1.0 / temperature;
    at::parallel_for(0, nc, grain_for(V), [&](int64_t r0, int64_t r1) {
      fn(base, rows, stride, V, r0, r1, tg, 0, cap, inv_t, mp, sp, zp);
    });
  }
  return finish_forward(m, s, zt, seq_offsets);
}

void logits_backward(const at::Tensor& logits_in, const at::Tensor& token_idx_in, const at::Tensor& targets_in,
                     const at::Tensor& seq_id_in, const at::Tensor& lse_in, const at::Tensor& grad_seq,
                     double softcap, double temperature, at::Tensor out) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.device().is_cpu(), "spo_kernels._cpu: logits must be CPU [N, V]");
  TORCH_CHECK(out.sizes() == logits_in.sizes() && out.scalar_type() == logits_in.scalar_type(),
              "spo_kernels._cpu: out must match logits' shape and dtype");
  check_index(token_idx_in, "token_idx");
  check_index(targets_in, "targets");
  check_index(seq_id_in, "seq_id");
  const at::Tensor logits = row_contiguous(logits_in);
  const int di = dtype_index(logits.scalar_type());
  const auto acc = acc_type(logits.scalar_type());
  const at::Tensor token_idx = token_idx_in.contiguous(), targets = targets_in.contiguous();
  const at::Tensor seq_id = seq_id_in.contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor g_tok = grad_seq.to(acc).index_select(0, seq_id).contiguous();
  const int64_t nc = token_idx.size(0), N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.size(0) == nc && seq_id.size(0) == nc && lse.size(0) == nc,
              "spo_kernels._cpu: targets, seq_id, lse and token_idx differ in length");
  check_range(token_idx, N, "token_idx");
  check_range(targets, V, "targets");
  // Write into a row-contiguous target; copied back at the end when `out` is not one.
  const bool direct = out.stride(-1) == 1;
  at::Tensor dst = direct ? out : at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t so = dst.stride(0);
  const int64_t elsize = dst.element_size();
  char* dbase = static_cast<char*>(dst.data_ptr());
  // Rows outside the plan are zeroed.
  std::vector<uint8_t> in_plan(N, 0);
  const int64_t* rows = token_idx.data_ptr<int64_t>();
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
    const int64_t* tg = targets.data_ptr<int64_t>();
    const void *lp = lse.data_ptr(), *gp = g_tok.data_ptr();
    const double cap = cap_arg(softcap), inv_t = 1.0 / temperature;
    void* ob = dst.data_ptr();
    at::parallel_for(0, nc, grain_for(V), [&](int64_t r0, int64_t r1) {
      fn(xb, ob, rows, sx, so, V, r0, r1, tg, 0, lp, gp, cap, inv_t);
    });
  }
  if (!direct) out.copy_(dst);
}

// ------------------------------------------------------------------------------------------------
// fused-linear path
// ------------------------------------------------------------------------------------------------

struct Tiling {
  int64_t tile;   // tokens per tile
  int64_t block;  // vocabulary rows per block
};

Tiling make_tiling(int64_t nc, int64_t V, int64_t elsize, int64_t block_bytes) {
  Tiling t;
  t.tile = std::max<int64_t>(1, std::min(nc, kMaxTileTokens));
  int64_t vb = block_bytes / std::max<int64_t>(1, t.tile * elsize);
  vb = std::max<int64_t>(vb, 256);
  if (vb < V) vb = std::max<int64_t>(64, vb / 64 * 64);
  t.block = std::max<int64_t>(1, std::min(vb, V));
  return t;
}

// hidden rows of tile [t0, t0 + len) of the plan, in the accumulation dtype, contiguous.
at::Tensor gather_tile(const at::Tensor& hidden, const at::Tensor& token_idx, int64_t t0, int64_t len,
                       at::ScalarType acc) {
  at::Tensor h = hidden.index_select(0, token_idx.narrow(0, t0, len));
  return h.scalar_type() == acc ? h : h.to(acc);
}

at::Tensor as_acc(const at::Tensor& x, at::ScalarType acc) { return x.scalar_type() == acc ? x : x.to(acc); }

// z[:len] = h @ W_blk^T (+ b_blk), into the preallocated block buffer.
at::Tensor logits_block(at::Tensor& zbuf, const at::Tensor& h, const at::Tensor& w_blk, const at::Tensor& b_blk) {
  const int64_t len = h.size(0), vb = w_blk.size(0);
  at::Tensor z = zbuf.narrow(0, 0, len * vb).view({len, vb});
  if (b_blk.defined())
    at::addmm_out(z, b_blk, h, w_blk.t());
  else
    at::mm_out(z, h, w_blk.t());
  return z;
}

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias_opt,
                                                  const at::Tensor& token_idx_in, const at::Tensor& targets_in,
                                                  const at::Tensor& seq_offsets_in, double softcap,
                                                  double temperature, int64_t block_bytes) {
  check_linear(hidden, weight);
  dtype_index(hidden.scalar_type());
  const auto acc = acc_type(hidden.scalar_type());
  const int di = dtype_index(acc);
  const int64_t V = weight.size(0);
  const PlanRows plan = checked_plan(token_idx_in, targets_in, hidden.size(0), V);
  const at::Tensor &token_idx = plan.token_idx, &targets = plan.targets;
  const int64_t nc = plan.nc;
  const at::Tensor seq_offsets = checked_offsets(seq_offsets_in, nc);
  const auto opts = hidden.options().dtype(acc);
  const LseState st = lse_state(nc, opts);
  const at::Tensor &m = st.m, &s = st.s, &zt = st.zt;
  if (nc > 0 && V > 0) {
    const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
    const int64_t esz = c10::elementSize(acc);
    const Tiling tl = make_tiling(nc, V, esz, block_bytes);
    const int64_t ntiles = (nc + tl.tile - 1) / tl.tile;
    at::Tensor zbuf = at::empty({tl.tile * tl.block}, opts);
    at::Tensor h_single = ntiles == 1 ? gather_tile(hidden, token_idx, 0, nc, acc) : at::Tensor();
    const LseFn fn = kernels()->lse[di];
    const int64_t* tg = targets.data_ptr<int64_t>();
    const double cap = cap_arg(softcap), inv_t = 1.0 / temperature;
    for (int64_t v0 = 0; v0 < V; v0 += tl.block) {
      const int64_t vb = std::min(tl.block, V - v0);
      const at::Tensor w_blk = as_acc(weight.narrow(0, v0, vb), acc);
      const at::Tensor b_blk = bias.defined() ? as_acc(bias.narrow(0, v0, vb), acc) : at::Tensor();
      for (int64_t t0 = 0; t0 < nc; t0 += tl.tile) {
        const int64_t len = std::min(tl.tile, nc - t0);
        const at::Tensor h = ntiles == 1 ? h_single : gather_tile(hidden, token_idx, t0, len, acc);
        const at::Tensor z = logits_block(zbuf, h, w_blk, b_blk);
        const void* zb = z.data_ptr();
        char* mp = static_cast<char*>(m.data_ptr()) + t0 * esz;
        char* sp = static_cast<char*>(s.data_ptr()) + t0 * esz;
        char* zp = static_cast<char*>(zt.data_ptr()) + t0 * esz;
        const int64_t* tgt = tg + t0;
        at::parallel_for(0, len, grain_for(vb), [&](int64_t r0, int64_t r1) {
          fn(zb, nullptr, vb, vb, r0, r1, tgt, v0, cap, inv_t, mp, sp, zp);
        });
      }
    }
  }
  return finish_forward(m, s, zt, seq_offsets);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_id_in,
    const at::Tensor& lse_in, const at::Tensor& grad_seq, double softcap, double temperature, bool need_hidden,
    bool need_weight, bool need_bias, int64_t block_bytes, bool bf16_grad_gemms) {
  check_linear(hidden, weight);
  check_index(token_idx_in, "token_idx");
  check_index(targets_in, "targets");
  check_index(seq_id_in, "seq_id");
  dtype_index(hidden.scalar_type());
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  need_bias = need_bias && bias.defined();
  const auto acc = acc_type(hidden.scalar_type());
  const int di = dtype_index(acc);
  const at::Tensor token_idx = token_idx_in.contiguous(), targets = targets_in.contiguous();
  const at::Tensor seq_id = seq_id_in.contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor g_tok = grad_seq.to(acc).index_select(0, seq_id).contiguous();
  const int64_t nc = token_idx.size(0), V = weight.size(0), H = weight.size(1);
  TORCH_CHECK(targets.size(0) == nc, "spo_kernels._cpu: targets and token_idx differ in length");
  check_range(token_idx, hidden.size(0), "token_idx");
  check_range(targets, V, "targets");
  TORCH_CHECK(seq_id.size(0) == nc && lse.size(0) == nc,
              "spo_kernels._cpu: seq_id, lse and token_idx differ in length");
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
  const int64_t* tg = targets.data_ptr<int64_t>();
  const double cap = cap_arg(softcap), inv_t = 1.0 / temperature;

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
        fn(zb, zb, nullptr, vb, vb, vb, r0, r1, tgt, v0, lp, gp, cap, inv_t);
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

// Frozen head (weight and bias need no gradient): the backward needs only dhidden, and
// dh_t = g_s * u_t @ W with u_t = (onehot - softmax(z_t)) * chain independent of g. So the forward
// takes tiles of tokens over the whole vocabulary (one GEMM), finishes their LSE, turns the tile into
// u in place and multiplies by W right away: two GEMMs per tile here and none in the backward,
// instead of one here and two (recompute + dz @ W) there. Returns (seq_logps, lse, u @ W [Nc, H]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_frozen(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& token_idx_in, const at::Tensor& targets_in, const at::Tensor& seq_offsets_in,
    double softcap, double temperature, int64_t block_bytes) {
  check_linear(hidden, weight);
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
  auto res = finish_forward(m, s, zt, seq_offsets);
  return {std::get<0>(res), std::get<1>(res), dh_unit};
}

std::string isa() { return kernels()->isa; }

}  // namespace
}  // namespace spo_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "spo_kernels cpu backend: fused log-prob kernels for the logits and fused-linear paths";
  m.def("logits_forward", &spo_cpu::logits_forward, "logits path forward -> (seq_logps [S] float64, lse [Nc])",
        py::arg("logits"), py::arg("token_idx"), py::arg("targets"), py::arg("seq_offsets"), py::arg("softcap"),
        py::arg("temperature"), py::call_guard<py::gil_scoped_release>());
  m.def("logits_backward", &spo_cpu::logits_backward, "logits path backward, writes dlogits into out",
        py::arg("logits"), py::arg("token_idx"), py::arg("targets"), py::arg("seq_id"), py::arg("lse"),
        py::arg("grad_seq"), py::arg("softcap"), py::arg("temperature"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward", &spo_cpu::linear_forward, "fused-linear forward -> (seq_logps [S] float64, lse [Nc])",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_offsets"), py::arg("softcap"), py::arg("temperature"), py::arg("block_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_backward", &spo_cpu::linear_backward, "fused-linear backward -> (dhidden, dweight, dbias)",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_id"), py::arg("lse"), py::arg("grad_seq"), py::arg("softcap"), py::arg("temperature"),
        py::arg("need_hidden"), py::arg("need_weight"), py::arg("need_bias"), py::arg("block_bytes"),
        py::arg("bf16_grad_gemms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward_frozen", &spo_cpu::linear_forward_frozen,
        "fused-linear forward for a frozen head -> (seq_logps [S], lse [Nc], (onehot - softmax) @ W [Nc, H])",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_offsets"), py::arg("softcap"), py::arg("temperature"), py::arg("block_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &spo_cpu::isa, "the instruction-set variant of the row kernels in use");
  m.def("set_isa", &spo_cpu::set_isa, py::arg("isa"),
        "pin the row kernels to 'generic', 'avx2' or 'avx512' (False if this CPU lacks it), or 'auto'");
  m.def("num_threads", []() { return at::get_num_threads(); }, "intra-op threads (torch.get_num_threads)");
}
