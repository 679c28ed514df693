"""Logits path (``logits_logprobs``), the per-token statistics of SPEC 8 (``token_stats``): the device code
of the forward's STATS variant, one pass over each row beside the log-sum-exp.

Per lane v of the row's tiles (columns v, v + BLOCK_V, ...), with its running max ``m_v`` and
``e = exp(z - m_v)``: ``s_v = sum e`` (the log-sum-exp's own sum), ``u_v = sum e (z - m_v)``, ``q_v = sum e^2``,
the logit sum, the largest logit before the target's column and the target's logit. Relative to the
running max, so that a peaked row keeps its small entropy exactly (``lse - sum p z`` would cancel). Merged
once at the end: entropy ``H = log S - U / S``, ``log sum p^2 = log Q - 2 log S``, mean logit ``sum z / V``,
target-is-argmax ``z_y >= M and z_y > max(z before y)`` (the first maximum, as ``torch.argmax`` and TRL
1.16's ``is_top1``). All on the transformed logits, as TRL's fused head.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logits_tiles import _NO_MAX, _load_tile, _transform


@triton.jit
def _fold_tile_stats(m, s, u, q, z_sum, max_before, z_target, x, vcols, V, target, softcap, temperature,
                     HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, ACC: tl.constexpr,
                     MASKED: tl.constexpr):
    """:func:`_fold_tile` plus the per-lane sums of the statistics (SPEC 8), relative to the lane's max m_v:
    ``u_v = sum e (z - m_v)`` and ``q_v = sum e^2`` with ``e = exp(z - m_v)`` (rescaled with the max, as s),
    ``z_sum`` the lanes' logit sums, ``max_before`` the largest logit of a column before the target's, and
    ``z_target`` the target's logit (from this very fold, so that the argmax test compares equal values).

    With ``w = z - m``: a new max (w > 0) gives ``u <- d (u - w s)`` (the old sum moved to the new max; the
    new element adds ``e^0 * 0``), else ``u <- u + d w``. Lanes past V (-inf) add nothing: their w is set
    to 0 (``d w`` would be ``0 * -inf``)."""
    z = _transform(x.to(ACC), softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    if MASKED:
        valid = vcols < V
        z = tl.where(valid, z, float("-inf"))
    grow = z > m
    m_new = tl.maximum(m, z)
    d = tl.exp(tl.minimum(m, z) - m_new)
    if MASKED:
        w = tl.where(valid, z - m, 0.0)
        z_sum += tl.where(valid, z, 0.0)
    else:
        w = z - m
        z_sum += z
    u = tl.where(grow, d * (u - w * s), u + d * w)
    q = tl.where(grow, q * d * d + 1.0, q + d * d)
    s = tl.where(grow, s * d + 1.0, s + d)
    max_before = tl.maximum(max_before, tl.where(vcols < target, z, float("-inf")))
    z_target = tl.where(vcols == target, z, z_target)
    return m_new, s, u, q, z_sum, max_before, z_target


@triton.jit
def _token_stats(row_ptr, cols, V, stride_col, target, t, num_tokens, lse_ptr, token_logp_ptr, stats_ptr,
                 softcap, temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                 UNIT_COL_STRIDE: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """The STATS body of :func:`_token_logprob_kernel`: one pass over the row's tiles, then the lanes
    merged at the max ``M``: ``S = sum s_v e^{m_v - M}``, ``U = sum e^{m_v - M} (u_v + (m_v - M) s_v)``,
    ``Q = sum q_v e^{2 (m_v - M)}``; ``lse = M + log S``, ``H = log S - U / S``, ``log sum p^2 = log Q - 2 log S``,
    mean logit ``sum z / V``, and the target is the first argmax when ``z_y >= M`` and ``z_y`` beats every
    column before it (``torch.argmax``, TRL's ``is_top1``)."""
    m = tl.full([BLOCK_V], _NO_MAX, ACC)
    s = tl.zeros([BLOCK_V], ACC)
    u = tl.zeros([BLOCK_V], ACC)
    q = tl.zeros([BLOCK_V], ACC)
    z_sum = tl.zeros([BLOCK_V], ACC)
    max_before = tl.full([BLOCK_V], float("-inf"), ACC)
    z_target = tl.full([BLOCK_V], float("-inf"), ACC)
    v_full = (V // BLOCK_V) * BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):  # full tiles: no mask
        x = _load_tile(row_ptr, v0 + cols, V, stride_col, UNIT_COL_STRIDE, False)
        m, s, u, q, z_sum, max_before, z_target = _fold_tile_stats(
            m, s, u, q, z_sum, max_before, z_target, x, v0 + cols, V, target, softcap, temperature,
            HAS_SOFTCAP, HAS_TEMPERATURE, ACC, False)
    if v_full < V:  # the partial last tile
        x = _load_tile(row_ptr, v_full + cols, V, stride_col, UNIT_COL_STRIDE, True)
        m, s, u, q, z_sum, max_before, z_target = _fold_tile_stats(
            m, s, u, q, z_sum, max_before, z_target, x, v_full + cols, V, target, softcap, temperature,
            HAS_SOFTCAP, HAS_TEMPERATURE, ACC, True)
    m_row = tl.max(m, axis=0)
    scale = tl.exp(m - m_row)
    s_row = tl.sum(s * scale, axis=0)
    u_row = tl.sum(scale * (u + (m - m_row) * s), axis=0)  # lanes never reached: scale = 0 and s = 0
    q_row = tl.sum(q * scale * scale, axis=0)
    log_s = tl.log(s_row)
    lse = m_row + log_s
    z_y = tl.max(z_target, axis=0)
    tl.store(lse_ptr + t, lse)
    tl.store(token_logp_ptr + t, z_y - lse)
    stats_t = stats_ptr + t
    tl.store(stats_t, log_s - u_row / s_row)
    tl.store(stats_t + num_tokens, tl.log(q_row) - 2.0 * log_s)
    tl.store(stats_t + 2 * num_tokens, tl.sum(z_sum, axis=0) / V)
    is_argmax = (z_y >= m_row) & (z_y > tl.max(max_before, axis=0))
    tl.store(stats_t + 3 * num_tokens, tl.where(is_argmax, 1.0, 0.0))
