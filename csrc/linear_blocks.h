// Blocking of the fused-linear path (linear.cpp, linear_frozen.cpp): completion tokens gathered into
// tiles of at most kMaxTileTokens rows, the vocabulary walked in blocks of rows of W sized so that
// one logits block [tokens, Vb] stays within the block budget.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"

namespace spo_cpu {

constexpr int64_t kMaxTileTokens = 4096;
constexpr int64_t kMinFrozenTile = 128;  // tokens per whole-vocabulary tile of the frozen-head forward

struct Tiling {
  int64_t tile;   // tokens per tile
  int64_t block;  // vocabulary rows per block
};

inline Tiling make_tiling(int64_t nc, int64_t V, int64_t elsize, int64_t block_bytes) {
  Tiling t;
  t.tile = std::max<int64_t>(1, std::min(nc, kMaxTileTokens));
  int64_t vb = block_bytes / std::max<int64_t>(1, t.tile * elsize);
  vb = std::max<int64_t>(vb, 256);
  if (vb < V) vb = std::max<int64_t>(64, vb / 64 * 64);
  t.block = std::max<int64_t>(1, std::min(vb, V));
  return t;
}

// hidden rows of tile [t0, t0 + len) of the plan, in the accumulation dtype, contiguous.
inline at::Tensor gather_tile(const at::Tensor& hidden, const at::Tensor& token_idx, int64_t t0, int64_t len,
                              at::ScalarType acc) {
  return as_acc(hidden.index_select(0, token_idx.narrow(0, t0, len)), acc);
}

// z[:len] = h @ W_blk^T (+ b_blk), into the preallocated block buffer.
inline at::Tensor logits_block(at::Tensor& zbuf, const at::Tensor& h, const at::Tensor& w_blk,
                               const at::Tensor& b_blk) {
  const int64_t len = h.size(0), vb = w_blk.size(0);
  at::Tensor z = zbuf.narrow(0, 0, len * vb).view({len, vb});
  if (b_blk.defined())
    at::addmm_out(z, b_blk, h, w_blk.t());
  else
    at::mm_out(z, h, w_blk.t());
  return z;
}

}  // namespace spo_cpu
