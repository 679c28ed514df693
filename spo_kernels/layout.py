"""Layouts (SPEC 6) normalized to one token plan, with the label / cu_seqlens checks of SPEC 7.

Layout A, padded: ``[S, T, ...]`` with labels ``[S, T]``.  Layout B, packed: ``[N, ...]`` with labels
``[N]`` and ``cu_seqlens [S+1]`` (int32).  Both become a :class:`TokenPlan` over the flattened
``[N, ...]`` rows: only tokens with a real label are listed (ignored tokens cost nothing), in order,
so each sequence's tokens are one contiguous run of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# The input checks live in .checks; check_float / check_same_device / check_labels stay importable here.
from .checks import FLOAT_DTYPES, INT_DTYPES, check_float, check_labels, check_same_device, check_tensor
from .config import check_bool

__all__ = ["TokenPlan", "build_plan", "host_read", "FLOAT_DTYPES", "INT_DTYPES", "check_float", "check_labels",
           "check_same_device"]

Tensor = torch.Tensor


@dataclass
class TokenPlan:
    """The completion tokens of a batch, compacted.

    token_idx:   ``[Nc]`` int64, row of each completion token in the flattened ``[N, ...]`` input.
    targets:     ``[Nc]`` int64, its label (in ``[0, V)``).
    seq_id:      ``[Nc]`` int64, its sequence (in ``[0, S)``), non-decreasing.
    seq_offsets: ``[S+1]`` int64, sequence s owns plan entries ``[seq_offsets[s], seq_offsets[s+1])``.
    counts:      ``[S]`` int64, completion length ``n_s`` (every completion token, whatever its weight).
    num_rows:    N, rows of the flattened input.
    token_weights: ``[Nc]`` fp32 per-token weight ``w_t`` of ``L_s = sum_t w_t logp_t`` (SPEC 8: the caller's
                 ``token_weights`` times LD-DPO's ``ld_alpha`` weights), or None (every weight 1).
    """

    token_idx: Tensor
    targets: Tensor
    seq_id: Tensor
    seq_offsets: Tensor
    counts: Tensor
    num_rows: int
    token_weights: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.token_idx.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.counts.shape[0]


def build_plan(labels: Tensor, vocab_size: int, ignore_index: int, lead_shape, device,
               cu_seqlens: Optional[Tensor] = None, pairs: bool = True, *, shift_labels: bool = False,
               token_weights: Optional[Tensor] = None, ld_alpha: Optional[float] = None) -> TokenPlan:
    """Validate labels / cu_seqlens against the input's leading shape and build the token plan.

    ``lead_shape`` is the input's shape without its last dim: ``(S, T)`` padded or ``(N,)`` packed.
    ``pairs=True`` requires an even number of sequences (chosen rows first, then rejected).

    ``shift_labels`` (SPEC 6): Hugging Face labels, the target of position t is label t+1 of the same
    sequence (padded: per row; packed: per ``cu_seqlens`` segment); the last position of each sequence
    gets ``ignore_index``. An ``[N]`` integer shift of the labels, never a copy of the inputs.
    ``token_weights`` (SPEC 8): float weights of the labels' shape (shifted with them), compacted to the
    plan's ``token_weights [Nc]`` fp32. ``ld_alpha`` (LD-DPO, needs ``pairs``): as TRL 1.16, completion
    token k (1-based) of a sequence has weight 1 while ``k <= min(n_chosen, n_rejected)`` of its pair, else
    ld_alpha; multiplied into the caller's weights. ``counts`` stay the full completion lengths.

    Host synchronizations (on CUDA): exactly two, both explicit through :func:`host_read`: one for all
    data-dependent checks together (labels in range; cu_seqlens from 0 to N and monotone), one for the
    number of completion tokens (``nonzero``). Only when that combined check fails are more values read,
    to word the error. Sequence ids and offsets come from ``searchsorted`` (no ``bincount``, which syncs
    for its output size, and no ``repeat_interleave`` without ``output_size``).
    """
    check_labels(labels, device)
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(lead_shape)} "
                         f"(the input's shape without its last dim)")
    labels = labels.long()
    if token_weights is not None:
        check_float("token_weights", token_weights, device)
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(token_weights.shape)}")
    check_bool("shift_labels", shift_labels)
    if cu_seqlens is None:
        if labels.dim() != 2:
            raise ValueError(f"padded layout needs labels [S, T] (2-D); got {labels.dim()}-D labels and no "
                             f"cu_seqlens (pass cu_seqlens for the packed layout)")
        S, T = labels.shape
        num_rows = S * T
        cu = None
    else:
        check_tensor("cu_seqlens", cu_seqlens, device)
        if labels.dim() != 1:
            raise ValueError(f"packed layout (cu_seqlens given) needs labels [N] (1-D), got shape "
                             f"{tuple(labels.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be a 1-D int32 tensor [S+1], got {cu_seqlens.dtype} "
                            f"shape {tuple(cu_seqlens.shape)}")
        S = cu_seqlens.shape[0] - 1
        num_rows = labels.shape[0]
        if S < 1:
            raise ValueError("cu_seqlens must have at least 2 entries [S+1]")
        cu = cu_seqlens.long()
    if pairs and (S == 0 or S % 2 != 0):
        raise ValueError(f"the number of sequences must be even (P chosen then P rejected), got {S}")
    flat = labels.reshape(-1)
    flat_weights = None if token_weights is None else token_weights.detach().reshape(-1)
    if shift_labels and num_rows > 0:
        last = _last_positions(T if cu is None else None, cu, num_rows, flat.device)
        flat = _shift(flat, ignore_index, last)
        if flat_weights is not None:
            flat_weights = _shift(flat_weights, 0.0, last)
    mask = flat != ignore_index
    bad_label = mask & ((flat < 0) | (flat >= vocab_size))
    # Every data-dependent check in one device-side flag, read once.
    problem = bad_label.any()
    if cu is not None:
        problem = problem | (cu[0] != 0) | (cu[-1] != num_rows) | (cu[1:] < cu[:-1]).any()
    if host_read(problem):
        _raise_plan_error(flat, bad_label, cu, num_rows, vocab_size, ignore_index)
    token_idx = mask.nonzero().squeeze(1)  # the one unavoidable sync: Nc sizes every plan tensor
    if cu is None:
        seq_id = torch.div(token_idx, T, rounding_mode="floor")
        bounds = torch.arange(S + 1, device=device, dtype=torch.int64) * T
    else:
        # Row r belongs to the last sequence s with cu[s] <= r (empty sequences own no row).
        seq_id = torch.searchsorted(cu, token_idx, right=True) - 1
        bounds = cu
    # seq_offsets[s] = number of plan tokens on rows < bounds[s]; the plan is sorted by row.
    seq_offsets = torch.searchsorted(token_idx, bounds)
    counts = seq_offsets[1:] - seq_offsets[:-1]
    weights = None if flat_weights is None else flat_weights[token_idx].to(torch.float32)
    if ld_alpha is not None:
        if not pairs:
            raise ValueError("ld_alpha needs preference pairs (chosen sequences first, then rejected)")
        ld = _ld_weights(seq_id, seq_offsets, counts, float(ld_alpha))
        weights = ld if weights is None else weights * ld
    return TokenPlan(token_idx=token_idx, targets=flat[token_idx], seq_id=seq_id,
                     seq_offsets=seq_offsets, counts=counts, num_rows=num_rows, token_weights=weights)


def _last_positions(row_len: Optional[int], cu: Optional[Tensor], num_rows: int, device) -> Tensor:
    """``[N]`` bool: True at each sequence's last position (padded: rows of ``row_len``; packed: the
    segments of ``cu``)."""
    if row_len is not None:
        return (torch.arange(num_rows, device=device) % row_len) == row_len - 1
    # Position r is last when r + 1 starts the next segment (or is N). Out-of-range cu values are clamped
    # here; they fail the plan's checks right after.
    is_end = torch.zeros(num_rows + 1, dtype=torch.bool, device=device)
    is_end[cu[1:].clamp(0, num_rows)] = True
    return is_end[1:]


def _shift(flat: Tensor, fill, last: Tensor) -> Tensor:
    """``out[r] = flat[r + 1]`` within each sequence, ``fill`` where ``last`` marks a sequence's end."""
    nxt = torch.cat([flat[1:], flat.new_full((1,), fill)])
    return torch.where(last, flat.new_full((), fill), nxt)


