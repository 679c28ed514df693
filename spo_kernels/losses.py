"""The loss step, closed form: the batch loss, ``g_s = dloss/dL_s`` and the metrics, in fp32, no autograd.

This module owns SPEC sections 3-6 at the step level: f-divergence scores, each loss type of the list
(:mod:`spo_kernels.loss_formulas` holds the per-pair formulas), WPO's pair weights, TRL's multi-loss sum,
the SFT term, the SPO term (SPEC 4) and the metrics TRL 1.16 logs. Every backend's loss step either calls
:func:`preference_loss_step` or (Triton) re-implements the per-pair part and is tested against it; the
independent autograd oracle lives in :mod:`spo_kernels.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import PreferenceLossConfig
from .loss_formulas import PAIR_LOSSES, PairTerms, f_divergence_scores
from .output import SequenceStats

Tensor = torch.Tensor

# Every metric that is always present; the SPO ones only when ``spo_lambda > 0`` (SPEC 6).
METRIC_NAMES = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "nll", "spo/penalty", "spo/active_fraction",
    "count/empty_completions",
)
SPO_METRIC_NAMES = ("spo/penalty", "spo/active_fraction")
# Metrics of the per-token statistics (SPEC 8), present exactly when ``seq_stats`` is given.
STAT_METRIC_NAMES = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


@dataclass
class LossStep:
    """Result of one loss step: ``loss`` (scalar fp32), ``grad`` = ``dloss/dL_s`` ``[2P]`` fp32, and the
    detached metrics (SPEC 6 names)."""

    loss: Tensor
    grad: Tensor
    metrics: Dict[str, Tensor]


def wpo_pair_weights(policy_logps: Tensor, counts: Tensor, seq_stats: SequenceStats) -> Tensor:
    """WPO's per-pair weights ``[P]`` as TRL 1.16 (Eq. 2 of arXiv 2406.11827), detached:
    ``w_s = exp(sum_t m_t (logp_t - log sum_v p_v^2) / max(n_s, 1))``, pair weight ``w_chosen * w_rejected``.
    ``policy_logps`` must be the unweighted sums (no ld_alpha, which the config refuses with WPO)."""
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    aligned = policy_logps.detach().to(dtype) - seq_stats.log_sum_p2_sum.to(dtype)
    w = torch.exp(aligned / counts.to(dtype).clamp(min=1.0))
    P = w.shape[0] // 2
    return w[:P] * w[P:]


def sequence_stat_metrics(seq_stats: SequenceStats, counts: Tensor, dtype) -> Dict[str, Tensor]:
    """TRL 1.16's ``entropy`` (token mean over every completion token), ``logits/chosen`` and
    ``logits/rejected`` (token means of the mean logit over the chosen / rejected completion tokens) and
    ``mean_token_accuracy`` (fraction of chosen completion tokens whose target is the argmax). 0 when there
    are no such tokens, as TRL. Unweighted (token weights do not apply to statistics)."""
    n = counts.to(dtype)
    P = n.shape[0] // 2
    tokens, chosen, rejected = n.sum().clamp(min=1.0), n[:P].sum().clamp(min=1.0), n[P:].sum().clamp(min=1.0)
    ent, logit, hits = (seq_stats.entropy_sum.to(dtype), seq_stats.mean_logit_sum.to(dtype),
                        seq_stats.argmax_hits.to(dtype))
    return {
        "entropy": ent.sum() / tokens,
        "logits/chosen": logit[:P].sum() / chosen,
        "logits/rejected": logit[P:].sum() / rejected,
        "mean_token_accuracy": hits[:P].sum() / chosen,
    }


def check_seq_stats(seq_stats, num_seqs: int, cfg: PreferenceLossConfig) -> None:
    """WPO needs the statistics; when given they must be ``[2P]`` each."""
    if cfg.use_weighting and seq_stats is None:
        raise ValueError("use_weighting=True (WPO) needs the per-token statistics (seq_stats with "
                         "log_sum_p2_sum); request them from the log-prob pass")
    if seq_stats is None:
        return
    if not isinstance(seq_stats, SequenceStats):
        raise TypeError(f"seq_stats must be a SequenceStats or None, got {type(seq_stats).__name__}")
    for name, value in seq_stats._asdict().items():
        if tuple(value.shape) != (num_seqs,):
            raise ValueError(f"seq_stats.{name} must be [{num_seqs}], got {tuple(value.shape)}")


def preference_loss_step(
    policy_logps: Tensor,
    counts: Tensor,
    ref_logps: Optional[Tensor],
    cfg: PreferenceLossConfig,
    anchor: Optional[Tensor] = None,
    bco_delta: Optional[Tensor] = None,
    *,
    seq_stats: Optional[SequenceStats] = None,
) -> LossStep:
    """The batch loss, ``g_s = dloss/dL_s`` and metrics, closed form in fp32 (float64 for float64 input).

    ``loss = sum_k loss_weights[k] * mean_i(w_i l_k,i) + sft_weight * NLL + spo_lambda * SPO`` with the
    per-pair losses ``l_k,i`` of each loss type on f-divergence scores (TRL 1.16), WPO's pair weights
    ``w_i`` (1 unless ``use_weighting``).

    Args:
        policy_logps: ``[2P]`` summed completion log-probs ``L_s`` (chosen rows first).
        counts: ``[2P]`` completion lengths ``n_s`` (int or float).
        ref_logps: ``[2P]`` summed reference log-probs ``R_s``; None only when the base loss is reference-free.
        anchor: ``[P]`` SPO anchor (per-token mean for ``spo_normalize="mean"``, summed for "sum");
            required when ``spo_lambda > 0``, ignored otherwise. The SPO metrics (``spo/penalty``,
            ``spo/active_fraction``) exist only when ``spo_lambda > 0`` (SPEC 6).
        bco_delta: opt-in scalar reward shift for ``bco_pair``; None (default) is TRL 1.16's unshifted loss.
        seq_stats: per-sequence sums of the per-token statistics (float64 ``[2P]`` each); needed by WPO;
            when given, the ``STAT_METRIC_NAMES`` metrics are added.
    """
    S = policy_logps.shape[0]
    P = S // 2
    check_seq_stats(seq_stats, S, cfg)
    if cfg.spo_lambda > 0 and anchor is None:
        raise ValueError("spo_lambda > 0 needs the SPO anchor [P] (from the reference log-probs or given)")
    if ref_logps is None and not cfg.base_reference_free:
        raise ValueError(f"loss_type {list(cfg.loss_type)} needs ref_logps (or reference_free=True)")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    L = policy_logps.detach().to(dtype)
    n_raw = counts.to(dtype)
    n = n_raw.clamp(min=1.0)  # an empty completion counts as length 1 in every mean (SPEC 7)
    # R = 0 with reference_free=True or no reference; the policy-only losses (simpo, cpo, sft) never read R,
    # but the rewards do whenever it is given (TRL's sft still logs b (L - R)).
    R = torch.zeros_like(L) if (ref_logps is None or cfg.reference_free) else ref_logps.detach().to(dtype)
    score, dscore = f_divergence_scores(L - R, cfg)
    terms = PairTerms(L[:P], L[P:], R[:P], R[P:], n[:P], n[P:], n_raw[:P], n_raw[P:],
                      score[:P], score[P:], dscore[:P], dscore[P:])
    pair_w = wpo_pair_weights(L, counts, seq_stats) if cfg.use_weighting else None

    # NLL: token-mean NLL of the chosen completions (TRL's "sft" loss; the RPO / CPO term with sft_weight).
    chosen_tokens = n_raw[:P].sum().clamp(min=1.0)
    nll = -L[:P].sum() / chosen_tokens

    loss = torch.zeros((), dtype=dtype, device=L.device)
    grad = torch.zeros_like(L)
    for loss_type, weight in zip(cfg.loss_type, cfg.weights):
        if loss_type == "sft":
            # sum_i w_i nll; d/dL_w_j = -sum_i w_i / chosen_tokens
            w_sum = pair_w.sum() if pair_w is not None else torch.tensor(float(P), dtype=dtype, device=L.device)
            per_pair_sum = nll * w_sum
            grad[:P] -= weight * w_sum / chosen_tokens / P
        else:
            fn = PAIR_LOSSES[loss_type]
            per_pair, dLw, dLl = fn(terms, cfg, bco_delta) if loss_type == "bco_pair" else fn(terms, cfg)
            if pair_w is not None:
                per_pair, dLw, dLl = per_pair * pair_w, dLw * pair_w, dLl * pair_w
            per_pair_sum = per_pair.sum()
            grad += torch.cat([dLw, dLl]) * (weight / P)
        loss = loss + weight * (per_pair_sum / P)

    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * nll
        grad[:P] -= cfg.sft_weight / chosen_tokens

    # SPO stability term: lam * relu(a_i - Lbar_w + delta) (or the summed form).
    spo_metrics = {}
    if cfg.spo_lambda > 0:
        per_token = cfg.spo_normalize == "mean"
        chosen = L[:P] / n[:P] if per_token else L[:P]
        arg = anchor.detach().to(dtype) - chosen + cfg.spo_margin
        active = arg > 0  # the kink at exactly 0 takes gradient 0
        penalty = torch.relu(arg)
        loss = loss + cfg.spo_lambda * penalty.mean()
        d = cfg.spo_lambda / P / (n[:P] if per_token else 1.0)
        grad[:P] -= torch.where(active, d, torch.zeros_like(arg))
        spo_metrics = {"spo/penalty": penalty.mean(), "spo/active_fraction": active.to(dtype).mean()}

    # TRL 1.16: rewards are b * (L - R) on the summed log-probs (never the f-divergence scores or per-token
    # means), logps/* the summed log-probs, for every loss type.
    chosen_rewards = cfg.beta * (L[:P] - R[:P])
    rejected_rewards = cfg.beta * (L[P:] - R[P:])
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "logps/chosen": L[:P].mean(),
        "logps/rejected": L[P:].mean(),
        "nll": nll,
        **spo_metrics,
        "count/empty_completions": (n_raw == 0).sum().to(dtype),
    }
    if seq_stats is not None:
        metrics.update(sequence_stat_metrics(seq_stats, counts, dtype))
    return LossStep(loss=loss, grad=grad, metrics=metrics)
