"""The loss table, closed form: per-pair loss and its exact gradient, together, in fp32, no autograd.

This module is the one place that owns SPEC sections 3-5. Every backend's loss step either
calls :func:`preference_loss_step` or (Triton) re-implements it and is tested against it; the
independent autograd oracle lives in :mod:`spo_kernels.reference`.

Each base loss is a small function of one pair's log-probs on its *basis* (summed log-probs, or
per-token means for IPO and SimPO) and returns ``(loss_i, dloss_i/dpw, dloss_i/dpl)``; the step
turns those into ``g_s = dloss/dL_s`` for all 2P sequences (SPEC 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .config import PreferenceLossConfig

Tensor = torch.Tensor

# Every metric name; the SPO ones are present only when ``spo_lambda > 0`` (SPEC 6).
METRIC_NAMES = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "nll", "spo/penalty", "spo/active_fraction",
    "count/empty_completions",
)
SPO_METRIC_NAMES = ("spo/penalty", "spo/active_fraction")


@dataclass
class PairTerms:
    """One batch of pairs on the loss's basis, all ``[P]`` fp32.

    pw, pl: policy log-probs of chosen / rejected (sums, or per-token means for mean-basis losses).
    rw, rl: reference log-probs on the same basis (zeros when reference-free).
    nw, nl: completion lengths (raw counts, float).
    """

    pw: Tensor
    pl: Tensor
    rw: Tensor
    rl: Tensor
    nw: Tensor
    nl: Tensor


def _sig(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _smoothed_sigmoid(x: Tensor, e: float):
    """``-(1-e) logsig(x) - e logsig(-x)`` and its derivative in x (``d/dx logsig(x) = sig(-x)``)."""
    loss = -(1 - e) * F.logsigmoid(x) - e * F.logsigmoid(-x)
    dx = -(1 - e) * _sig(-x) + e * _sig(x)
    return loss, dx


def loss_sigmoid(t: PairTerms, cfg: PreferenceLossConfig):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with cDPO label smoothing e:
    ``-(1-e) logsig(b D) - e logsig(-b D)``, ``D = (pw - rw) - (pl - rl)``."""
    b = cfg.beta
    loss, dx = _smoothed_sigmoid(b * ((t.pw - t.rw) - (t.pl - t.rl)), cfg.label_smoothing)
    return loss, b * dx, -b * dx


def loss_robust(t: PairTerms, cfg: PreferenceLossConfig):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409):
    ``(-(1-e) logsig(b D) + e logsig(-b D)) / (1 - 2e)``."""
    b, e = cfg.beta, cfg.label_smoothing
    x = b * ((t.pw - t.rw) - (t.pl - t.rl))
    loss = (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)
    dx = (-(1 - e) * _sig(-x) - e * _sig(x)) / (1 - 2 * e)
    return loss, b * dx, -b * dx


def loss_hinge(t: PairTerms, cfg: PreferenceLossConfig):
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - b D)``; the kink takes gradient 0."""
    b = cfg.beta
    x = b * ((t.pw - t.rw) - (t.pl - t.rl))
    loss = torch.relu(1 - x)
    dx = -(1 - x > 0).to(x.dtype)
    return loss, b * dx, -b * dx


def loss_ipo(t: PairTerms, cfg: PreferenceLossConfig):
    """IPO (Azar et al. 2023, arXiv 2310.12036) on per-token means: ``(c/n_w - r/n_l - 1/(2b))^2``."""
    u = (t.pw - t.rw) - (t.pl - t.rl) - 1 / (2 * cfg.beta)
    return u * u, 2 * u, -2 * u


# Near-optimum helpers of exo_pair (both also in the Triton loss step): power series accurate to float64
# on the ranges they are used on (|a| <= 1/2, |w| <= 0.33).
_EXPM1_SERIES = tuple(1.0 / math.factorial(k) for k in range(2, 18))   # expm1(a) - a = a^2 sum_k a^k c_k
_ATANH_SERIES = tuple(1.0 / (2 * j + 3) for j in range(11))           # atanh(s) - s = s^3 sum_j s^2j c_j
EXO_NEAR = 0.5  # |x - x*| below which exo_pair takes the near-optimum form


def _poly(x: Tensor, coefs) -> Tensor:
    acc = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def expm1_minus_x(a: Tensor) -> Tensor:
    """``expm1(a) - a`` for |a| <= 1/2, without the cancellation of the difference."""
    return a * a * _poly(a, _EXPM1_SERIES)