def _ld_weights(seq_id: Tensor, seq_offsets: Tensor, counts: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's per-token weights (TRL 1.16 ``DPOTrainer``): 1 for the first ``min(n_w, n_l)`` completion
    tokens of each sequence of a pair, ``ld_alpha`` for the rest (the longer completion's tail)."""
    P = counts.shape[0] // 2
    shared = torch.minimum(counts[:P], counts[P:]).repeat(2)
    rank = torch.arange(seq_id.shape[0], device=seq_id.device) - seq_offsets[seq_id]  # 0-based position in s
    return torch.where(rank < shared[seq_id], 1.0, ld_alpha).to(torch.float32)


def host_read(flag: Tensor) -> bool:
    """The plan's explicit device-to-host read of a 0-d flag (a sync on CUDA); tests count these."""
    return bool(flag)


def _raise_plan_error(flat, bad_label, cu, num_rows, vocab_size, ignore_index):
    """Word the error of a failed combined check, in the order the checks are documented (cu_seqlens
    ends, monotone, then labels). Only on the error path, so its extra reads cost nothing."""
    if cu is not None:
        first, last = int(cu[0]), int(cu[-1])
        if first != 0 or last != num_rows:
            raise ValueError(f"cu_seqlens must start at 0 and end at N={num_rows} (cover every row), "
                             f"got {first}..{last}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing (monotone)")
    pos = int(bad_label.nonzero()[0, 0])
    raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
                     f"found {int(flat[pos])} at flattened position {pos}")
