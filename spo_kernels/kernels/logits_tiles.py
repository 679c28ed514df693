"""Device helpers of the logits path shared by its forward (``logits_logprobs``) and the statistics' pass
(``logits_stats``): the SPEC 2 transform in the compute dtype, tile column offsets and loads, and the
finite initial running max of the online log-sum-exp."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_helpers import tanh_sech2


@triton.jit
def _transform(x, softcap, temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """SPEC 2 transform ``z = (c * tanh(x / c)) / tau`` in the compute dtype."""
    z = x
    if HAS_SOFTCAP:
        t, _ = tanh_sech2(x / softcap)
        z = softcap * t
    if HAS_TEMPERATURE:
        z = z / temperature
    return z


@triton.jit
def _col_offsets(vcols, stride_col, UNIT_COL_STRIDE: tl.constexpr):
    """Column offsets of a tile: int32 for a contiguous row (vectorizable), int64 otherwise."""
    if UNIT_COL_STRIDE:
        return vcols
    else:
        return vcols.to(tl.int64) * stride_col


# Initial running max of every lane: finite, below any finite logit, so ``m_new`` is never -inf and
# ``exp(min(m, z) - m_new)`` never sees (-inf) - (-inf). With s = 0 it carries no mass.
_NO_MAX = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX, exact in fp32 and fp64


@triton.jit
def _load_tile(row_ptr, vcols, V, stride_col, UNIT_COL_STRIDE: tl.constexpr, MASKED: tl.constexpr):
    """One vocab tile of a row, in the logits' dtype; only the last tile is ``MASKED`` (lanes >= V read 0)."""
    col_off = _col_offsets(vcols, stride_col, UNIT_COL_STRIDE)
    if MASKED:
        return tl.load(row_ptr + col_off, mask=vcols < V, other=0.0)
    else:
        return tl.load(row_ptr + col_off)
