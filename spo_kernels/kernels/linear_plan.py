"""The fused-linear backward's plan: how it walks the ``[Nc, V]`` plane (token chunks x vocabulary
ranges, docs/gradient.md §7) and where its buffers live. Pure host arithmetic, testable anywhere.

Memory (``plan_backward``, default ``reuse_outputs=True``). With a 16-bit hidden, vocab-outer needs the
fp32 ``[Nc, H]`` dhidden accumulator and a dz scratch; neither gets memory of its own:

* the dz scratch is a view of **dhidden's own storage** (``N * H`` elements, nothing else lives there
  until the end), so a range is ``min(scratch_bytes / itemsize, N * H) / Nc`` columns (8192 at G1);
* the accumulator is a view of **the last ``4 Nc / itemsize`` rows of dW** (``tail_start`` onwards,
  rounded to ``block_v``): phase 1 walks every range, but writes dW only for rows below ``tail_start``;
  once the last range has added its partial, dhidden is zeroed and the accumulator scattered into its
  plan rows (``_scatter_rows_kernel``); phase 2 then recomputes dz for the tail columns (into a fresh
  scratch of 1/32 of the gradients' bytes, widened up to 1/16 where 2 waves of the dW GEMM need it: see
  "Phase-2 tail blocks" below) and writes those dW rows, exactly, in one GEMM each.

Used when dW exists and the tail is at most half of V (else the accumulator is allocated). At G1 in
bf16 (dhidden 256 MiB + dW 1002 MiB) on 132 SMs: allocations beyond the gradients 40 MiB, **1.03x
the lower bound** (``reuse_outputs=False``: scratch 256 MiB + accumulator 256 MiB, 1.41x), for a second
recompute of ``2 Nc V H * (2 Nc / V)`` FLOPs: +6.4% of the policy's ``8 Nc V H`` at G1 (``Nc / V`` = 0.128).
A frozen head (no dW) takes token-outer with a fresh scratch; an fp32 hidden accumulates in dhidden.

Phase-2 tail blocks fill >= 2 waves (:func:`_tail_blocks`): each tail block's dW GEMM has
``cdiv(width, block_m) x cdiv(H, block_n)`` programs that each reduce over all Nc tokens, so a narrow
block leaves SMs idle for its whole duration. Blocks are now at least ``2 x SMs`` programs wide (SM
count from the device; 1 in the interpreter, which runs one program at a time) while that keeps the
phase-2 scratch within 1/16 of the gradients' bytes, and the tail is cut into equal blocks instead of
full-width ones plus a sliver. G1 on 132 SMs: 28 blocks of 1152-1280 columns (2.2-2.4 waves; before:
28 x 1152 columns, 2.2 waves, then one of 512, 1.0 wave), 40 MiB of scratch instead of 36; H = 2048 at
the same Nc: the cap allows 1.0-1.1 waves instead of 0.5, for +20 MiB. How much this buys depends on
how many of these programs an SM holds at once (shared memory and registers of the compiled kernel;
wave quantization): to be measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .linear_config import LinearKernelConfig


def _ranges(start, stop, width):
    return [(v, min(width, stop - v)) for v in range(start, stop, width)]


def _plan_blocks(Nc, V, itemsize, cfg, need_hidden, need_weight, need_bias, hidden_dtype, weight_dtype,
                 bias_dtype):
    """The streaming order and the (token chunk, vocab range) blocks of a fresh ``scratch_bytes`` scratch:
    returns ``(outer, [(tok_start, n_tok)], [(v_start, n_v)])``."""
    tile = cfg.block_n * cfg.block_v
    cap_elems = max(tile, cfg.scratch_bytes // itemsize)
    outer = cfg.outer
    if outer == "auto":
        if Nc * V <= cap_elems:
            outer = "vocab"  # one block covers the plane: no accumulator either way
        else:
            # Bytes of the fp32 accumulator each order needs (per H column; the H factor cancels).
            vocab_acc = Nc * 4 if (need_hidden and hidden_dtype != torch.float32) else 0
            token_acc = (V * 4 if (need_weight and weight_dtype != torch.float32) else 0) + (
                4 if (need_bias and bias_dtype != torch.float32) else 0)
            outer = "vocab" if vocab_acc <= token_acc else "token"
    if outer == "vocab":
        n_v = max(cfg.block_v, (cap_elems // max(Nc, 1)) // cfg.block_v * cfg.block_v)
        return outer, [(0, Nc)], _ranges(0, V, min(n_v, V))
    n_t = max(cfg.block_n, (cap_elems // V) // cfg.block_n * cfg.block_n)
    return outer, _ranges(0, Nc, min(n_t, Nc)), [(0, V)]


@dataclass(frozen=True)
class BackwardPlan:
    """How :func:`linear_backward` walks the ``[Nc, V]`` plane and where its buffers live.

    Phase 1 visits ``tok_blocks x v_blocks``; dW rows ``>= tail_start`` are not written there (their
    storage may hold the dhidden accumulator) but in phase 2, which recomputes dz for ``tail_blocks``.
    scratch: "fresh" or "dhidden" (the dz scratch is a view of dhidden's storage, which nothing else
        uses before the end).
    dh_acc: "none" (one range writes dhidden directly), "dhidden" (fp32: accumulate in place), "fresh"
        (a compact fp32 ``[Nc, H]`` buffer) or "weight_tail" (the same buffer, placed in the storage of
        dW rows ``>= tail_start``, written only after dhidden is final).
    dw_acc / db_acc: "none", "weight" / "bias" (fp32: in place) or "fresh" (token-outer, 16-bit).
    dz_rows / db_part_shape / num_skip_flags: sizes of the dz scratch, the bias partials, the filter flags.
    extra_bytes: the allocations beyond the gradients themselves, by name (O(Nc + V) ones included).
    """

    outer: str
    tok_blocks: list
    v_blocks: list
    stride_dz: int
    scratch: str
    dh_acc: str
    dw_acc: str
    db_acc: str
    tail_start: int
    tail_blocks: list
    tail_stride_dz: int
    dz_rows: int
    db_part_shape: tuple
    num_skip_flags: int
    extra_bytes: dict

    @property
    def total_extra_bytes(self) -> int:
        return sum(self.extra_bytes.values())


def _tail_blocks(tail_start, V, Nc, H, budget, cap, itemsize, cfg: LinearKernelConfig, num_sms):
    """Phase 2's vocabulary blocks over ``[tail_start, V)``. Each block's dW GEMM is one launch whose grid
    is ``cdiv(width, dw block_m) x cdiv(H, dw block_n)`` programs, each reducing over all ``Nc`` tokens: a
    grid of less than 2 waves of ``num_sms`` leaves SMs idle for a whole long reduction. So a block is as
    wide as the scratch ``budget`` (bytes) allows, and at least as wide as 2 waves need, as long as that
    stays within ``cap`` bytes of scratch; the tail is then cut into equal blocks (+- one ``block_v``), so
    that the last one is not a sliver with a tiny grid (the blocks that get one ``block_v`` more are the
    last ones: the last block also holds the partial tile of ``V``)."""
    bv = cfg.block_v
    dw = cfg.params("linear_dw")
    tail = V - tail_start
    row_bytes = Nc * itemsize
    w_budget = max(bv, budget // row_bytes // bv * bv)
    w_cap = max(w_budget, cap // row_bytes // bv * bv)
    m_blocks = triton.cdiv(2 * num_sms, triton.cdiv(H, dw["block_n"]))
    w_min = min(triton.cdiv(m_blocks * dw["block_m"], bv) * bv, w_cap)
    # As many blocks as the budget needs, fewer where 2 waves need wider ones, never wider than the cap.
    count = max(1, min(triton.cdiv(tail, w_budget), tail // w_min), triton.cdiv(tail, w_cap))
    base, extra = divmod(triton.cdiv(tail, bv), count)
    blocks, v = [], tail_start
    for i in range(count):
        n = min((base + (i >= count - extra)) * bv, V - v)
        blocks.append((v, n))
        v += n
    return blocks


def plan_backward(N, Nc, V, H, hidden_dtype, weight_dtype, bias_dtype, need_hidden, need_weight, need_bias,
                  cfg: LinearKernelConfig, filter_on=False, num_sms=1) -> BackwardPlan:
    """Choose the backward's blocks and buffer placement (docs/gradient.md §7; this module's docstring, "Memory").

    ``N`` rows of hidden, ``Nc`` plan tokens, ``V x H`` head; dtypes of hidden / weight / bias (None when
    there is no bias to differentiate); ``num_sms``: SMs the phase-2 grids should fill (1: the
    interpreter). Pure host arithmetic, so its memory figures are testable anywhere.
    """
    h_item = torch.empty(0, dtype=hidden_dtype).element_size()
    w_item = torch.empty(0, dtype=weight_dtype).element_size()
    f32 = torch.float32
    outer, tok_blocks, v_blocks = _plan_blocks(Nc, V, h_item, cfg, need_hidden, need_weight, need_bias,
                                               hidden_dtype, weight_dtype, bias_dtype)
    scratch, dh_acc, tail_start, tail_blocks = "fresh", "none", V, []
    width = max(n for _, n in v_blocks)
    # Output reuse (cfg.reuse_outputs): vocab-outer with a 16-bit dhidden needs the fp32 accumulator; the
    # dz scratch then moves into dhidden's own storage, as wide as the cap and that storage allow.
    host_w = min(cfg.scratch_bytes // h_item, N * H) // max(Nc, 1) // cfg.block_v * cfg.block_v
    if (cfg.reuse_outputs and outer == "vocab" and need_hidden and hidden_dtype != f32
            and host_w >= cfg.block_v):
        scratch, dh_acc = "dhidden", "fresh"
        width = min(host_w, triton.cdiv(V, cfg.block_v) * cfg.block_v)
        # fp32 [Nc, H] = Nc * 4 / w_item rows of dW. Hosting it there costs one more recompute of those
        # columns (phase 2), so only when they are at most half the vocabulary.
        acc_rows = triton.cdiv(Nc * 4, w_item)
        if need_weight and acc_rows <= V // 2:
            dh_acc = "weight_tail"
            tail_start = (V - acc_rows) // cfg.block_v * cfg.block_v
            v_blocks = _ranges(0, tail_start, width) + _ranges(tail_start, V, width)
            # Phase 2's scratch is fresh: 1/32 of the gradients' own bytes (and at most the cap), widened
            # up to 1/16 of them where 2 waves of the dW GEMM need it (see _tail_blocks).
            grads = N * H * h_item + V * H * w_item
            tail_blocks = _tail_blocks(tail_start, V, Nc, H, min(cfg.scratch_bytes, grads // 32),
                                       min(cfg.scratch_bytes, grads // 16), h_item, cfg, num_sms)
        else:
            v_blocks = _ranges(0, V, width)
    multi_tok, multi_v = len(tok_blocks) > 1, len(v_blocks) > 1
    if dh_acc == "none" and need_hidden:
        dh_acc = "dhidden" if hidden_dtype == f32 else ("fresh" if multi_v else "none")
    dw_acc = "none"
    if need_weight:
        dw_acc = "weight" if weight_dtype == f32 else ("fresh" if multi_tok else "none")
    db_acc = "none"
    if need_bias:
        db_acc = "bias" if bias_dtype == f32 else ("fresh" if multi_tok else "none")

    max_tok = max(n for _, n in tok_blocks)
    max_v = max(n for _, n in v_blocks)
    stride_dz = triton.cdiv(max_v, 16) * 16  # 32-byte aligned rows
    tail_stride = triton.cdiv(max((n for _, n in tail_blocks), default=0), 16) * 16
    max_tb = triton.cdiv(max_tok, cfg.block_n)
    num_skip_flags = max_tb * triton.cdiv(max(max_v, tail_stride), cfg.block_v)
    extra = {
        "dz_scratch": 0 if scratch == "dhidden" else max_tok * stride_dz * h_item,
        "tail_dz_scratch": Nc * tail_stride * h_item,
        "dhidden_acc": Nc * H * 4 if dh_acc == "fresh" else 0,
        "dweight_acc": V * H * 4 if dw_acc == "fresh" else 0,
        "dbias_acc": V * 4 if db_acc == "fresh" else 0,
        "dbias_partials": max_tb * max_v * 4 if need_bias else 0,
        "skip_flags": num_skip_flags if filter_on else 0,
    }
    return BackwardPlan(outer, tok_blocks, v_blocks, stride_dz, scratch, dh_acc, dw_acc, db_acc, tail_start,
                        tail_blocks, tail_stride, max_tok, (max_tb, max_v), num_skip_flags, extra)
