"""The naive reference: materialized logits and autograd, float64-capable. For tests only.

Written independently of :mod:`spo_kernels.losses` (formulas as TRL states them, gradients from
autograd) so that it can check the closed-form gradients and every backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import PreferenceLossConfig

Tensor = torch.Tensor


def transform_logits(z: Tensor, softcap: Optional[float], temperature: float, multiplier: float = 1.0) -> Tensor:
    """SPEC 2, literally: ``z <- multiplier * z``, then ``z <- softcap * tanh(z / softcap)`` (if set), then
    ``z <- z / temperature``."""
    if multiplier != 1.0:
        z = multiplier * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def reference_token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int,
                             softcap: Optional[float] = None, temperature: float = 1.0,
                             multiplier: float = 1.0) -> Tensor:
    """``logp_t = z_t[y_t] - logsumexp(z_t)``, zero where the label is ignore_index. Any leading shape.

    Computes in float64 for float64 input, else fp32 (the whole log-softmax is materialized)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = transform_logits(logits.to(dtype), softcap, temperature, multiplier)
    labels = labels.long()  # any integer dtype (gather needs int64)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def reference_token_stats(z: Tensor, targets: Tensor):
    """SPEC 8's per-token statistics of transformed logits ``z [rows, V]`` (no gradient), written from
    their definitions on the materialized softmax: ``(entropy, log sum p^2, mean logit, target is an
    the first argmax, as ``torch.argmax``)``, each ``[rows]`` in z's dtype."""
    z = z.detach()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(nan=0.0).sum(-1)  # p log p -> 0 where p = 0
    log_sum_p2 = torch.logsumexp(2 * logp, dim=-1)
    return entropy, log_sum_p2, z.mean(-1), (z.argmax(-1) == targets.long()).to(z.dtype)


