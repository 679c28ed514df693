"""The per-pair formulas of the loss table (SPEC 3), closed form: each loss and its exact derivatives.

Every function takes one batch of pairs (:class:`PairTerms`) and returns ``(loss_i, dLw_i, dLl_i)``, all
``[P]``: the per-pair loss and the derivatives of ``sum_i loss_i`` with respect to each pair's summed
policy log-probs ``L_w``, ``L_l``. Per-pair losses have diagonal derivatives; ``aot`` / ``aot_unpaired``
sort the batch and route each derivative back through the sort permutation. The step that assembles them
(weights, multi-loss, SFT, SPO, metrics) is :func:`spo_kernels.losses.preference_loss_step`.

Formulas are TRL 1.16's ``DPOTrainer._compute_loss`` (its branch per loss type) written in a numerically
stable form; docs/losses.md derives each derivative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import PreferenceLossConfig

Tensor = torch.Tensor

# TRL 1.16 clamps alpha_divergence's exponent (a - 1) u at 80 (fp32 / bf16; 11 for fp16) so exp stays finite.
ALPHA_DIVERGENCE_CLAMP = 80.0


def _sig(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _smoothed_sigmoid(x: Tensor, e: float):
    """``-(1-e) logsig(x) - e logsig(-x)`` and its derivative in x (``d/dx logsig(x) = sig(-x)``)."""
    loss = -(1 - e) * F.logsigmoid(x) - e * F.logsigmoid(-x)
    dx = -(1 - e) * _sig(-x) + e * _sig(x)
    return loss, dx


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


@dataclass
class PairTerms:
    """One batch of P pairs, all ``[P]`` in the compute dtype (fp32; float64 for float64 log-probs).

    Lw, Ll: policy summed log-probs of chosen / rejected.  Rw, Rl: reference ones (zeros when the base
    loss is reference-free).  nw, nl: completion lengths clamped to >= 1 (the per-token mean's divisor);
    nw_raw, nl_raw: raw lengths.  sw, sl: f-divergence scores ``f'(L - R)`` of chosen / rejected (the
    log-ratios themselves for reverse_kl); dsw, dsl: their derivatives with respect to L.
    """

    Lw: Tensor
    Ll: Tensor
    Rw: Tensor
    Rl: Tensor
    nw: Tensor
    nl: Tensor
    nw_raw: Tensor
    nl_raw: Tensor
    sw: Tensor
    sl: Tensor
    dsw: Tensor
    dsl: Tensor


def f_divergence_scores(u: Tensor, cfg: PreferenceLossConfig):
    """TRL 1.16's f-DPO scores of the log-ratios ``u = L - R`` and their derivatives ``(s, ds/du)``.

    reverse_kl: ``u``; forward_kl: ``1 - exp(-u)``; js_divergence: ``log 2 + logsig(u)``; alpha_divergence:
    ``(exp(min((a-1) u, 80)) - 1) / (a - 1)`` (``u`` when ``|a - 1| < 1e-6``). Past the clamp the score is
    constant, so its derivative is 0 (as autograd of TRL's clamp). ``expm1`` where TRL writes ``exp(.) - 1``:
    the same number without the cancellation at small u."""
    if cfg.f_divergence_is_identity:
        return u, torch.ones_like(u)
    if cfg.f_divergence_type == "forward_kl":
        return -torch.expm1(-u), torch.exp(-u)
    if cfg.f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(u), _sig(-u)
    a1 = cfg.f_alpha_divergence_coef - 1.0
    t = a1 * u
    tc = t.clamp(max=ALPHA_DIVERGENCE_CLAMP)
    return torch.expm1(tc) / a1, torch.where(t <= ALPHA_DIVERGENCE_CLAMP, torch.exp(tc), torch.zeros_like(t))


# ---------------------------------------------------------------------------------------------------
# losses of the score difference x = b (s_w - s_l): dl/dL_w = b dl/dx ds_w, dl/dL_l = -b dl/dx ds_l
# ---------------------------------------------------------------------------------------------------

def _on_score_difference(t: PairTerms, cfg: PreferenceLossConfig, loss_and_dx):
    b = cfg.beta
    loss, dx = loss_and_dx(b * (t.sw - t.sl))
    return loss, b * dx * t.dsw, -b * dx * t.dsl


def loss_sigmoid(t: PairTerms, cfg: PreferenceLossConfig):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): ``-logsig(x)``, ``x = b (s_w - s_l)``; with
    label_smoothing e > 0 cDPO's ``-(1-e) logsig(x) - e logsig(-x)`` (ours: TRL 1.16 has e = 0 here)."""
    return _on_score_difference(t, cfg, lambda x: _smoothed_sigmoid(x, cfg.label_smoothing))


def loss_robust(t: PairTerms, cfg: PreferenceLossConfig):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409):
    ``(-(1-e) logsig(x) + e logsig(-x)) / (1 - 2e)``."""
    e = cfg.label_smoothing

    def f(x):
        loss = (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)
        return loss, (-(1 - e) * _sig(-x) - e * _sig(x)) / (1 - 2 * e)
    return _on_score_difference(t, cfg, f)


def loss_hinge(t: PairTerms, cfg: PreferenceLossConfig):
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - x)``; the kink takes gradient 0."""
    return _on_score_difference(t, cfg, lambda x: (torch.relu(1 - x), -(1 - x > 0).to(x.dtype)))