def log1p_minus_x(w: Tensor) -> Tensor:
    """``log1p(w) - w`` for |w| <= 1/3, without the cancellation: with ``s = w / (2 + w)``,
    ``log1p(w) = 2 atanh(s)`` and ``w = 2s / (1 - s)``, so it is ``-2 s^2 / (1 - s) + 2 (atanh(s) - s)``."""
    s = w / (2 + w)
    return -2 * s * s / (1 - s) + 2 * s * s * s * _poly(s * s, _ATANH_SERIES)


def exo_kl(x: Tensor, log_1me: float, log_e: float) -> Tensor:
    """``KL(Bern(sig(x)) || Bern(1 - e))``, EXO's per-pair loss, stable at its optimum ``x* = log((1-e)/e)``.

    Written directly, ``sig(x)(logsig(x) - log(1-e)) + sig(-x)(logsig(-x) - log e)`` is a difference of
    first-order terms that cancel to a second-order result near x*: fp32 lost ~1e-7 absolute (rel. up to
    4e-4 at losses near 1e-4). Near x* (``|d| < 1/2``, ``d = x - x*``) the KL is the Bregman divergence of
    softplus, ``log1p(r expm1(a)) - r a`` with ``r = sig(-|x|)`` and ``a = +-d`` (the same for x and -x),
    evaluated as ``log1p_minus_x(w) + r expm1_minus_x(a)``, ``w = r expm1(a)``: the two terms differ in size
    by the factor r <= 1/2, so no cancellation is left. Elsewhere the direct form is accurate."""
    p, q = _sig(x), _sig(-x)
    direct = p * (F.logsigmoid(x) - log_1me) + q * (F.logsigmoid(-x) - log_e)
    d = x - (log_1me - log_e)
    r = _sig(-x.abs())
    a = torch.where(x >= 0, d, -d).clamp(-EXO_NEAR, EXO_NEAR)
    em = expm1_minus_x(a)
    near = log1p_minus_x(r * (a + em)) + r * em
    return torch.where(d.abs() < EXO_NEAR, near, direct)


def loss_exo_pair(t: PairTerms, cfg: PreferenceLossConfig):
    """EXO (Ji et al. 2024, arXiv 2402.00856), TRL's form with e defaulting to 1e-3:
    ``sig(x)(logsig(x) - log(1-e)) + sig(-x)(logsig(-x) - log e)``, ``x = b D`` (:func:`exo_kl`).
    Derivative: ``sig(x) sig(-x) (x - log(1-e) + log e)`` (the logsig(x) - logsig(-x) = x identity)."""
    b = cfg.beta
    e = cfg.label_smoothing if cfg.label_smoothing > 0 else 1e-3
    x = b * ((t.pw - t.rw) - (t.pl - t.rl))
    loss = exo_kl(x, math.log1p(-e), math.log(e))
    dx = _sig(x) * _sig(-x) * (x - math.log1p(-e) + math.log(e))
    return loss, b * dx, -b * dx


def loss_nca_pair(t: PairTerms, cfg: PreferenceLossConfig):
    """NCA (Chen et al. 2024, arXiv 2402.05369):
    ``-logsig(u_w) - 0.5 logsig(-u_w) - 0.5 logsig(-u_l)``, ``u = b (p - r)``."""
    b = cfg.beta
    uw, ul = b * (t.pw - t.rw), b * (t.pl - t.rl)
    loss = -F.logsigmoid(uw) - 0.5 * F.logsigmoid(-uw) - 0.5 * F.logsigmoid(-ul)
    return loss, b * (-_sig(-uw) + 0.5 * _sig(uw)), b * (0.5 * _sig(ul))


def loss_bco_pair(t: PairTerms, cfg: PreferenceLossConfig, delta: Optional[Tensor] = None):
    """BCO pair (Jung et al. 2024, arXiv 2404.04656): ``-logsig(u_w - d) - logsig(-(u_l - d))``,
    ``u = b (p - r)``; ``d`` is the (detached) mean reward: the batch mean here, a running mean in
    :class:`spo_kernels.FusedLinearPreferenceLoss` as TRL keeps it."""
    b = cfg.beta
    uw, ul = b * (t.pw - t.rw), b * (t.pl - t.rl)
    d = torch.cat([uw, ul]).mean() if delta is None else delta.to(uw.dtype)
    loss = -F.logsigmoid(uw - d) - F.logsigmoid(-(ul - d))
    return loss, b * -_sig(-(uw - d)), b * _sig(ul - d)


