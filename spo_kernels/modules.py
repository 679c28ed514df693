"""``nn.Module`` wrappers: a config, and (opt-in) a running reward mean for ``bco_pair``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .api import fused_linear_preference_loss, preference_loss
from .config import PreferenceLossConfig, check_bool, config_type_error
from .output import PreferenceLossOutput


class _PreferenceLossModule(nn.Module):
    """``config``: a :class:`PreferenceLossConfig` (or None for the defaults); ``**options`` override its
    fields. Anything else, a dict included, is a ``TypeError`` here, at construction (not on the first
    call): build ``PreferenceLossConfig(**d)`` from a dict, which validates it. ``backend`` is checked
    when the inputs' device is known (first call).

    ``bco_running_mean=True`` (ours, off by default): ``bco_pair`` subtracts the running mean of the per-step
    mean rewards (buffers ``bco_mean``, ``bco_steps``; the ``RunningMoments`` shift of TRL before 1.16).
    Off, ``bco_pair`` is TRL 1.16's unshifted loss."""

    def __init__(self, config: Optional[PreferenceLossConfig] = None, backend: Optional[str] = None, *,
                 bco_running_mean: bool = False, **options):
        super().__init__()
        if config is None:
            config = PreferenceLossConfig()
        elif not isinstance(config, PreferenceLossConfig):
            raise TypeError(config_type_error(config))
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        self.config = config.replace(**options) if options else config
        self.backend = backend
        check_bool("bco_running_mean", bco_running_mean)
        self.bco_running_mean = bco_running_mean
        # bco_pair's opt-in reward shift: the running mean of per-step mean rewards.
        self.register_buffer("bco_mean", torch.zeros((), dtype=torch.float32), persistent=True)
        self.register_buffer("bco_steps", torch.zeros((), dtype=torch.float32), persistent=True)

    def _bco_delta(self):
        """With ``bco_running_mean`` and bco_pair: a callable the loss calls with this batch's mean reward; the
        running mean is updated with it first and then used as the shift. Otherwise None (no shift)."""
        if not self.bco_running_mean or "bco_pair" not in self.config.loss_type:
            return None

        def update(step_mean: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.bco_steps += 1
                self.bco_mean += (step_mean.to(self.bco_mean) - self.bco_mean) / self.bco_steps
            return self.bco_mean.clone()
        return update

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, beta={self.config.beta}, spo_lambda={self.config.spo_lambda}"


class FusedLinearPreferenceLoss(_PreferenceLossModule):
    """Module form of :func:`spo_kernels.fused_linear_preference_loss`.

    ``loss_fn = FusedLinearPreferenceLoss(loss_type="sigmoid", beta=0.1, spo_lambda=1.0)``, then
    ``out = loss_fn(hidden [2P,T,H], weight [V,H], labels [2P,T], bias=None, ref_hidden=..., ...)``;
    ``out.loss.backward()``; ``out.metrics`` holds TRL-named metrics.
    """

    def forward(self, hidden, weight, labels, bias=None, **kwargs) -> PreferenceLossOutput:
        return fused_linear_preference_loss(hidden, weight, labels, bias, config=self.config, backend=self.backend,
                                            bco_delta=self._bco_delta(), **kwargs)


class PreferenceLoss(_PreferenceLossModule):
    """Module form of :func:`spo_kernels.preference_loss` (logits already computed).

    Note: with ``inplace_backward=True`` (default) the backward overwrites the logits buffer, when that is
    safe (never a leaf; see :func:`spo_kernels.sequence_logprobs` for the rule).
    """

    def forward(self, logits, labels, **kwargs) -> PreferenceLossOutput:
        return preference_loss(logits, labels, config=self.config, backend=self.backend,
                               bco_delta=self._bco_delta(), **kwargs)