def loss_exo_pair(t: PairTerms, cfg: PreferenceLossConfig):
    """EXO (Ji et al. 2024, arXiv 2402.00856), TRL's form; e = label_smoothing, 1e-3 when 0 (TRL raises):
    ``sig(x)(logsig(x) - log(1-e)) + sig(-x)(logsig(-x) - log e)`` (:func:`exo_kl`).
    Derivative: ``sig(x) sig(-x) (x - log(1-e) + log e)`` (the logsig(x) - logsig(-x) = x identity)."""
    e = cfg.label_smoothing if cfg.label_smoothing > 0 else 1e-3
    log_1me, log_e = math.log1p(-e), math.log(e)
    return _on_score_difference(t, cfg, lambda x: (exo_kl(x, log_1me, log_e),
                                                   _sig(x) * _sig(-x) * (x - log_1me + log_e)))


def loss_discopop(t: PairTerms, cfg: PreferenceLossConfig):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414), TRL's form with ``m = sig(x / tau)``:
    ``-logsig(x) (1 - m) + exp(-x) m``.  ``exp(-x) m`` is evaluated as ``exp(-x + logsig(x/tau))`` so a
    very negative x gives 0 instead of ``inf * 0``."""
    tau = cfg.discopop_tau

    def f(x):
        m = _sig(x / tau)
        e_m = torch.exp(-x + F.logsigmoid(x / tau))  # exp(-x) * m
        dm = m * (1 - m) / tau
        loss = -F.logsigmoid(x) * (1 - m) + e_m
        # d/dx: -sig(-x)(1-m) + logsig(x) m' - exp(-x) m + exp(-x) m',  exp(-x) m' = e_m (1-m) / tau
        return loss, -_sig(-x) * (1 - m) + F.logsigmoid(x) * dm - e_m + e_m * (1 - m) / tau
    return _on_score_difference(t, cfg, f)


# ---------------------------------------------------------------------------------------------------
# per-token-mean scores: TRL divides each score by its completion length
# ---------------------------------------------------------------------------------------------------

def loss_ipo(t: PairTerms, cfg: PreferenceLossConfig):
    """IPO (Azar et al. 2023, arXiv 2310.12036) as TRL: ``(s_w/n_w - s_l/n_l - 1/(2b))^2``."""
    u = t.sw / t.nw - t.sl / t.nl - 1 / (2 * cfg.beta)
    return u * u, 2 * u * t.dsw / t.nw, -2 * u * t.dsl / t.nl


def loss_sigmoid_norm(t: PairTerms, cfg: PreferenceLossConfig):
    """TRL 1.16's length-normalized DPO: ``-logsig(b (s_w/n_w - s_l/n_l))``."""
    b = cfg.beta
    x = b * (t.sw / t.nw - t.sl / t.nl)
    dx = -_sig(-x)
    return -F.logsigmoid(x), b * dx * t.dsw / t.nw, -b * dx * t.dsl / t.nl