def loss_sppo_hard(t: PairTerms, cfg: PreferenceLossConfig):
    """SPPO, hard labels (Wu et al. 2024, arXiv 2405.00675): ``(a - 1/(2b))^2 + (c + 1/(2b))^2``,
    ``a = pw - rw``, ``c = pl - rl``."""
    h = 0.5 / cfg.beta
    a, c = t.pw - t.rw - h, t.pl - t.rl + h
    return a * a + c * c, 2 * a, 2 * c


def loss_apo_zero(t: PairTerms, cfg: PreferenceLossConfig):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266): ``1 - sig(u_w) + sig(u_l)``, evaluated as
    ``sig(-u_w) + sig(u_l)``: near the optimum ``1 - sig(u_w)`` cancelled to ~1e-7 absolute in fp32."""
    b = cfg.beta
    uw, ul = b * (t.pw - t.rw), b * (t.pl - t.rl)
    sw, sl = _sig(uw), _sig(ul)
    return _sig(-uw) + sl, -b * sw * _sig(-uw), b * sl * _sig(-ul)


def loss_apo_down(t: PairTerms, cfg: PreferenceLossConfig):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266): ``sig(u_w) + 1 - sig(b D)``, evaluated as
    ``sig(u_w) + sig(-b D)``: near the optimum (``u_w`` -> -inf, ``b D`` -> inf) the ``+ 1 - ...`` form
    lost ~1e-7 absolute in fp32 (rel. 2e-5 to 4e-4 at losses near 1e-3 .. 1e-4)."""
    b = cfg.beta
    uw = b * (t.pw - t.rw)
    x = b * ((t.pw - t.rw) - (t.pl - t.rl))
    dx = -b * _sig(x) * _sig(-x)
    return _sig(uw) + _sig(-x), b * _sig(uw) * _sig(-uw) + dx, -dx