def reference_sequence_logprobs(token_logps: Tensor, labels: Tensor, ignore_index: int,
                                cu_seqlens: Optional[Tensor] = None):
    """Per-sequence sums (float64, SPEC 7) and counts from per-token log-probs, padded ``[S, T]`` or
    packed ``[N]``."""
    token_logps = token_logps.to(torch.float64)
    mask = labels.long() != ignore_index
    if cu_seqlens is None:
        return token_logps.sum(-1), mask.sum(-1)
    bounds = cu_seqlens.tolist()
    sums = torch.stack([token_logps[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    counts = torch.stack([mask[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    return sums, counts


def _reference_scores(u: Tensor, cfg: PreferenceLossConfig) -> Tensor:
    """TRL 1.16's f-divergence scores of the log-ratios, written as TRL writes them (autograd differentiates)."""
    ft = cfg.f_divergence_type
    if ft == "reverse_kl":
        return u
    if ft == "forward_kl":
        return 1 - torch.exp(-u)
    if ft == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    a = cfg.f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
        return u
    return (torch.exp(torch.clamp((a - 1.0) * u, max=80.0)) - 1.0) / (a - 1.0)


def _reference_wpo_weights(L: Tensor, n: Tensor, seq_stats) -> Tensor:
    """WPO: ``exp(mean_t(logp_t - log sum p^2))`` per sequence, chosen times rejected, no gradient."""
    P = L.shape[0] // 2
    with torch.no_grad():
        mean_logps = (L - seq_stats.log_sum_p2_sum.to(L.dtype)) / n.to(L.dtype).clamp(min=1)
        w = torch.exp(mean_logps)
    return w[:P] * w[P:]


def _reference_one_loss(lt, L, R, n_raw, cfg, bco_delta):
    """Per-pair losses ``[P]`` of one loss type (TRL's branch of ``_compute_loss``, or our extra)."""
    P = L.shape[0] // 2
    nc = n_raw.clamp(min=1)
    b, e = cfg.beta, cfg.label_smoothing
    Lw, Ll, Rw, Rl = L[:P], L[P:], R[:P], R[P:]
    cw, cr = Lw - Rw, Ll - Rl
    scores = _reference_scores(torch.cat([cw, cr]), cfg)
    sw, sr = scores[:P], scores[P:]
    delta = sw - sr
    ls = F.logsigmoid
    if lt == "sigmoid":
        return -ls(b * delta) * (1 - e) - ls(-b * delta) * e
    if lt == "robust":
        return (-ls(b * delta) * (1 - e) + ls(-b * delta) * e) / (1 - 2 * e)
    if lt == "hinge":
        return torch.relu(1 - b * delta)
    if lt == "ipo":
        return (sw / nc[:P] - sr / nc[P:] - 1 / (2 * b)) ** 2
    if lt == "sigmoid_norm":
        return -ls(b * (sw / nc[:P] - sr / nc[P:]))
    if lt == "exo_pair":
        ee = e if e > 0 else 1e-3
        return (b * delta).sigmoid() * (ls(b * delta) - math.log(1 - ee)) + \
            (-b * delta).sigmoid() * (ls(-b * delta) - math.log(ee))
    if lt == "nca_pair":
        return -ls(b * cw) - 0.5 * ls(-b * cw) - 0.5 * ls(-b * cr)
    if lt == "bco_pair":
        d = 0.0 if bco_delta is None else bco_delta.detach()
        return -ls(b * cw - d) - ls(-(b * cr - d))
    if lt == "sppo_hard":
        return (cw - 0.5 / b) ** 2 + (cr + 0.5 / b) ** 2
    if lt in ("aot", "aot_unpaired"):
        if lt == "aot":
            d = torch.sort(Lw - Ll, dim=0)[0] - torch.sort(Rw - Rl, dim=0)[0]
        else:
            d = torch.sort(cw, dim=0)[0] - torch.sort(cr, dim=0)[0]
        return -ls(b * d) * (1 - e) - ls(-b * d) * e
    # TRL's 1 - sigmoid(u), written sigmoid(-u): the same value, but autograd of "1 - sigmoid" loses the
    # gradient sig(u) sig(-u) to cancellation once sig(u) rounds near 1 (rel. 1e-3 at u = 30 in float64).
    if lt == "apo_zero":
        return torch.sigmoid(-b * cw) + torch.sigmoid(b * cr)
    if lt == "apo_down":
        return torch.sigmoid(b * cw) + torch.sigmoid(-b * (cw - cr))
    if lt == "discopop":
        x = delta * b
        mod = torch.sigmoid(x / cfg.discopop_tau)
        return -ls(x) * (1 - mod) + torch.exp(-x) * mod
    if lt == "sft":
        return (-Lw.sum() / n_raw[:P].sum().clamp(min=1)).expand(P)
    if lt == "simpo":
        x = b * (Lw / nc[:P] - Ll / nc[P:]) - cfg.simpo_gamma
        return -ls(x) * (1 - e) - ls(-x) * e
    if lt == "cpo":
        x = b * (Lw - Ll)
        return -ls(x) * (1 - e) - ls(-x) * e
    if lt == "dpop":
        return -ls(b * (cw - cr - cfg.dpop_lambda * torch.relu(Rw - Lw)))
    if lt == "rdpo":
        return -ls(b * (cw - cr) + cfg.rdpo_alpha * (n_raw[:P] - n_raw[P:]))
    raise ValueError(f"unknown loss_type {lt!r}")


def reference_pair_loss(L: Tensor, n: Tensor, R: Optional[Tensor], cfg: PreferenceLossConfig,
                        anchor: Optional[Tensor] = None, bco_delta: Optional[Tensor] = None,
                        *, seq_stats=None) -> Tensor:
    """The batch loss, written as TRL 1.16 writes each formula (multi-loss sum, f-divergence scores, WPO
    weights); differentiate it with autograd. ``seq_stats`` (:class:`spo_kernels.output.SequenceStats`) is
    needed for ``use_weighting``."""
    P = L.shape[0] // 2
    n_raw = n.to(L.dtype)
    nc = n_raw.clamp(min=1)
    if R is None or cfg.reference_free:  # simpo / cpo / sft never read R
        R = torch.zeros_like(L)
    R = R.detach().to(L.dtype)
    if cfg.use_weighting and seq_stats is None:
        raise ValueError("use_weighting=True (WPO) needs seq_stats")
    pair_weights = _reference_wpo_weights(L, n, seq_stats) if cfg.use_weighting else None
    loss = 0.0
    for lt, weight in zip(cfg.loss_type, cfg.weights):
        per_pair = _reference_one_loss(lt, L, R, n_raw, cfg, bco_delta)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + per_pair.mean() * weight
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * (-L[:P].sum() / n_raw[:P].sum().clamp(min=1))
    if cfg.spo_lambda > 0:
        chosen = L[:P] / nc[:P] if cfg.spo_normalize == "mean" else L[:P]
        loss = loss + cfg.spo_lambda * torch.relu(anchor.detach() - chosen + cfg.spo_margin).mean()
    return loss


def reference_metrics(L: Tensor, n: Tensor, R: Optional[Tensor], cfg: PreferenceLossConfig,
                      anchor: Optional[Tensor] = None, *, seq_stats=None) -> dict:
    """The SPEC 6 metrics, as TRL 1.16 defines them, from detached per-sequence values; the per-token
    statistics' metrics when ``seq_stats`` is given."""
    L = L.detach()
    P = L.shape[0] // 2
    n_raw = n.to(L.dtype)
    nc = n_raw.clamp(min=1)
    # rewards b (L - R) whenever R is given (TRL's sft logs them too), R = 0 with reference_free=True
    R = torch.zeros_like(L) if (R is None or cfg.reference_free) else R.detach().to(L.dtype)
    chosen = cfg.beta * (L[:P] - R[:P])
    rejected = cfg.beta * (L[P:] - R[P:])
    metrics = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(L.dtype).mean(),
        "logps/chosen": L[:P].mean(), "logps/rejected": L[P:].mean(),
        "nll": -L[:P].sum() / n_raw[:P].sum().clamp(min=1),
        "count/empty_completions": (n_raw == 0).sum().to(L.dtype),
    }
    if cfg.spo_lambda > 0:  # the SPO metrics exist only with SPO on (SPEC 6)
        ch = L[:P] / nc[:P] if cfg.spo_normalize == "mean" else L[:P]
        arg = anchor.to(L.dtype) - ch + cfg.spo_margin
        metrics["spo/penalty"] = torch.relu(arg).mean()
        metrics["spo/active_fraction"] = (arg > 0).to(L.dtype).mean()
    if seq_stats is not None:
        total, total_w, total_l = n_raw.sum(), n_raw[:P].sum(), n_raw[P:].sum()
        st = {k: v.to(L.dtype) for k, v in seq_stats._asdict().items()}
        # With no tokens the sums are 0 too: the clamp gives 0 on L's device, with no host sync.
        total, total_w, total_l = total.clamp(min=1), total_w.clamp(min=1), total_l.clamp(min=1)
        metrics["entropy"] = st["entropy_sum"].sum() / total
        metrics["logits/chosen"] = st["mean_logit_sum"][:P].sum() / total_w
        metrics["logits/rejected"] = st["mean_logit_sum"][P:].sum() / total_l
        metrics["mean_token_accuracy"] = st["argmax_hits"][:P].sum() / total_w
    return metrics
