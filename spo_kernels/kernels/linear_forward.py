"""Fused-linear path in Triton, forward: ``hidden [N, H]`` and the LM head ``W [V, H]`` (+ bias) in,
per-sequence completion log-probs out; logits exist only as on-chip tiles (docs/gradient.md §6, §8).
The backward is in ``linear_backward``, its plan in ``linear_plan``, launch parameters in
``linear_config``; ``linear_logprobs`` re-exports all of it.

Notation: ``Nc`` plan tokens (completion tokens only, :class:`~spo_kernels.layout.TokenPlan`), ``S``
sequences, ``V`` vocabulary, ``H`` hidden size. Per plan token ``t`` with row ``r = token_idx[t]``:

    z_raw = h_r W^T + b                                        (fp32 accumulation over H)
    z     = softcap * tanh(z_raw / softcap) / temperature      (SPEC 2; each part optional)
    lse_t = logsumexp_v z_v,   logp_t = z_{y_t} - lse_t,   L_s = sum_{t in s} logp_t
    dz_raw = g_{s(t)} * (onehot(y_t) - exp(z - lse_t)) * (1 - tanh^2(z_raw / softcap)) / temperature
    dhidden_r = dz_raw W,   dW = sum_t dz_raw^T h_r,   db = sum_t dz_raw

Forward (``linear_forward``), 2 Nc V H FLOPs, O(Nc) extra memory
-------------------------------------------------------------------
1. ``_forward_partials_kernel``: a 1-D grid of (token block, vocabulary split) programs. Each program
   gathers its token rows through ``token_idx`` (no compacted copy of ``hidden``) and walks the vocabulary
   tiles of its split in order: logit tile by ``tl.dot`` over H in ``BLOCK_H`` chunks, bias, softcap,
   temperature, then lanes ``>= V`` set to -inf (after every transform: a padded lane must never enter the
   softmax as a logit 0), online max / sum-exp, and the target logit picked where ``col == y``. It writes
   one ``(max, sumexp, target)`` triple per (split, token).
   Why splits instead of one program per token block walking all of V: with few completion tokens (a
   small batch, or the reference pass) ``Nc / BLOCK_N`` programs do not fill the GPU; a handful of splits
   (``>= 8``, about 4 waves in total) does, and the partials cost ``12 * splits * Nc`` bytes. Programs
   are ordered in groups of token blocks x all splits so that the programs resident together share
   their ``hidden`` blocks and ``W`` tiles through L2.
2. ``_merge_segments_kernel``: one program per sequence walks its contiguous run of the plan in order,
   merges the split partials (``lse = M + log sum_j s_j exp(m_j - M)``), writes ``lse`` (fp32, saved for
   backward) and the sequence sum ``L_s``. A fixed-order segment reduction: no atomics, deterministic.


Numerics: fp32 accumulation everywhere; 16-bit inputs use native tensor-core dots, fp32 inputs use
``input_precision="ieee"`` (TF32 would miss SPEC 7's 1e-5). Offsets into ``[N, H]``, ``[V, H]`` and the
dz scratch are int64. Every grid is 1-D (axis 0 allows 2^31 - 1 programs): no token or vocabulary
count ever lands on the 65535-limited axes 1/2. (docs/numerics.md §1-§3.)

Compatibility: triton 3.6 (GPU image) to 3.9; only long-standing ``tl`` APIs; tanh is written with
``exp``. Under ``TRITON_INTERPRET=1`` (3.9) ``tl.dot`` on bfloat16 returns garbage, so the interpreter
upcasts 16-bit operands to fp32 before the dot (exact products, same fp32 accumulation as the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_helpers as TH
from .linear_config import kernel_config
from .triton_helpers import dot_acc, dot_mode, swizzle, tanh_exp
from .types import KernelOptions, LogitTransform, LogprobResult, TokenStats

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# device code
# ---------------------------------------------------------------------------------------------

@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_row_off, row_mask, cols, col_mask, H, stride_w,
                softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Transformed logits of one tile, fp32 ``[BLOCK_N, BLOCK_V]``, and ``tanh(z_raw / softcap)`` (for the
    softcap chain rule; meaningless without softcap). ``h_row_off`` are int64 element offsets of the
    gathered hidden rows; lanes with ``col_mask`` False come out as -inf."""
    w_row_off = cols.to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # z_raw = sum over H chunks of h[:, k:k+BH] @ W[cols, k:k+BH]^T (every chunk, not just one block of H).
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(hidden_ptr + h_row_off[:, None] + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(weight_ptr + w_row_off[None, :] + ks[:, None],
                      mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot_acc(h, w_t, acc, DOT)
    # The bias is added once, after the whole H reduction.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        # Softcap then temperature (docs/gradient.md §3).
        t = tanh_exp(acc / softcap)
        acc = softcap * t
    z = acc * inv_temp
    # Lanes past V (docs/numerics.md §3): -inf after every transform, so they never enter the log-sum-exp.
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, t


@triton.jit
def _forward_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, token_idx_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_tgt_ptr,
    num_tokens, V, H, stride_h, stride_w, num_splits, tiles_per_split, group, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    part_stats_ptr=None, STATS: tl.constexpr = False,
):
    """Program (token block, split): online (max, sumexp) and target logit over the split's vocab tiles.
    Partials are ``[num_splits, num_tokens]`` fp32.

    STATS (SPEC 8): also, per (split, token), relative to the running max m: ``u = sum e (z - m)`` and
    ``q = sum e^2`` with ``e = exp(z - m)`` (rescaled with the max like the sum), the logit sum, and the
    largest logit of a column before the target's (the first-argmax test): four more partials at
    ``part_stats[k, split, token]``."""
    pid = tl.program_id(0)
    num_tb = tl.cdiv(num_tokens, BLOCK_N)
    tb, split = swizzle(pid, num_tb, num_splits, group)
    rows = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_tokens
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    h_row_off = tok * stride_h

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if STATS:
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        q = tl.zeros((BLOCK_N,), dtype=tl.float32)
        z_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        max_before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    num_vt = tl.cdiv(V, BLOCK_V)
    vt_end = tl.minimum((split + 1) * tiles_per_split, num_vt)
    for vt in range(split * tiles_per_split, vt_end):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_row_off, row_mask, cols, col_mask, H,
                           stride_w, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        # Online log-sum-exp: every tile holds at least one lane < V, so m_new is finite.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        if STATS:
            # Every reduction of z itself first, so that only d = z - m_new and e = exp(d) are live tiles
            # after it (G1's 128 x 128 tile spills with three).
            tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            max_before = tl.maximum(max_before, tl.max(tl.where(cols[None, :] < tgt[:, None], z, float("-inf")),
                                                       axis=1))
            # Lanes past V: z = -inf, so d = -inf and e = 0; dm (d, 0 there) keeps 0 * -inf out of u.
            dm = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            e = tl.exp(z - m_new[:, None])
            alpha = tl.exp(m - m_new)
            # The old sums moved to the new max: u <- alpha (u + (m - m_new) s). Before the first tile m = -inf
            # and s = 0: m_new stands in for m there, so no -inf * 0 is formed.
            shift = (tl.where(s > 0.0, m, m_new) - m_new) * s
            u = alpha * (u + shift) + tl.sum(e * dm, axis=1)
            q = q * alpha * alpha + tl.sum(e * e, axis=1)
            # sum z over the valid columns, from the deviations: sum dm + (valid columns) m_new.
            z_sum += tl.sum(dm, axis=1) + tl.minimum(V - vt * BLOCK_V, BLOCK_V).to(tl.float32) * m_new
            s = s * alpha + tl.sum(e, axis=1)
        else:
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            # The target logit, from the tile that holds column y (exactly one tile over all splits).
            tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split.to(tl.int64) * num_tokens + rows
    tl.store(part_max_ptr + out, m, mask=row_mask)
    tl.store(part_sum_ptr + out, s, mask=row_mask)
    tl.store(part_tgt_ptr + out, tz, mask=row_mask)
    if STATS:
        plane = num_splits.to(tl.int64) * num_tokens
        tl.store(part_stats_ptr + out, u, mask=row_mask)
        tl.store(part_stats_ptr + plane + out, q, mask=row_mask)
        tl.store(part_stats_ptr + 2 * plane + out, z_sum, mask=row_mask)
        tl.store(part_stats_ptr + 3 * plane + out, max_before, mask=row_mask)


@triton.jit
def _merge_segments_kernel(
    part_max_ptr, part_sum_ptr, part_tgt_ptr, seq_offsets_ptr, lse_ptr, seq_logps_ptr,
    num_tokens, num_splits,
    SAVE_LSE: tl.constexpr, BLOCK_T: tl.constexpr,
    weights_ptr=None, part_stats_ptr=None, stats_ptr=None, V=1,
    HAS_WEIGHTS: tl.constexpr = False, STATS: tl.constexpr = False,
):
    """Program s: walk plan entries ``[seq_offsets[s], seq_offsets[s+1])`` in order, merge the split
    partials into ``lse``, and sum ``w_t logp_t`` (``logp = z_y - lse`` fp32; ``w_t = 1`` without
    HAS_WEIGHTS) into ``L_s`` in float64 (SPEC 7, docs/numerics.md §1; 0 for an empty sequence).
    STATS: the per-token statistics ``[4, Nc]`` from the split partials (:func:`_merge_stats`)."""
    seq = tl.program_id(0)
    start = tl.load(seq_offsets_ptr + seq)
    end = tl.load(seq_offsets_ptr + seq + 1)
    total = tl.zeros((BLOCK_T,), dtype=tl.float64)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = rows < end
        big_m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
        off = rows  # int64 offsets of split sp: sp * num_tokens + row, advanced by addition
        for sp in range(num_splits):
            big_m = tl.maximum(big_m, tl.load(part_max_ptr + off, mask=mask, other=0.0))
            off += num_tokens
        sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_T,), dtype=tl.float32)
        off = rows
        for sp in range(num_splits):
            m_sp = tl.load(part_max_ptr + off, mask=mask, other=0.0)
            # lse = M + log sum_j s_j exp(m_j - M)
            sum_exp += tl.load(part_sum_ptr + off, mask=mask, other=1.0) * tl.exp(m_sp - big_m)
            tgt += tl.load(part_tgt_ptr + off, mask=mask, other=0.0)
            off += num_tokens
        lse = big_m + tl.log(sum_exp)
        if SAVE_LSE:
            tl.store(lse_ptr + rows, lse, mask=mask)
        if STATS:
            _merge_stats(part_max_ptr, part_sum_ptr, part_stats_ptr, stats_ptr, rows, mask, big_m, sum_exp, tgt,
                         num_tokens, num_splits, V, BLOCK_T)
        logp = (tgt - lse).to(tl.float64)
        if HAS_WEIGHTS:
            logp = logp * tl.load(weights_ptr + rows, mask=mask, other=0.0).to(tl.float64)
        total += tl.where(mask, logp, 0.0)
    tl.store(seq_logps_ptr + seq, tl.sum(total, axis=0))