def loss_discopop(t: PairTerms, cfg: PreferenceLossConfig):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414), TRL's form with ``x = b D``, ``m = sig(x / tau)``:
    ``-logsig(x) (1 - m) + exp(-x) m``.  ``exp(-x) m`` is evaluated as ``exp(-x + logsig(x/tau))`` so a
    very negative x gives 0 instead of ``inf * 0``."""
    b, tau = cfg.beta, cfg.discopop_tau
    x = b * ((t.pw - t.rw) - (t.pl - t.rl))
    m = _sig(x / tau)
    e_m = torch.exp(-x + F.logsigmoid(x / tau))  # exp(-x) * m
    dm = m * (1 - m) / tau
    loss = -F.logsigmoid(x) * (1 - m) + e_m
    # d/dx: -sig(-x)(1-m) + logsig(x) m' - exp(-x) m + exp(-x) m',  exp(-x) m' = e_m (1-m) / tau
    dx = -_sig(-x) * (1 - m) + F.logsigmoid(x) * dm - e_m + e_m * (1 - m) / tau
    return loss, b * dx, -b * dx


def loss_simpo(t: PairTerms, cfg: PreferenceLossConfig):
    """SimPO (Meng et al. 2024, arXiv 2405.14734) on per-token means: ``-logsig(b (pw - pl) - g)``
    (label smoothing as TRL's CPOTrainer applies it)."""
    b = cfg.beta
    loss, dx = _smoothed_sigmoid(b * (t.pw - t.pl) - cfg.simpo_gamma, cfg.label_smoothing)
    return loss, b * dx, -b * dx


def loss_cpo(t: PairTerms, cfg: PreferenceLossConfig):
    """CPO (Xu et al. 2024, arXiv 2401.08417): ``-logsig(b (L_w - L_l))``; pair it with ``sft_weight``
    for CPO's NLL term."""
    b = cfg.beta
    loss, dx = _smoothed_sigmoid(b * (t.pw - t.pl), cfg.label_smoothing)
    return loss, b * dx, -b * dx


def loss_dpop(t: PairTerms, cfg: PreferenceLossConfig):
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228): ``-logsig(b (D - k relu(R_w - L_w)))``."""
    b, k = cfg.beta, cfg.dpop_lambda
    gap = t.rw - t.pw
    x = b * ((t.pw - t.rw) - (t.pl - t.rl) - k * torch.relu(gap))
    dx = -_sig(-x)
    return -F.logsigmoid(x), b * dx * (1 + k * (gap > 0).to(x.dtype)), -b * dx


def loss_rdpo(t: PairTerms, cfg: PreferenceLossConfig):
    """R-DPO (Park et al. 2024, arXiv 2403.19159) as written in SimPO's objective table:
    ``-logsig(b D + a (n_w - n_l))``."""
    b = cfg.beta
    x = b * ((t.pw - t.rw) - (t.pl - t.rl)) + cfg.rdpo_alpha * (t.nw - t.nl)
    dx = -_sig(-x)
    return -F.logsigmoid(x), b * dx, -b * dx


BASE_LOSSES = {
    "sigmoid": loss_sigmoid, "robust": loss_robust, "hinge": loss_hinge, "ipo": loss_ipo,
    "exo_pair": loss_exo_pair, "nca_pair": loss_nca_pair, "bco_pair": loss_bco_pair,
    "sppo_hard": loss_sppo_hard, "apo_zero": loss_apo_zero, "apo_down": loss_apo_down,
    "discopop": loss_discopop, "simpo": loss_simpo, "cpo": loss_cpo, "dpop": loss_dpop,
    "rdpo": loss_rdpo,
}


@dataclass
class LossStep:
    """Result of one loss step: ``loss`` (scalar fp32), ``grad`` = ``dloss/dL_s`` ``[2P]`` fp32, and the
    detached metrics (SPEC 6 names)."""

    loss: Tensor
    grad: Tensor
    metrics: Dict[str, Tensor]


def preference_loss_step(
    policy_logps: Tensor,
    counts: Tensor,
    ref_logps: Optional[Tensor],
    cfg: PreferenceLossConfig,
    anchor: Optional[Tensor] = None,
    bco_delta: Optional[Tensor] = None,
) -> LossStep:
    """Per-pair losses, the batch loss, ``g_s = dloss/dL_s`` and metrics, closed form in fp32.

    Args:
        policy_logps: ``[2P]`` summed completion log-probs ``L_s`` (chosen rows first).
        counts: ``[2P]`` completion lengths ``n_s`` (int or float).
        ref_logps: ``[2P]`` summed reference log-probs ``R_s``, or None.
        anchor: ``[P]`` SPO anchor (per-token mean for ``spo_normalize="mean"``, summed for "sum");
            required when ``spo_lambda > 0``, ignored otherwise. The SPO metrics (``spo/penalty``,
            ``spo/active_fraction``) exist only when ``spo_lambda > 0`` (SPEC 6).
        bco_delta: scalar reward shift for ``bco_pair`` (default: this batch's mean reward).
    """
    if cfg.spo_lambda > 0 and anchor is None:
        raise ValueError("spo_lambda > 0 needs the SPO anchor [P] (from the reference log-probs or given)")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    L = policy_logps.detach().to(dtype)
    S = L.shape[0]
    P = S // 2
    n_raw = counts.to(dtype)
    n = n_raw.clamp(min=1.0)  # an empty completion counts as length 1 in every mean (SPEC 7)
    ref_free = cfg.base_reference_free
    R = torch.zeros_like(L) if (ref_logps is None or ref_free) else ref_logps.detach().to(dtype)

    # Basis: mean-basis losses see per-token means; chain rule d/dL = d/dp / n below.
    scale = 1.0 / n if cfg.mean_basis else torch.ones_like(n)
    p, r = L * scale, R * scale
    terms = PairTerms(p[:P], p[P:], r[:P], r[P:], n_raw[:P], n_raw[P:])
    fn = BASE_LOSSES[cfg.loss_type]
    if cfg.loss_type == "bco_pair":
        per_pair, dpw, dpl = fn(terms, cfg, bco_delta)
    else:
        per_pair, dpw, dpl = fn(terms, cfg)
    grad = torch.cat([dpw, dpl]) * scale / P
    loss = per_pair.mean()

    # SFT term: token-mean NLL of the chosen completions.
    chosen_tokens = n_raw[:P].sum().clamp(min=1.0)
    nll = -L[:P].sum() / chosen_tokens
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

    chosen_rewards = cfg.beta * (terms.pw - terms.rw)
    rejected_rewards = cfg.beta * (terms.pl - terms.rl)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "logps/chosen": terms.pw.mean(),
        "logps/rejected": terms.pl.mean(),
        "nll": nll,
        **spo_metrics,
        "count/empty_completions": (n_raw == 0).sum().to(dtype),
    }
    return LossStep(loss=loss, grad=grad, metrics=metrics)
