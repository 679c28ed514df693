"""Fused-linear path in Triton, backward: the gradients of ``sum_s g_s L_s`` w.r.t. hidden, weight and
bias (docs/gradient.md §2-§4 for the closed form, §7 for the order and the memory), by streaming
``dz`` through a bounded scratch; the plan is ``linear_plan.plan_backward``.

Backward (``linear_backward``), 6 Nc V H FLOPs (one recompute of the logits), always deterministic
----------------------------------------------------------------------------------------------------
The exact gradient needs two reductions that run along different axes of the ``[Nc, V]`` tile grid:
``dW`` sums over tokens, ``dhidden`` over the vocabulary. A single kernel per (token block, vocab block)
tile meets the FLOP floor but must add every partial product into global fp32 buffers with atomics:
``(Nc / BLOCK_N) * V * H + (V / BLOCK_V) * Nc * H`` fp32 atomics (about 1.3e11 at the G1 shape: ~0.5 TB
of read-modify-write through L2 next to ~52 TFLOP of backward matmuls), full fp32 ``[V, H]`` and
``[Nc, H]`` accumulators (2.3 GiB at G1), and results that change bit-wise from run to run. We instead
stream ``dz`` through a bounded scratch:

    for each block (token chunk x vocabulary range) of the [Nc, V] plane, in order:
        _grad_logits_kernel : recompute the logit tiles (2 n_tok n_v H), write dz [n_tok, n_v] in the
                              input dtype (what a tensor-core dot consumes anyway) to the scratch,
                              plus per-tile column sums of fp32 dz for the bias;
        _dw_gemm_kernel     : dW[range]  (+)= dz^T h[chunk]   (2 n_tok n_v H), fp32 accumulator in registers;
        _dh_gemm_kernel     : dh[chunk]  (+)= dz W[range]     (2 n_tok n_v H), fp32 accumulator in registers;
        _bias_reduce_kernel : db[range]  (+)= column sums, token blocks in order.

Only one of the two loops has more than one step. "vocab-outer" (default when ``Nc <= V``): all tokens
x a vocabulary range of ``scratch_bytes / (Nc * itemsize)`` columns; then ``dW`` (and ``db``) rows of the
range are reduced over *all* tokens inside one GEMM and written once, exactly, in the weight's dtype,
while ``dhidden`` adds one partial per range into an fp32 ``[Nc, H]`` accumulator (none when there is a
single range or hidden is fp32: then it accumulates in ``dhidden`` itself). "token-outer" (``Nc > V``)
is the mirror image: a token chunk x all of V, ``dhidden`` rows written once, ``dW`` accumulated in fp32
``[V, H]`` across chunks (none when the weight is fp32). The smaller accumulator wins.

Costs: FLOPs ``6 Nc V H`` (+ ``2 Nc V H`` forward = the ``8 Nc V H`` floor of a policy fwd+bwd), plus
the phase-2 recompute above. Extra global traffic over the three matmuls: dz written once and read twice
(``6 Nc V`` bytes in bf16) and one read-modify-write of the accumulator per range. Every reduction runs
in a fixed order with no atomics, so **results are bitwise reproducible in every mode**;
``deterministic=True`` is accepted and selects the same code.

Gradient filter (``grad_filter_eps > 0``, opt-in, approximate): the dz kernel flags a tile when
``|g (onehot - softmax)| < eps`` on all its entries, zeroes it, and both GEMMs skip flagged tiles (their
tiles are aligned to the dz tiles), saving up to 2/3 of the backward FLOPs on peaked distributions. The
recompute itself cannot be skipped (it is what tells). Off by default: exact.


``_dw_gemm_kernel`` prefetches ``token_idx``: a step's hidden rows are gathered through indices that
the previous step loaded, so the row load depends on no load of its own step. Triton's pipeliner
(AssignLatencies) splits ``num_stages - 1`` steps of prefetch between the levels of a load -> load
chain: with the index load feeding the row load, every load of the loop was prefetched
``(num_stages - 1) / 2`` steps ahead (1 at ``num_stages=3``); with the chain cut, the dz and hidden
tiles are buffered ``num_stages - 1`` steps ahead like in the dhidden GEMM. Compiled for sm_90 at G1
(default tiles, ``num_stages=3``) the kernel's shared-memory buffers go from 2 to 3 per operand
(TTGIR, triton 3.6 and 3.9 alike), for 96 KiB of shared memory instead of 64.5 KiB (still two programs
per SM).

"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_helpers as TH
from .linear_config import LinearKernelConfig, kernel_config
from .linear_forward import _logit_tile, _prep, _softcap_args
from .linear_plan import plan_backward
from .triton_helpers import dot_acc, dot_mode, finish, swizzle
from .types import KernelOptions, LinearGrads, LogitTransform


# ---------------------------------------------------------------------------------------------
# device code
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, token_idx_ptr, targets_ptr, seq_id_ptr, lse_ptr, grad_seq_ptr,
    dz_ptr, db_part_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_h, stride_w, stride_dz, group, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    weights_ptr=None, HAS_WEIGHTS: tl.constexpr = False,
):
    """Program (token block, vocab block) of the current (chunk x range) block: recompute the logit tile,
    write ``dz_raw`` (input dtype) at ``dz[local token, local col]``, its fp32 column sums for the bias at
    ``db_part[token block, local col]`` and, with FILTER, the tile's skip flag. HAS_WEIGHTS: token t's
    upstream gradient is ``g_s w_t`` (``weights [Nc]`` fp32, SPEC 8)."""
    pid = tl.program_id(0)
    num_tb = tl.cdiv(n_tok, BLOCK_N)
    num_vb = tl.cdiv(n_v, BLOCK_V)
    tb, vb = swizzle(pid, num_tb, num_vb, group)
    local_rows = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_tok
    rows = tok_start + local_rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    sid = tl.load(seq_id_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_seq_ptr + sid, mask=row_mask, other=0.0)
    if HAS_WEIGHTS:
        g = g * tl.load(weights_ptr + rows, mask=row_mask, other=0.0)
    local_cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local_cols < n_v
    cols = v_start + local_cols

    z, t = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, tok * stride_h, row_mask, cols, col_mask, H, stride_w,
                       softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, DOT, BLOCK_N, BLOCK_V, BLOCK_H)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    # dL/dz = g_s (onehot(y) - softmax(z)) (docs/gradient.md §2), softmax from the forward's lse
    # (lanes past V: exp(-inf) = 0).
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = tl.where(tile_mask, g[:, None] * (onehot - p), 0.0)
    if FILTER:
        # Approximate, opt-in: a tile whose |g (onehot - p)| < eps everywhere is dropped; both GEMMs skip it.
        skip = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) < filter_eps
        dz = tl.where(skip, 0.0, dz)
        tl.store(skip_ptr + tb * num_vb + vb, skip.to(tl.int8))
    # Chain rule back to z_raw (docs/gradient.md §3): d/dz_raw [softcap tanh(z_raw/softcap) / T] = (1 - tanh^2) / T.
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = dz * inv_temp
    dz_off = local_rows.to(tl.int64)[:, None] * stride_dz + local_cols[None, :]
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_DB:
        tl.store(db_part_ptr + tb.to(tl.int64) * n_v + local_cols, tl.sum(dz, axis=0), mask=col_mask)


@triton.jit
def _dw_gemm_kernel(
    dz_ptr, hidden_ptr, token_idx_ptr, acc_ptr, out_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_dz, stride_h, num_vb_skip, group,
    LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr, FILTER: tl.constexpr, DOT: tl.constexpr,
    SKIP_BN: tl.constexpr, SKIP_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[v_start + m, n] (+)= sum_k dz[k, m] h[token_idx[tok_start + k], n]``: program (vocab block, H
    block), reduction over the chunk's tokens in order, fp32 in registers. ``acc``/``out`` are ``[V, H]``
    row-major (``acc`` fp32; ``out`` in the weight's dtype; they may be the same tensor).

    The hidden rows of a step are gathered through ``token_idx``. Each step's indices are loaded one step
    ahead (``tok`` is loop-carried), so that the hidden-row load of a step depends on no load of the same
    step: Triton's pipeliner then treats it as a direct load and buffers it ``num_stages - 1`` steps ahead,
    instead of splitting those stages between the index load and the row load (the module docstring)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_v, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    pm, pn = swizzle(pid, num_m, num_n, group)
    local_cols = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    v_mask = local_cols < n_v
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    idx_ptr = token_idx_ptr + tok_start
    ks0 = tl.arange(0, BLOCK_K)
    tok = tl.load(idx_ptr + ks0, mask=ks0 < n_tok, other=0).to(tl.int64)  # step 0's rows
    for k0 in range(0, n_tok, BLOCK_K):
        ks = k0 + ks0
        k_mask = ks < n_tok
        # The next step's rows, before this step's loads (index n_tok and beyond: masked, row 0).
        ks_next = ks + BLOCK_K
        tok_next = tl.load(idx_ptr + ks_next, mask=ks_next < n_tok, other=0).to(tl.int64)
        go = True
        if FILTER:
            go = tl.load(skip_ptr + (k0 // SKIP_BN) * num_vb_skip + (pm * BLOCK_M) // SKIP_BV) == 0
        if go:
            # dz^T tile [BLOCK_M vocab, BLOCK_K tokens]
            a = tl.load(dz_ptr + ks.to(tl.int64)[None, :] * stride_dz + local_cols[:, None],
                        mask=v_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(hidden_ptr + tok[:, None] * stride_h + hs[None, :],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = dot_acc(a, b, acc, DOT)
        tok = tok_next
    off = (v_start + local_cols).to(tl.int64)[:, None] * H + hs[None, :]
    mask = v_mask[:, None] & h_mask[None, :]
    finish(acc, acc_ptr, out_ptr, off, off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _dh_gemm_kernel(
    dz_ptr, weight_ptr, token_idx_ptr, acc_ptr, out_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_dz, stride_w, num_vb_skip, group,
    LOAD_ACC: tl.constexpr, ACC_GATHERED: tl.constexpr, STORE_OUT: tl.constexpr, FILTER: tl.constexpr,
    DOT: tl.constexpr, SKIP_BN: tl.constexpr, SKIP_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dh[token_idx[tok_start + m], n] (+)= sum_k dz[m, k] W[v_start + k, n]``: program (token block, H
    block), reduction over the range's vocabulary in order, fp32 in registers. ``out`` is ``dhidden
    [N, H]`` (rows gathered through token_idx); ``acc`` is either ``out`` itself (ACC_GATHERED, fp32 hidden)
    or a compact fp32 ``[Nc, H]`` buffer indexed by plan position."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_tok, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    pm, pn = swizzle(pid, num_m, num_n, group)
    local_rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local_rows < n_tok
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dz_row_off = local_rows.to(tl.int64)[:, None] * stride_dz
    for k0 in range(0, n_v, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_v
        go = True
        if FILTER:
            go = tl.load(skip_ptr + ((pm * BLOCK_M) // SKIP_BN) * num_vb_skip + k0 // SKIP_BV) == 0
        if go:
            a = tl.load(dz_ptr + dz_row_off + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(weight_ptr + (v_start + ks).to(tl.int64)[:, None] * stride_w + hs[None, :],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = dot_acc(a, b, acc, DOT)
    rows = tok_start + local_rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    mask = row_mask[:, None] & h_mask[None, :]
    out_off = tok[:, None] * H + hs[None, :]
    acc_off = rows[:, None] * H + hs[None, :]
    if ACC_GATHERED:
        acc_off = out_off
    finish(acc, acc_ptr, out_ptr, acc_off, out_off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _bias_reduce_kernel(
    db_part_ptr, acc_ptr, out_ptr, v_start, n_v, num_tb,
    LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """``db[v_start + c] (+)= sum_i db_part[i, c]`` over the chunk's token blocks, in order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_v
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = db_part_ptr + cols
    for i in range(num_tb):  # token blocks in order: a fixed reduction order
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += n_v
    off = v_start + cols
    finish(acc, acc_ptr, out_ptr, off, off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _scatter_rows_kernel(acc_ptr, token_idx_ptr, out_ptr, n_tok, H, group,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[token_idx[m], :] = acc[m, :]`` cast to out's dtype: the compact fp32 dhidden accumulator
    (plan order) into the ``[N, H]`` gradient."""
    pid = tl.program_id(0)
    pm, pn = swizzle(pid, tl.cdiv(n_tok, BLOCK_M), tl.cdiv(H, BLOCK_N), group)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n_tok
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (hs < H)[None, :]
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    x = tl.load(acc_ptr + rows[:, None] * H + hs[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + tok[:, None] * H + hs[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host
# ---------------------------------------------------------------------------------------------

class BlockLaunches:
    """The backward's kernel launches over one (token chunk x vocabulary range) block of the ``[Nc, V]``
    plane, with one config: :func:`linear_backward` walks the plane with it, and the tune step
    (``benchmarks/gpu/tune.py``) times each kernel on one block of its G1 plan through the same calls.

    ``db_part`` / ``skip``: the bias partials and the filter flags (any tensor when unused).
    """

    def __init__(self, cfg: LinearKernelConfig, hidden, weight, bias, plan, transform: LogitTransform, lse,
                 grad_seq, grad_filter_eps, db_part, skip):
        self.cfg, self.hidden, self.weight, self.bias = cfg, hidden, weight, bias
        self.token_idx = plan.token_idx.contiguous()
        self.targets = plan.targets.contiguous()
        self.seq_id = plan.seq_id.contiguous()
        self.lse = lse.contiguous().float()
        self.grad_seq = grad_seq.contiguous().float()
        self.softcap_v, self.inv_temp, self.has_softcap = _softcap_args(transform)
        self.eps = float(grad_filter_eps)
        self.use_filter = grad_filter_eps > 0
        self.db_part, self.skip = db_part, skip
        self.dot = dot_mode(hidden.dtype)
        # Token weights: the switch only when on (the launch without them is exactly the one of before).
        weights = getattr(plan, "token_weights", None)
        self.weight_args = {} if weights is None else dict(weights_ptr=weights.contiguous().float(),
                                                            HAS_WEIGHTS=True)

    def grad_logits(self, dz_buf, stride, tok_start, n_tok, v_start, n_v, with_db):
        """dz of the block into ``dz_buf`` (row stride ``stride``), bias partials if ``with_db``."""
        cfg, hidden, weight, bias = self.cfg, self.hidden, self.weight, self.bias
        _grad_logits_kernel[(triton.cdiv(n_tok, cfg.block_n) * triton.cdiv(n_v, cfg.block_v),)](
            hidden, weight, bias if bias is not None else hidden, self.token_idx, self.targets, self.seq_id,
            self.lse, self.grad_seq, dz_buf, self.db_part, self.skip,
            tok_start, n_tok, v_start, n_v, hidden.shape[1], hidden.stride(0), weight.stride(0), stride,
            cfg.group, self.softcap_v, self.inv_temp, self.eps,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=self.has_softcap, DOT=self.dot, NEED_DB=with_db,
            FILTER=self.use_filter, **cfg.launch("linear_dz"), **self.weight_args)

    def dw_gemm(self, dz_buf, stride, acc, out, tok_start, n_tok, v_start, n_v, load_acc, store_out):
        """``dW[v_start:v_start+n_v] (+)= dz^T h[chunk]`` (see ``_dw_gemm_kernel``)."""
        cfg, hidden = self.cfg, self.hidden
        H = hidden.shape[1]
        launch = cfg.launch("linear_dw")
        _dw_gemm_kernel[(triton.cdiv(n_v, launch["BLOCK_M"]) * triton.cdiv(H, launch["BLOCK_N"]),)](
            dz_buf, hidden, self.token_idx, acc, out, self.skip,
            tok_start, n_tok, v_start, n_v, H, stride, hidden.stride(0), triton.cdiv(n_v, cfg.block_v), cfg.group,
            LOAD_ACC=load_acc, STORE_OUT=store_out, FILTER=self.use_filter, DOT=self.dot,
            SKIP_BN=cfg.block_n, SKIP_BV=cfg.block_v, **launch)

    def dh_gemm(self, dz_buf, stride, acc, out, tok_start, n_tok, v_start, n_v, load_acc, gathered, store_out):
        """``dh[chunk] (+)= dz W[v_start:v_start+n_v]`` (see ``_dh_gemm_kernel``)."""
        cfg, weight = self.cfg, self.weight
        H = weight.shape[1]
        launch = cfg.launch("linear_dh")
        _dh_gemm_kernel[(triton.cdiv(n_tok, launch["BLOCK_M"]) * triton.cdiv(H, launch["BLOCK_N"]),)](
            dz_buf, weight, self.token_idx, acc, out, self.skip,
            tok_start, n_tok, v_start, n_v, H, stride, weight.stride(0), triton.cdiv(n_v, cfg.block_v), cfg.group,
            LOAD_ACC=load_acc, ACC_GATHERED=gathered, STORE_OUT=store_out, FILTER=self.use_filter, DOT=self.dot,
            SKIP_BN=cfg.block_n, SKIP_BV=cfg.block_v, **launch)


def linear_backward(hidden, weight, bias, plan, transform: LogitTransform, options: KernelOptions, lse, grad_seq,
                    need_hidden, need_weight, need_bias):
    """Gradients of ``sum_s grad_seq[s] * L_s`` w.r.t. hidden, weight and bias, by streaming dz.

    Args:
        hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` | None, plan, transform: as in forward.
        options: :class:`KernelOptions`. ``deterministic`` is accepted: every mode of this backend is bitwise
            reproducible (docs/numerics.md §5). ``grad_filter_eps > 0`` skips tiles whose
            ``|g (onehot - softmax)|`` is below it everywhere.
        lse: ``[Nc]`` fp32 from :func:`linear_forward`. grad_seq: ``[S]`` upstream gradient ``dloss/dL_s``.
        need_hidden / need_weight / need_bias: which gradients to compute (a frozen head skips dW).
    Returns:
        :class:`~spo_kernels.kernels.types.LinearGrads`: ``dhidden [N, H]`` in hidden's dtype (zero on rows
        outside the plan), ``dweight [V, H]`` / ``dbias [V]`` in their parameter's dtype; None where not needed.
    """
    grad_filter_eps = float(options.grad_filter_eps)  # options.deterministic: every path is deterministic
    hidden, weight, bias = _prep(hidden, weight, bias)
    need_bias = bool(need_bias and bias is not None)
    device = hidden.device
    N, H = hidden.shape
    V = weight.shape[0]
    Nc = plan.num_tokens
    if Nc == 0 or not (need_hidden or need_weight or need_bias):
        return LinearGrads(
            hidden=torch.zeros((N, H), dtype=hidden.dtype, device=device) if need_hidden else None,
            weight=torch.zeros((V, H), dtype=weight.dtype, device=device) if need_weight else None,
            bias=torch.zeros_like(bias) if need_bias else None)
    cfg = kernel_config(hidden.dtype, device=device, Nc=Nc, H=H)
    use_filter = grad_filter_eps > 0
    bp = plan_backward(N, Nc, V, H, hidden.dtype, weight.dtype, bias.dtype if need_bias else None,
                       need_hidden, need_weight, need_bias, cfg, use_filter, TH.num_sms(device))
    f32 = torch.float32
    # Gradients. dhidden is zero outside the plan: zeroed up front unless its storage hosts the scratch
    # (then it is zeroed after the last read of dz, just before the accumulator is scattered into it).
    dh = None
    if need_hidden:
        dh = TH.empty((N, H), hidden.dtype, device) if bp.scratch == "dhidden" else torch.zeros(
            (N, H), dtype=hidden.dtype, device=device)
    dw = TH.empty((V, H), weight.dtype, device) if need_weight else None
    db = TH.empty((V,), bias.dtype, device) if need_bias else None
    # Accumulators: none, the gradient itself (fp32), a fresh fp32 buffer, or dW's tail rows.
    def accumulator(kind, own, shape):
        return TH.empty(shape, f32, device) if kind == "fresh" else (None if kind == "none" else own)

    if bp.dh_acc == "weight_tail":
        # Rows >= tail_start of dW, reinterpreted as fp32 [Nc, H]; dW's own values go there in phase 2.
        start = bp.tail_start * H  # a multiple of block_v * H elements: the fp32 view is aligned
        dh_acc = dw.view(-1)[start: start + Nc * H * 4 // dw.element_size()].view(f32).view(Nc, H)
        if TH.POISON_EMPTY:
            dh_acc.fill_(float("nan"))
    else:
        dh_acc = accumulator(bp.dh_acc, dh, (Nc, H))
    dw_acc = accumulator(bp.dw_acc, dw, (V, H))
    db_acc = accumulator(bp.db_acc, db, (V,))
    if bp.scratch == "dhidden":
        dz = dh.view(-1)[: bp.dz_rows * bp.stride_dz].view(bp.dz_rows, bp.stride_dz)
        if TH.POISON_EMPTY:
            dz.fill_(float("nan"))
    else:
        dz = TH.empty((bp.dz_rows, bp.stride_dz), hidden.dtype, device)
    db_part = TH.empty(bp.db_part_shape, f32, device) if need_bias else dz
    skip = TH.empty((bp.num_skip_flags,), torch.int8, device) if use_filter else dz

    run = BlockLaunches(cfg, hidden, weight, bias, plan, transform, lse, grad_seq, grad_filter_eps, db_part, skip)
    grad_logits = run.grad_logits

    def dw_gemm(dz_buf, stride, tok_start, n_tok, v_start, n_v, load_acc, store_out):
        run.dw_gemm(dz_buf, stride, dw_acc if dw_acc is not None else dw, dw, tok_start, n_tok, v_start, n_v,
                    load_acc, store_out)

    with TH.device_guard(hidden):
        # Phase 1: every block of the plane.
        for tok_start, n_tok in bp.tok_blocks:
            num_tb = triton.cdiv(n_tok, cfg.block_n)
            first_tok, last_tok = tok_start == 0, tok_start + n_tok == Nc
            for v_start, n_v in bp.v_blocks:
                first_v, last_v = v_start == 0, v_start + n_v == V
                grad_logits(dz, bp.stride_dz, tok_start, n_tok, v_start, n_v, need_bias)
                if need_weight and v_start < bp.tail_start:
                    # Across token chunks (token-outer) dW accumulates in fp32; the last chunk writes it.
                    dw_gemm(dz, bp.stride_dz, tok_start, n_tok, v_start, n_v, not first_tok,
                            last_tok or dw_acc is dw)
                if need_bias:
                    _bias_reduce_kernel[(triton.cdiv(n_v, 128),)](
                        db_part, db_acc if db_acc is not None else db, db, v_start, n_v, num_tb,
                        LOAD_ACC=not first_tok, STORE_OUT=last_tok or db_acc is db, BLOCK=128, num_warps=4)
                if need_hidden:
                    # Across vocab ranges (vocab-outer) dhidden accumulates in fp32. The last range writes
                    # dhidden itself, unless dhidden's storage is the scratch being read (then see below).
                    gathered = dh_acc is dh
                    store_out = (last_v and bp.scratch != "dhidden") or gathered
                    run.dh_gemm(dz, bp.stride_dz, dh_acc if dh_acc is not None else dh, dh, tok_start, n_tok,
                                v_start, n_v, not first_v, gathered, store_out)
        if bp.scratch == "dhidden":
            # dz is dead: dhidden = 0 outside the plan, the accumulator on its rows.
            dh.zero_()
            bm, bn = cfg.params("linear_dh")["block_m"], cfg.params("linear_dh")["block_n"]
            _scatter_rows_kernel[(triton.cdiv(Nc, bm) * triton.cdiv(H, bn),)](
                dh_acc, run.token_idx, dh, Nc, H, cfg.group, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        # Phase 2: the dW rows that held the accumulator, from a second recompute of their dz.
        if bp.tail_blocks:
            dz_tail = TH.empty((Nc, bp.tail_stride_dz), hidden.dtype, device)
            for v_start, n_v in bp.tail_blocks:
                grad_logits(dz_tail, bp.tail_stride_dz, 0, Nc, v_start, n_v, False)
                dw_gemm(dz_tail, bp.tail_stride_dz, 0, Nc, v_start, n_v, False, True)
    return LinearGrads(hidden=dh, weight=dw, bias=db)