@triton.jit
def _merge_stats(part_max_ptr, part_sum_ptr, part_stats_ptr, stats_ptr, rows, mask, big_m, sum_exp, tgt,
                 num_tokens, num_splits, V, BLOCK_T: tl.constexpr):
    """The statistics of plan entries ``rows`` from the split partials, at the max ``M`` over splits:
    ``U = sum_j e^{m_j - M} (u_j + (m_j - M) s_j)``, ``Q = sum_j q_j e^{2 (m_j - M)}``; with ``S`` (sum_exp):
    entropy ``log S - U / S``, ``log sum p^2 = log Q - 2 log S``, mean logit ``sum z / V``, and the target is
    the first argmax when ``z_y >= M`` and ``z_y`` beats every column before it."""
    plane = num_splits.to(tl.int64) * num_tokens
    u = tl.zeros((BLOCK_T,), dtype=tl.float32)
    q = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    max_before = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    off = rows
    for sp in range(num_splits):
        m_sp = tl.load(part_max_ptr + off, mask=mask, other=0.0)
        scale = tl.exp(m_sp - big_m)
        s_sp = tl.load(part_sum_ptr + off, mask=mask, other=0.0)
        u += scale * (tl.load(part_stats_ptr + off, mask=mask, other=0.0) + (m_sp - big_m) * s_sp)
        q += scale * scale * tl.load(part_stats_ptr + plane + off, mask=mask, other=1.0)  # no log(0) off the run
        z_sum += tl.load(part_stats_ptr + 2 * plane + off, mask=mask, other=0.0)
        max_before = tl.maximum(max_before, tl.load(part_stats_ptr + 3 * plane + off, mask=mask, other=0.0))
        off += num_tokens
    log_s = tl.log(sum_exp)
    tl.store(stats_ptr + rows, log_s - u / sum_exp, mask=mask)
    tl.store(stats_ptr + num_tokens + rows, tl.log(q) - 2.0 * log_s, mask=mask)
    tl.store(stats_ptr + 2 * num_tokens + rows, z_sum / V, mask=mask)
    is_argmax = (tgt >= big_m) & (tgt > max_before)
    tl.store(stats_ptr + 3 * num_tokens + rows, tl.where(is_argmax, 1.0, 0.0), mask=mask)