# ---------------------------------------------------------------------------------------------------
# losses of the log-ratios c = L_w - R_w, r = L_l - R_l (no f-divergence: TRL refuses it for these)
# ---------------------------------------------------------------------------------------------------

def loss_nca_pair(t: PairTerms, cfg: PreferenceLossConfig):
    """NCA (Chen et al. 2024, arXiv 2402.05369):
    ``-logsig(u_w) - 0.5 logsig(-u_w) - 0.5 logsig(-u_l)``, ``u = b (L - R)``."""
    b = cfg.beta
    uw, ul = b * (t.Lw - t.Rw), b * (t.Ll - t.Rl)
    loss = -F.logsigmoid(uw) - 0.5 * F.logsigmoid(-uw) - 0.5 * F.logsigmoid(-ul)
    return loss, b * (-_sig(-uw) + 0.5 * _sig(uw)), b * (0.5 * _sig(ul))


def loss_bco_pair(t: PairTerms, cfg: PreferenceLossConfig, delta: Optional[Tensor] = None):
    """BCO pair (Jung et al. 2024, arXiv 2404.04656) as TRL 1.16: ``-logsig(u_w) - logsig(-u_l)``,
    ``u = b (L - R)``. Ours, opt-in: a detached reward shift ``d`` (``delta``),
    ``-logsig(u_w - d) - logsig(-(u_l - d))`` (the running mean reward older TRL versions subtracted)."""
    b = cfg.beta
    uw, ul = b * (t.Lw - t.Rw), b * (t.Ll - t.Rl)
    if delta is not None:
        d = delta.detach().to(uw.dtype).reshape(())
        uw, ul = uw - d, ul - d
    return -F.logsigmoid(uw) - F.logsigmoid(-ul), b * -_sig(-uw), b * _sig(ul)


def loss_sppo_hard(t: PairTerms, cfg: PreferenceLossConfig):
    """SPPO, hard labels (Wu et al. 2024, arXiv 2405.00675): ``(c - 1/(2b))^2 + (r + 1/(2b))^2``."""
    h = 0.5 / cfg.beta
    a, c = t.Lw - t.Rw - h, t.Ll - t.Rl + h
    return a * a + c * c, 2 * a, 2 * c


def loss_apo_zero(t: PairTerms, cfg: PreferenceLossConfig):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266): ``1 - sig(u_w) + sig(u_l)``, evaluated as
    ``sig(-u_w) + sig(u_l)``: near the optimum ``1 - sig(u_w)`` cancelled to ~1e-7 absolute in fp32."""
    b = cfg.beta
    uw, ul = b * (t.Lw - t.Rw), b * (t.Ll - t.Rl)
    sw, sl = _sig(uw), _sig(ul)
    return _sig(-uw) + sl, -b * sw * _sig(-uw), b * sl * _sig(-ul)


def loss_apo_down(t: PairTerms, cfg: PreferenceLossConfig):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266): ``sig(u_w) + 1 - sig(b (c - r))``, evaluated
    as ``sig(u_w) + sig(-b (c - r))``: near the optimum the ``+ 1 - ...`` form lost ~1e-7 absolute in fp32."""
    b = cfg.beta
    uw = b * (t.Lw - t.Rw)
    x = b * ((t.Lw - t.Rw) - (t.Ll - t.Rl))
    dx = -b * _sig(x) * _sig(-x)
    return _sig(uw) + _sig(-x), b * _sig(uw) * _sig(-uw) + dx, -dx


def _sorted_delta_loss(delta: Tensor, cfg: PreferenceLossConfig):
    """aot's per-position loss ``-(1-e) logsig(b delta) - e logsig(-b delta)`` and its derivative in delta."""
    loss, dx = _smoothed_sigmoid(cfg.beta * delta, cfg.label_smoothing)
    return loss, cfg.beta * dx


def loss_aot(t: PairTerms, cfg: PreferenceLossConfig):
    """AOT paired (Melnyk et al. 2024, arXiv 2406.05882) as TRL 1.16: ``delta = sort(L_w - L_l) -
    sort(R_w - R_l)`` over the batch, then the smoothed sigmoid of ``b delta`` per sorted position. The
    derivative of position k goes to the pair the sort put there (``ix[k]``): ``+`` to L_w, ``-`` to L_l."""
    xs, ix = torch.sort(t.Lw - t.Ll, dim=0)
    ys, _ = torch.sort(t.Rw - t.Rl, dim=0)
    loss, dd = _sorted_delta_loss(xs - ys, cfg)
    g = torch.zeros_like(dd).scatter_(0, ix, dd)
    return loss, g, -g


