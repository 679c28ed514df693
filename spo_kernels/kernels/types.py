"""Plain result types returned by the kernel launchers. The bottom layer: ``spo_kernels.backends``
imports them from here (and re-exports them), never the other way round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class LinearGrads(NamedTuple):
    """Gradients of the fused-linear path (docs/gradient.md §4): ``hidden [N, H]`` in hidden's dtype
    (zero on rows outside the plan), ``weight [V, H]`` / ``bias [V]`` in their parameter's dtype; None
    where not requested."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


@dataclass(frozen=True)
class LogitTransform:
    """The logit transform of SPEC 2, applied in this order to every logit ``z = h W^T (+ b)``:

    ``z <- multiplier * z`` (Cohere ``logit_scale``; Granite ``1 / logits_scaling``), then
    ``z <- softcap * tanh(z / softcap)`` (Gemma 2's final softcap), then ``z <- z / temperature``.

    One encoding of "off" for each: ``multiplier=1.0``, ``softcap=None``, ``temperature=1.0``. Kernels
    specialize on whether softcap is set (a compile-time switch); the multiplier folds into softcap and
    temperature (:meth:`folded`). Validated by the API layer (``spo_kernels.checks``).
    """

    multiplier: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def folded(self) -> "tuple[Optional[float], float]":
        """``(softcap, temperature)`` of the same transform with the multiplier folded in (multiplier 1):
        ``c tanh(m x / c) / tau = c' tanh(x / c') / tau'`` with ``c' = c / m`` and ``tau' = tau / m``, and
        ``m x / tau = x / tau'`` without softcap. The chain rule folds the same way
        (``dz/dx = m (1 - tanh^2) / tau = (1 - tanh^2) / tau'``), so kernels written for (softcap,
        temperature) compute every transform, and the multiplier costs them nothing."""
        m = float(self.multiplier)
        softcap = None if self.softcap is None else float(self.softcap) / m
        return softcap, float(self.temperature) / m


@dataclass(frozen=True)
class KernelOptions:
    """How the kernels run (not what they compute), one object from the API down to the launchers.

    inplace_backward: logits path: write dlogits into the logits buffer when safe (SPEC 6).
    deterministic:    bitwise-identical gradients across runs (every backend here already is).
    grad_filter_eps:  opt-in approximate fused-linear backward: skip vocabulary tiles whose
                      ``|onehot - softmax|`` is below eps everywhere (0 = exact).
    token_stats:      also return the per-token statistics of SPEC 8 (:class:`TokenStats`) from the
                      forward's log-sum-exp pass; a compile-time switch, zero cost when False.
    """

    inplace_backward: bool = True
    deterministic: bool = False
    grad_filter_eps: float = 0.0
    token_stats: bool = False


class LogprobResult(NamedTuple):
    """What a backend's forward op returns (``logits_forward`` / ``linear_forward``).

    seq_logps: ``[S]`` float64, ``L_s = sum_t w_t logp_t`` over the plan's tokens of sequence s
               (``w_t = 1`` without token weights).
    lse:       ``[Nc]`` fp32 (float64 for float64 inputs), the log-sum-exp of each plan token's transformed
               logits (what the backward needs); None where not saved, or from an autograd backend.
    stats:     :class:`TokenStats` when ``options.token_stats``, else None.
    """

    seq_logps: torch.Tensor
    lse: Optional[torch.Tensor]
    stats: Optional["TokenStats"] = None


class TokenStats(NamedTuple):
    """Per-token statistics of SPEC 8, one entry per plan token (``[Nc]``, fp32, detached), computed on
    the transformed logits ``z`` in the same pass as the log-sum-exp:

    entropy:      ``H_t = lse_t - sum_v p_v z_v``.
    log_sum_p2:   ``log sum_v p_v^2 = logsumexp(2 z) - 2 lse`` (WPO's weight adjustment).
    mean_logit:   ``mean_v z_v`` (the ``logits/chosen`` / ``logits/rejected`` metrics).
    is_argmax:    1.0 where the target is the first argmax of ``z`` (``torch.argmax``; TRL's ``is_top1``: a tie
                  with an earlier token does not count), else 0.0 (``mean_token_accuracy``).

    All four on the transformed logits (multiplier, softcap, temperature applied), as TRL 1.16's fused head.
    """

    entropy: torch.Tensor
    log_sum_p2: torch.Tensor
    mean_logit: torch.Tensor
    is_argmax: torch.Tensor
