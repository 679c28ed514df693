"""Layouts (SPEC 6) normalized to one token plan, and the input checks of SPEC 7.

Layout A, padded: ``[S, T, ...]`` with labels ``[S, T]``.  Layout B, packed: ``[N, ...]`` with labels
``[N]`` and ``cu_seqlens [S+1]`` (int32).  Both become a :class:`TokenPlan` over the flattened
``[N, ...]`` rows: only tokens with a real label are listed (ignored tokens cost nothing), in order,
so each sequence's tokens are one contiguous run of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class TokenPlan:
    """The completion tokens of a batch, compacted.

    token_idx:   ``[Nc]`` int64, row of each completion token in the flattened ``[N, ...]`` input.
    targets:     ``[Nc]`` int64, its label (in ``[0, V)``).
    seq_id:      ``[Nc]`` int64, its sequence (in ``[0, S)``), non-decreasing.
    seq_offsets: ``[S+1]`` int64, sequence s owns plan entries ``[seq_offsets[s], seq_offsets[s+1])``.
    counts:      ``[S]`` int64, completion length ``n_s``.
    num_rows:    N, rows of the flattened input.
    """

    token_idx: Tensor
    targets: Tensor
    seq_id: Tensor
    seq_offsets: Tensor
    counts: Tensor
    num_rows: int

    @property
    def num_tokens(self) -> int:
        return self.token_idx.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.counts.shape[0]


def _check_tensor(name: str, x, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")


def check_float(name: str, x, device=None) -> None:
    _check_tensor(name, x, device)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def build_plan(labels: Tensor, vocab_size: int, ignore_index: int, lead_shape, device,
               cu_seqlens: Optional[Tensor] = None, pairs: bool = True) -> TokenPlan:
    """Validate labels / cu_seqlens against the input's leading shape and build the token plan.

    ``lead_shape`` is the input's shape without its last dim: ``(S, T)`` padded or ``(N,)`` packed.
    ``pairs=True`` requires an even number of sequences (chosen rows first, then rejected).
    """
    _check_tensor("labels", labels, device)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(lead_shape)} "
                         f"(the input's shape without its last dim)")
    labels = labels.long()
    if cu_seqlens is None:
        if labels.dim() != 2:
            raise ValueError(f"padded layout needs labels [S, T] (2-D); got {labels.dim()}-D labels and no "
                             f"cu_seqlens (pass cu_seqlens for the packed layout)")
        S, T = labels.shape
        num_rows = S * T
    else:
        _check_tensor("cu_seqlens", cu_seqlens, device)
        if labels.dim() != 1:
            raise ValueError(f"packed layout (cu_seqlens given) needs labels [N] (1-D), got shape "
                             f"{tuple(labels.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be a 1-D int32 tensor [S+1], got {cu_seqlens.dtype} "
                            f"shape {tuple(cu_seqlens.shape)}")
        S = cu_seqlens.shape[0] - 1
        num_rows = labels.shape[0]
        cu = cu_seqlens.long()
        if S < 1:
            raise ValueError("cu_seqlens must have at least 2 entries [S+1]")
        if int(cu[0]) != 0 or int(cu[-1]) != num_rows:
            raise ValueError(f"cu_seqlens must start at 0 and end at N={num_rows} (cover every row), "
                             f"got {int(cu[0])}..{int(cu[-1])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing (monotone)")
    if pairs and (S == 0 or S % 2 != 0):
        raise ValueError(f"the number of sequences must be even (P chosen then P rejected), got {S}")
    flat = labels.reshape(-1)
    mask = flat != ignore_index
    bad = mask & ((flat < 0) | (flat >= vocab_size))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
                         f"found {int(flat[pos])} at flattened position {pos}")
    token_idx = mask.nonzero().squeeze(1)
    if cu_seqlens is None:
        seq_id = torch.div(token_idx, T, rounding_mode="floor")
    else:
        seq_of_row = torch.repeat_interleave(torch.arange(S, device=device), cu[1:] - cu[:-1])
        seq_id = seq_of_row[token_idx]
    counts = torch.bincount(seq_id, minlength=S)
    seq_offsets = torch.zeros(S + 1, dtype=torch.int64, device=device)
    seq_offsets[1:] = torch.cumsum(counts, 0)
    return TokenPlan(token_idx=token_idx, targets=flat[token_idx], seq_id=seq_id,
                     seq_offsets=seq_offsets, counts=counts, num_rows=num_rows)
