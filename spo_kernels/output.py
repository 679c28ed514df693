"""Named results (SPEC 6): never positional tuples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import torch

Tensor = torch.Tensor


class SequenceLogprobs(NamedTuple):
    """Per-sequence results of the log-prob primitives.

    logps:  ``[S]`` fp32 (float64 for float64 input), ``L_s = sum_t w_t m_t logp_t`` (``w_t = 1`` without
            token weights); differentiable.
    counts: ``[S]`` int64, completion length ``n_s``.
    stats:  :class:`SequenceStats` (per-sequence float64 sums of the per-token statistics) when asked for
            with ``token_stats=True``, else None.
    """

    logps: Tensor
    counts: Tensor
    stats: Optional["SequenceStats"] = None


@dataclass
class PreferenceLossOutput:
    """The loss and its detached metrics, named as TRL logs them.

    loss:          scalar fp32, differentiable.
    metrics:       ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
                   ``logps/chosen``, ``logps/rejected``, ``nll``, ``spo/penalty``, ``spo/active_fraction``,
                   ``count/empty_completions`` (scalars, detached; the SPO ones are NaN when no anchor
                   is known).
    policy_logps:  ``[2P]`` detached ``L_s`` (chosen first).
    ref_logps:     ``[2P]`` detached ``R_s``, or None.
    counts:        ``[2P]`` completion lengths.
    ``out["loss"]`` and ``out["rewards/chosen"]`` also work.
    """

    loss: Tensor
    metrics: Dict[str, Tensor] = field(default_factory=dict)
    policy_logps: Optional[Tensor] = None
    ref_logps: Optional[Tensor] = None
    counts: Optional[Tensor] = None

    def __getitem__(self, key: str) -> Tensor:
        return self.loss if key == "loss" else self.metrics[key]

    def log_dict(self) -> Dict[str, float]:
        """Plain floats for a logger: ``{"loss": ..., "rewards/chosen": ..., ...}``."""
        out = {"loss": float(self.loss.detach())}
        out.update({k: float(v) for k, v in self.metrics.items()})
        return out


class SequenceStats(NamedTuple):
    """Per-sequence sums of the per-token statistics (SPEC 8) over completion tokens, ``[S]`` float64,
    detached; built from :class:`spo_kernels.kernels.types.TokenStats` by the API layer and handed to
    the loss step (metrics ``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``,
    and WPO's weights). Token weights (SPEC 8) do not apply to these sums.

    entropy_sum, log_sum_p2_sum, mean_logit_sum, argmax_hits: ``sum_t m_t x_t`` per sequence.
    """

    entropy_sum: Tensor
    log_sum_p2_sum: Tensor
    mean_logit_sum: Tensor
    argmax_hits: Tensor
