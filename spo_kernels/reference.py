"""The naive reference: materialized logits and autograd, float64-capable. For tests only.

Written independently of :mod:`spo_kernels.losses` (formulas as TRL states them, gradients from
autograd) so that it can check the closed-form gradients and every backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import MEAN_BASIS_LOSSES, REFERENCE_FREE_LOSSES, PreferenceLossConfig

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


def reference_pair_loss(L: Tensor, n: Tensor, R: Optional[Tensor], cfg: PreferenceLossConfig,
                        anchor: Optional[Tensor] = None, bco_delta: Optional[Tensor] = None) -> Tensor:
    """The batch loss, written as TRL writes each formula; differentiate it with autograd."""
    P = L.shape[0] // 2
    n_raw = n.to(L.dtype)
    nc = n_raw.clamp(min=1)
    b, e = cfg.beta, cfg.label_smoothing
    lt = cfg.loss_type
    if R is None or cfg.reference_free or lt in REFERENCE_FREE_LOSSES:
        R = torch.zeros_like(L)
    Lw, Ll, Rw, Rl = L[:P], L[P:], R[:P], R[P:]
    if lt in MEAN_BASIS_LOSSES:
        Lw, Ll, Rw, Rl = Lw / nc[:P], Ll / nc[P:], Rw / nc[:P], Rl / nc[P:]
    cw, cr = Lw - Rw, Ll - Rl
    logits = cw - cr
    ls = F.logsigmoid
    if lt == "sigmoid":
        losses = -ls(b * logits) * (1 - e) - ls(-b * logits) * e
    elif lt == "robust":
        losses = (-ls(b * logits) * (1 - e) + ls(-b * logits) * e) / (1 - 2 * e)
    elif lt == "hinge":
        losses = torch.relu(1 - b * logits)
    elif lt == "ipo":
        losses = (logits - 1 / (2 * b)) ** 2
    elif lt == "exo_pair":
        ee = e if e > 0 else 1e-3
        losses = (b * logits).sigmoid() * (ls(b * logits) - math.log(1 - ee)) + \
                 (-b * logits).sigmoid() * (ls(-b * logits) - math.log(ee))
    elif lt == "nca_pair":
        losses = -ls(b * cw) - 0.5 * ls(-b * cw) - 0.5 * ls(-b * cr)
    elif lt == "bco_pair":
        delta = torch.cat([b * cw, b * cr]).mean().detach() if bco_delta is None else bco_delta
        losses = -ls(b * cw - delta) - ls(-(b * cr - delta))
    elif lt == "sppo_hard":
        losses = (cw - 0.5 / b) ** 2 + (cr + 0.5 / b) ** 2
    # TRL's 1 - sigmoid(u), written sigmoid(-u): the same value, but autograd of "1 - sigmoid" loses the
    # gradient sig(u) sig(-u) to cancellation once sig(u) rounds near 1 (rel. 1e-3 at u = 30 in float64).
    elif lt == "apo_zero":
        losses = torch.sigmoid(-b * cw) + torch.sigmoid(b * cr)
    elif lt == "apo_down":
        losses = torch.sigmoid(b * cw) + torch.sigmoid(-b * (cw - cr))
    elif lt == "discopop":
        x = logits * b
        mod = torch.sigmoid(x / cfg.discopop_tau)
        losses = -ls(x) * (1 - mod) + torch.exp(-x) * mod
    elif lt == "simpo":
        x = b * (Lw - Ll) - cfg.simpo_gamma
        losses = -ls(x) * (1 - e) - ls(-x) * e
    elif lt == "cpo":
        x = b * (Lw - Ll)
        losses = -ls(x) * (1 - e) - ls(-x) * e
    elif lt == "dpop":
        losses = -ls(b * (logits - cfg.dpop_lambda * torch.relu(Rw - Lw)))
    elif lt == "rdpo":
        losses = -ls(b * logits + cfg.rdpo_alpha * (n_raw[:P] - n_raw[P:]))
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    loss = losses.mean()
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * (-L[:P].sum() / n_raw[:P].sum().clamp(min=1))
    if cfg.spo_lambda > 0:
        chosen = L[:P] / nc[:P] if cfg.spo_normalize == "mean" else L[:P]
        loss = loss + cfg.spo_lambda * torch.relu(anchor.detach() - chosen + cfg.spo_margin).mean()
    return loss


def reference_metrics(L: Tensor, n: Tensor, R: Optional[Tensor], cfg: PreferenceLossConfig,
                      anchor: Optional[Tensor] = None) -> dict:
    """The SPEC 6 metrics, as TRL defines them, from detached per-sequence values."""
    L = L.detach()
    P = L.shape[0] // 2
    n_raw = n.to(L.dtype)
    nc = n_raw.clamp(min=1)
    ref_free = R is None or cfg.reference_free or cfg.loss_type in REFERENCE_FREE_LOSSES
    R = torch.zeros_like(L) if ref_free else R.detach().to(L.dtype)
    if cfg.loss_type in MEAN_BASIS_LOSSES:
        L_b, R_b = L / nc, R / nc
    else:
        L_b, R_b = L, R
    chosen = cfg.beta * (L_b[:P] - R_b[:P])
    rejected = cfg.beta * (L_b[P:] - R_b[P:])
    metrics = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(L.dtype).mean(),
        "logps/chosen": L_b[:P].mean(), "logps/rejected": L_b[P:].mean(),
        "nll": -L[:P].sum() / n_raw[:P].sum().clamp(min=1),
        "count/empty_completions": (n_raw == 0).sum().to(L.dtype),
    }
    if cfg.spo_lambda > 0:  # the SPO metrics exist only with SPO on (SPEC 6)
        ch = L[:P] / nc[:P] if cfg.spo_normalize == "mean" else L[:P]
        arg = anchor.to(L.dtype) - ch + cfg.spo_margin
        metrics["spo/penalty"] = torch.relu(arg).mean()
        metrics["spo/active_fraction"] = (arg > 0).to(L.dtype).mean()
    return metrics
