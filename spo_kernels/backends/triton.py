"""The ``triton`` backend: thin dispatch to the kernel files in :mod:`spo_kernels.kernels`.

One op per kernel file, host launcher beside its kernels (shared helpers: ``kernels/triton_helpers.py``):
- ``kernels/logits_logprobs.py``: logits path, forward (LSE + target gather + sequence sums) and the
  in-place backward;
- ``kernels/linear_forward.py`` / ``kernels/linear_backward.py``: fused-linear path, forward and backward
  (logit tiles on chip only; plan in ``linear_plan.py``, launch parameters in ``linear_config.py``);
- ``kernels/loss_step.py``: the closed-form loss step (loss, g_s, metrics) in one launch.
Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from .base import Backend


class TritonBackend(Backend):
    name = "triton"

    def loss_step(self, policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None, seq_stats=None):
        from ..kernels.loss_step import loss_step  # falls back to the torch step where the kernel has no case
        return loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta, seq_stats=seq_stats)

    def logits_forward(self, logits, plan, transform, options):
        from ..kernels.logits_logprobs import logits_forward
        return logits_forward(logits, plan, transform, options)

    def logits_backward(self, logits, plan, transform, lse, grad_seq, out):
        from ..kernels.logits_logprobs import logits_backward
        return logits_backward(logits, plan, transform, lse, grad_seq, out)

    def linear_forward(self, hidden, weight, bias, plan, transform, options, save_lse):
        from ..kernels.linear_forward import linear_forward
        return linear_forward(hidden, weight, bias, plan, transform, options, save_lse)

    def linear_backward(self, hidden, weight, bias, plan, transform, options, lse, grad_seq,
                        need_hidden, need_weight, need_bias, extra=None):
        from ..kernels.linear_backward import linear_backward
        return linear_backward(hidden, weight, bias, plan, transform, options, lse, grad_seq,
                               need_hidden, need_weight, need_bias)
