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
    specialize on :attr:`has_softcap` (a compile-time switch); the multiplier and temperature fold into
    one runtime scale where softcap is off. Validated by the API layer (``spo_kernels.checks``).
    """

    multiplier: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def is_identity(self) -> bool:
        return self.multiplier == 1.0 and self.softcap is None and self.temperature == 1.0


IDENTITY = LogitTransform()


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


DEFAULT_OPTIONS = KernelOptions()


class TokenStats(NamedTuple):
    """Per-token statistics of SPEC 8, one entry per plan token (``[Nc]``, fp32, detached), computed on
    the transformed logits ``z`` in the same pass as the log-sum-exp:

    entropy:      ``H_t = lse_t - sum_v p_v z_v``.
    log_sum_p2:   ``log sum_v p_v^2 = logsumexp(2 z) - 2 lse`` (WPO's weight adjustment).
    mean_logit:   ``mean_v z_v`` (the ``logits/chosen`` / ``logits/rejected`` metrics).
    is_argmax:    1.0 where the target is an argmax of ``z`` (``mean_token_accuracy``), else 0.0.
    """

    entropy: torch.Tensor
    log_sum_p2: torch.Tensor
    mean_logit: torch.Tensor
    is_argmax: torch.Tensor