# ---------------------------------------------------------------------------------------------
# host
# ---------------------------------------------------------------------------------------------

def _prep(hidden, weight, bias):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"the triton backend supports float32/bfloat16/float16 {name}, got {t.dtype} "
                            f"(use backend='torch' or 'reference' for float64)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, bias


def _softcap_args(transform: LogitTransform):
    """``(softcap, 1 / temperature, HAS_SOFTCAP)`` kernel arguments, the multiplier folded into softcap and
    temperature (:meth:`LogitTransform.folded`: ``c tanh(m x / c) / tau = c' tanh(x / c') / tau'``)."""
    softcap, temperature = transform.folded()
    return (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature), softcap is not None


def linear_forward(hidden, weight, bias, plan, transform: LogitTransform, options: KernelOptions,
                   save_lse: bool) -> LogprobResult:
    """Per-sequence completion log-probs from hidden states and the head, logits on chip only.

    Args:
        hidden: ``[N, H]`` fp32/bf16/fp16; weight: ``[V, H]`` same dtype; bias: ``[V]`` or None.
        plan: :class:`~spo_kernels.layout.TokenPlan` (``Nc`` completion tokens of ``S`` sequences).
        transform: :class:`LogitTransform`; options: :class:`KernelOptions` (``token_stats``).
        save_lse: also return the per-token log-sum-exp (needed by backward).
    Returns:
        :class:`LogprobResult`: ``seq_logps [S] float64``, ``lse [Nc] fp32`` or None, ``stats`` or None.
    """
    hidden, weight, bias = _prep(hidden, weight, bias)
    device = hidden.device
    S, Nc = plan.num_seqs, plan.num_tokens
    V, H = weight.shape
    if Nc == 0:
        lse = torch.empty(0, dtype=torch.float32, device=device) if save_lse else None
        return LogprobResult(torch.zeros(S, dtype=torch.float64, device=device), lse)
    cfg = kernel_config(hidden.dtype, device=device, Nc=Nc, H=H)
    fwd = cfg.launch("linear_fwd")
    num_tb = triton.cdiv(Nc, fwd["BLOCK_N"])
    num_vt = triton.cdiv(V, fwd["BLOCK_V"])
    sms = TH.num_sms(device)
    splits = cfg.num_splits or max(8, triton.cdiv(4 * sms, num_tb))
    splits = max(1, min(splits, num_vt))
    tiles_per_split = triton.cdiv(num_vt, splits)
    splits = triton.cdiv(num_vt, tiles_per_split)  # no empty split
    group = max(1, sms // splits)
    want_stats = bool(options.token_stats)
    # Partials: (max, sum, target) and, with statistics, (u, q, logit sum, max before the target).
    parts = TH.empty((7 if want_stats else 3, splits, Nc), torch.float32, device)
    lse = TH.empty((Nc,), torch.float32, device) if save_lse else parts
    seq_logps = TH.empty((S,), torch.float64, device)  # per-sequence sums in float64 (SPEC 7)
    stats = TH.empty((4, Nc), torch.float32, device) if want_stats else None
    softcap_v, inv_temp, has_softcap = _softcap_args(transform)
    token_idx = plan.token_idx.contiguous()
    targets = plan.targets.contiguous()
    weights = plan.token_weights
    # The switches only when on: the launches without them are exactly the ones of before.
    extra_fwd = dict(part_stats_ptr=parts[3], STATS=True) if want_stats else {}
    extra_merge = {}
    if weights is not None:
        extra_merge.update(weights_ptr=weights.contiguous(), HAS_WEIGHTS=True)
    if want_stats:
        extra_merge.update(part_stats_ptr=parts[3], stats_ptr=stats, V=V, STATS=True)
    with TH.device_guard(hidden):
        _forward_partials_kernel[(num_tb * splits,)](
            hidden, weight, bias if bias is not None else hidden, token_idx, targets,
            parts[0], parts[1], parts[2],
            Nc, V, H, hidden.stride(0), weight.stride(0), splits, tiles_per_split, group, softcap_v, inv_temp,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, DOT=dot_mode(hidden.dtype), **fwd, **extra_fwd,
        )
        _merge_segments_kernel[(S,)](
            parts[0], parts[1], parts[2], plan.seq_offsets.contiguous(), lse, seq_logps, Nc, splits,
            SAVE_LSE=save_lse, BLOCK_T=cfg.segment_block, num_warps=4, **extra_merge,
        )
    return LogprobResult(seq_logps, lse if save_lse else None, TokenStats(*stats.unbind(0)) if want_stats else None)