def loss_aot_unpaired(t: PairTerms, cfg: PreferenceLossConfig):
    """AOT unpaired as TRL 1.16: ``delta = sort(L_w - R_w) - sort(L_l - R_l)``; position k's derivative goes
    to the chosen sequence the first sort put there (``+``) and the rejected one the second put there (``-``)."""
    cs, ic = torch.sort(t.Lw - t.Rw, dim=0)
    rs, ir = torch.sort(t.Ll - t.Rl, dim=0)
    loss, dd = _sorted_delta_loss(cs - rs, cfg)
    return loss, torch.zeros_like(dd).scatter_(0, ic, dd), torch.zeros_like(dd).scatter_(0, ir, -dd)


# ---------------------------------------------------------------------------------------------------
# beyond TRL's DPOTrainer: policy-only (CPO trainer family) and R-DPO / DPOP
# ---------------------------------------------------------------------------------------------------

def loss_simpo(t: PairTerms, cfg: PreferenceLossConfig):
    """SimPO (Meng et al. 2024, arXiv 2405.14734) on per-token means: ``-logsig(b (L_w/n_w - L_l/n_l) - g)``
    (label smoothing as TRL's CPOTrainer applies it). Reads no reference."""
    b = cfg.beta
    loss, dx = _smoothed_sigmoid(b * (t.Lw / t.nw - t.Ll / t.nl) - cfg.simpo_gamma, cfg.label_smoothing)
    return loss, b * dx / t.nw, -b * dx / t.nl


def loss_cpo(t: PairTerms, cfg: PreferenceLossConfig):
    """CPO (Xu et al. 2024, arXiv 2401.08417): ``-logsig(b (L_w - L_l))``; pair it with ``sft_weight``
    for CPO's NLL term. Reads no reference."""
    b = cfg.beta
    loss, dx = _smoothed_sigmoid(b * (t.Lw - t.Ll), cfg.label_smoothing)
    return loss, b * dx, -b * dx


def loss_dpop(t: PairTerms, cfg: PreferenceLossConfig):
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228): ``-logsig(b (D - k relu(R_w - L_w)))``."""
    b, k = cfg.beta, cfg.dpop_lambda
    gap = t.Rw - t.Lw
    x = b * ((t.Lw - t.Rw) - (t.Ll - t.Rl) - k * torch.relu(gap))
    dx = -_sig(-x)
    return -F.logsigmoid(x), b * dx * (1 + k * (gap > 0).to(x.dtype)), -b * dx


def loss_rdpo(t: PairTerms, cfg: PreferenceLossConfig):
    """R-DPO (Park et al. 2024, arXiv 2403.19159) as written in SimPO's objective table:
    ``-logsig(b D + a (n_w - n_l))``, raw lengths."""
    b = cfg.beta
    x = b * ((t.Lw - t.Rw) - (t.Ll - t.Rl)) + cfg.rdpo_alpha * (t.nw_raw - t.nl_raw)
    dx = -_sig(-x)
    return -F.logsigmoid(x), b * dx, -b * dx


# Every loss type but "sft" (a batch token mean, assembled by the step itself).
PAIR_LOSSES = {
    "sigmoid": loss_sigmoid, "robust": loss_robust, "hinge": loss_hinge, "ipo": loss_ipo,
    "exo_pair": loss_exo_pair, "nca_pair": loss_nca_pair, "bco_pair": loss_bco_pair,
    "sppo_hard": loss_sppo_hard, "aot": loss_aot, "aot_unpaired": loss_aot_unpaired,
    "apo_zero": loss_apo_zero, "apo_down": loss_apo_down, "discopop": loss_discopop,
    "sigmoid_norm": loss_sigmoid_norm, "simpo": loss_simpo, "cpo": loss_cpo, "dpop": loss_dpop,
    "rdpo": loss_rdpo,
}
