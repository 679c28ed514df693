"""The ``reference`` backend: the naive autograd ops of :mod:`spo_kernels.reference` behind the backend
interface. For tests only.

It materializes the transformed logits and their log-softmax for the completion rows, computes in
float64 for float64 inputs (fp32 otherwise), and writes each loss as TRL does. ``autograd = True``: the
gradient is autograd's through these ops, never a closed form (that is what it checks), so it has no
backward ops and returns no LSEs.
"""

from __future__ import annotations

import torch

from .. import reference as ref_impl
from ..losses import LossStep
from .base import Backend, LogprobResult, TokenStats


def _forward(rows, plan, transform, options):
    """``L_s`` (float64, SPEC 7) of the plan's rows ``rows [Nc, V]`` (raw logits), differentiable; with
    ``options.token_stats`` the statistics from the materialized softmax."""
    tok = ref_impl.reference_token_logprobs(rows, plan.targets, -1, transform.softcap, transform.temperature,
                                            transform.multiplier).to(torch.float64)  # every target real
    if plan.token_weights is not None:
        tok = tok * plan.token_weights.to(torch.float64)
    sums = torch.zeros(plan.num_seqs, dtype=torch.float64, device=rows.device)
    sums = sums.index_add(0, plan.seq_id, tok)
    stats = None
    if options.token_stats:
        z = ref_impl.transform_logits(rows.detach().to(torch.promote_types(rows.dtype, torch.float32)),
                                      transform.softcap, transform.temperature, transform.multiplier)
        stats = TokenStats(*ref_impl.reference_token_stats(z, plan.targets))
    return LogprobResult(sums, None, stats)


class ReferenceBackend(Backend):
    name = "reference"
    autograd = True

    def loss_step(self, policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None, seq_stats=None):
        loss = ref_impl.reference_pair_loss(policy_logps, counts, ref_logps, cfg, anchor, bco_delta,
                                            seq_stats=seq_stats)
        metrics = ref_impl.reference_metrics(policy_logps, counts, ref_logps, cfg, anchor, seq_stats=seq_stats)
        return LossStep(loss=loss, grad=None, metrics=metrics)

    def logits_forward(self, logits, plan, transform, options):
        return _forward(logits.index_select(0, plan.token_idx), plan, transform, options)

    def linear_forward(self, hidden, weight, bias, plan, transform, options, save_lse):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        z = hidden.index_select(0, plan.token_idx).to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            z = z + bias.to(dtype)
        return _forward(z, plan, transform, options)
