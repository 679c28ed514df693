"""The closed-form loss step (SPEC 3-5) in one Triton launch.

``loss_step(policy_logps [2P], counts [2P], ref_logps [2P] | None, cfg, anchor [P] | None, bco_delta,
seq_stats=None)`` returns the same :class:`spo_kernels.losses.LossStep` as
:func:`spo_kernels.losses.preference_loss_step` (same formulas, same metric keys, same gradient
``g_s = dloss/dL_s``: docs/gradient.md §1, docs/losses.md §2-§3, docs/spo.md).

What the kernel handles: one loss type of ``TRITON_LOSS_TYPES`` (every per-pair loss: sigmoid, robust,
hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm, simpo,
cpo, dpop, rdpo) with reverse_kl scores, plus ``sft_weight`` and SPO. Everything else goes to the torch
loss step (:func:`spo_kernels.losses.preference_loss_step`, O(P) tensor ops, the same results): the
batch-coupled losses ``aot``, ``aot_unpaired`` (a sort of the batch) and ``sft`` (a loss type), a list of
loss types (multi-loss), an f-divergence other than reverse_kl, and ``use_weighting`` (WPO).
:func:`uses_kernel` says which. The per-token statistics' metrics (``seq_stats``) are four token means
added by the same torch helper either way.

The kernel is a single program:

- pass 1 (only when ``sft_weight > 0``: the chosen token count is needed before any gradient) loops
  over the pairs in blocks of ``BLOCK_P`` and reduces it;
- pass 2 loops over the pairs again, writes ``g`` for the chosen and rejected sequence of each pair and
  accumulates the loss and metric sums per lane, reduced once at the end.

The loss type is a constexpr: each specialization contains one loss formula. The loss and the metrics
land in one small buffer ``[len(_RESULT_SLOTS)]`` whose elements are returned as 0-d views (no
further kernels). The work is ``O(P)`` scalars: one program is enough (P is at most a few thousand).

Numerics: compute dtype fp32 (float64 when ``policy_logps`` is float64, as the torch loss step does);
``logsig(x) = min(x, 0) - log1p(exp(-|x|))`` and ``sig`` in the branch-free stable form; DiscoPOP's
``exp(-x) sig(x / tau)`` as ``exp(-x + logsig(x / tau))``; APO's ``1 - sig(u)`` as ``sig(-u)``; EXO's KL in
its Bregman form near the optimum (no cancellation). Scalar options reach the kernel as fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import BATCH_COUPLED_LOSSES, LOSS_TYPES, MEAN_BASIS_LOSSES
from ..losses import (METRIC_NAMES, SPO_METRIC_NAMES, LossStep, check_seq_stats, preference_loss_step,
                      sequence_stat_metrics)
from . import triton_helpers as TH

Tensor = torch.Tensor

# The loss types the kernel computes (a single one, reverse_kl scores, no WPO); see uses_kernel.
TRITON_LOSS_TYPES = tuple(lt for lt in LOSS_TYPES if lt not in BATCH_COUPLED_LOSSES)

# Largest block of pairs per loop step (tests lower it to exercise several blocks).
MAX_BLOCK_P = 256
# Slots of the result buffer, in the order the kernel stores them.
_RESULT_SLOTS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "nll", "spo/penalty", "spo/active_fraction", "count/empty_completions",
)


# ---------------------------------------------------------------------------------------------------
# stable scalar functions (elementwise on blocks of pairs)
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _log1p(u):
    """``log(1 + u)`` for u in [0, 1], accurate for tiny u (no tl.log1p): with ``w = 1 + u`` rounded,
    ``log(w) * u / (w - 1)`` corrects the rounding of w (exact to a few ulps); ``w == 1`` gives u."""
    w = 1.0 + u
    den = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.where(w == 1.0, u, tl.log(w) * (u / den))


@triton.jit
def _logsigmoid(x):
    """``logsig(x) = min(x, 0) - log1p(exp(-|x|))``: no overflow for any x."""
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    """``sig(x)`` as ``1 / (1 + e)`` (x >= 0) or ``e / (1 + e)`` (x < 0), ``e = exp(-|x|)`` in (0, 1]."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _expm1_minus_x(a):
    """``expm1(a) - a`` for |a| <= 1/2 without cancellation: ``a^2 sum_(k>=2) a^(k-2) / k!`` to k = 17
    (float64-accurate; :func:`spo_kernels.loss_formulas.expm1_minus_x`)."""
    return a * a * (0.5 + a * (0.16666666666666666 + a * (0.041666666666666664 + a * (0.008333333333333333 + a * (0.001388888888888889 + a * (0.0001984126984126984 + a * (2.48015873015873e-05 + a * (2.7557319223985893e-06 + a * (2.755731922398589e-07 + a * (2.505210838544172e-08 + a * (2.08767569878681e-09 + a * (1.6059043836821613e-10 + a * (1.1470745597729725e-11 + a * (7.647163731819816e-13 + a * (4.779477332387385e-14 + a * (2.8114572543455206e-15))))))))))))))))


@triton.jit
def _log1p_minus_x(w):
    """``log1p(w) - w`` for |w| <= 1/3 without cancellation: ``s = w / (2 + w)``,
    ``-2 s^2 / (1 - s) + 2 (atanh(s) - s)`` (:func:`spo_kernels.loss_formulas.log1p_minus_x`)."""
    s = w / (2.0 + w)
    s2 = s * s
    return -2.0 * s2 / (1.0 - s) + 2.0 * s2 * s * (0.3333333333333333 + s2 * (0.2 + s2 * (0.14285714285714285 + s2 * (0.1111111111111111 + s2 * (0.09090909090909091 + s2 * (0.07692307692307693 + s2 * (0.06666666666666667 + s2 * (0.058823529411764705 + s2 * (0.05263157894736842 + s2 * (0.047619047619047616 + s2 * (0.043478260869565216)))))))))))


@triton.jit
def _exo_kl(x, exo_log_1me, exo_log_e):
    """EXO's ``KL(Bern(sig(x)) || Bern(1 - e))``, stable at its optimum (:func:`spo_kernels.loss_formulas.exo_kl`):
    near ``x* = log(1-e) - log e`` the Bregman form of softplus, elsewhere the direct one."""
    direct = _sigmoid(x) * (_logsigmoid(x) - exo_log_1me) + _sigmoid(-x) * (_logsigmoid(-x) - exo_log_e)
    d = x - (exo_log_1me - exo_log_e)
    r = _sigmoid(-tl.abs(x))
    a = tl.where(x >= 0, d, -d)
    a = tl.minimum(tl.maximum(a, -0.5), 0.5)
    em = _expm1_minus_x(a)
    near = _log1p_minus_x(r * (a + em)) + r * em
    return tl.where(tl.abs(d) < 0.5, near, direct)


@triton.jit
def _load_pair(ptr, i, P, valid, ACC: tl.constexpr):
    """``(x[i], x[P + i])`` of a ``[2P]`` vector (chosen sequences first), 0 on invalid lanes, in ACC."""
    w = tl.load(ptr + i, mask=valid, other=0).to(ACC)
    l = tl.load(ptr + P + i, mask=valid, other=0).to(ACC)
    return w, l


@triton.jit
def _load_ref_pair(ref_ptr, i, P, valid, HAS_REF: tl.constexpr, ACC: tl.constexpr):
    """The reference log-probs of the pairs, or zeros without a reference (R = 0)."""
    if HAS_REF:
        return _load_pair(ref_ptr, i, P, valid, ACC)
    zero = tl.zeros(i.shape, dtype=ACC)
    return zero, zero


@triton.jit
def _base_loss(pw, pl, rw, rl, nw_raw, nl_raw, bco_d, beta, eps, gamma, dpop_k, rdpo_a, tau,
               exo_log_1me, exo_log_e, LOSS: tl.constexpr):
    """Per-pair base loss and its derivatives ``(loss_i, dloss_i/dpw, dloss_i/dpl)`` on the loss's basis
    (``p``, ``r``: sums, or per-token means for ipo / sigmoid_norm / simpo). Mirrors
    :mod:`spo_kernels.loss_formulas`."""
    D = (pw - rw) - (pl - rl)
    x = beta * D
    if LOSS == "sigmoid":
        # -(1-e) logsig(x) - e logsig(-x);  d/dx = -(1-e) sig(-x) + e sig(x)
        loss = -(1.0 - eps) * _logsigmoid(x) - eps * _logsigmoid(-x)
        dx = -(1.0 - eps) * _sigmoid(-x) + eps * _sigmoid(x)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "robust":
        # (-(1-e) logsig(x) + e logsig(-x)) / (1 - 2e)
        loss = (-(1.0 - eps) * _logsigmoid(x) + eps * _logsigmoid(-x)) / (1.0 - 2.0 * eps)
        dx = (-(1.0 - eps) * _sigmoid(-x) - eps * _sigmoid(x)) / (1.0 - 2.0 * eps)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "hinge":
        # relu(1 - x); the kink takes gradient 0
        loss = tl.maximum(1.0 - x, 0.0)
        dx = tl.where(1.0 - x > 0, -1.0, 0.0)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "ipo":
        # (D - 1/(2b))^2 on per-token means
        u = D - 0.5 / beta
        loss = u * u
        dpw = 2.0 * u
        dpl = -2.0 * u
    elif LOSS == "sigmoid_norm":
        # -logsig(b (c/n_w - r/n_l)) on per-token means
        loss = -_logsigmoid(x)
        dx = -_sigmoid(-x)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "exo_pair":
        # sig(x)(logsig(x) - log(1-e)) + sig(-x)(logsig(-x) - log e), stable at its optimum (_exo_kl);
        # d/dx = sig(x) sig(-x) (x - log(1-e) + log e)
        loss = _exo_kl(x, exo_log_1me, exo_log_e)
        dx = _sigmoid(x) * _sigmoid(-x) * (x - exo_log_1me + exo_log_e)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "nca_pair":
        # -logsig(u_w) - 0.5 logsig(-u_w) - 0.5 logsig(-u_l),  u = b (p - r)
        uw = beta * (pw - rw)
        ul = beta * (pl - rl)
        loss = -_logsigmoid(uw) - 0.5 * _logsigmoid(-uw) - 0.5 * _logsigmoid(-ul)
        dpw = beta * (-_sigmoid(-uw) + 0.5 * _sigmoid(uw))
        dpl = beta * (0.5 * _sigmoid(ul))
    elif LOSS == "bco_pair":
        # -logsig(u_w - d) - logsig(-(u_l - d)),  d = 0 (TRL 1.16) or the given shift
        uw = beta * (pw - rw) - bco_d
        ul = beta * (pl - rl) - bco_d
        loss = -_logsigmoid(uw) - _logsigmoid(-ul)
        dpw = -beta * _sigmoid(-uw)
        dpl = beta * _sigmoid(ul)
    elif LOSS == "sppo_hard":
        # (a - 1/(2b))^2 + (c + 1/(2b))^2
        a = pw - rw - 0.5 / beta
        c = pl - rl + 0.5 / beta
        loss = a * a + c * c
        dpw = 2.0 * a
        dpl = 2.0 * c
    elif LOSS == "apo_zero":
        # 1 - sig(u_w) + sig(u_l) as sig(-u_w) + sig(u_l) (no cancellation near the optimum);  sig' = sig(u) sig(-u)
        uw = beta * (pw - rw)
        ul = beta * (pl - rl)
        loss = _sigmoid(-uw) + _sigmoid(ul)
        dpw = -beta * _sigmoid(uw) * _sigmoid(-uw)
        dpl = beta * _sigmoid(ul) * _sigmoid(-ul)
    elif LOSS == "apo_down":
        # sig(u_w) + 1 - sig(x) as sig(u_w) + sig(-x) (no cancellation near the optimum)
        uw = beta * (pw - rw)
        dx = -beta * _sigmoid(x) * _sigmoid(-x)
        loss = _sigmoid(uw) + _sigmoid(-x)
        dpw = beta * _sigmoid(uw) * _sigmoid(-uw) + dx
        dpl = -dx
    elif LOSS == "discopop":
        # -logsig(x) (1 - m) + exp(-x) m,  m = sig(x / tau);  exp(-x) m = exp(-x + logsig(x / tau))
        # d/dx = -sig(-x)(1-m) + logsig(x) m' - exp(-x) m + exp(-x) m (1-m) / tau,  m' = m (1-m) / tau
        m = _sigmoid(x / tau)
        one_m = _sigmoid(-x / tau)
        e_m = tl.exp(-x + _logsigmoid(x / tau))
        ls = _logsigmoid(x)
        loss = -ls * one_m + e_m
        dx = -_sigmoid(-x) * one_m + ls * (m * one_m / tau) - e_m + e_m * one_m / tau
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "simpo":
        # -(1-e) logsig(b (pw - pl) - g) - e logsig(-(...)),  on per-token means
        xs = beta * (pw - pl) - gamma
        loss = -(1.0 - eps) * _logsigmoid(xs) - eps * _logsigmoid(-xs)
        dx = -(1.0 - eps) * _sigmoid(-xs) + eps * _sigmoid(xs)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "cpo":
        # -(1-e) logsig(b (L_w - L_l)) - e logsig(-(...))
        xc = beta * (pw - pl)
        loss = -(1.0 - eps) * _logsigmoid(xc) - eps * _logsigmoid(-xc)
        dx = -(1.0 - eps) * _sigmoid(-xc) + eps * _sigmoid(xc)
        dpw = beta * dx
        dpl = -beta * dx
    elif LOSS == "dpop":
        # -logsig(b (D - k relu(R_w - L_w)));  dpw gets the extra k where the gap is active
        gap = rw - pw
        xd = beta * (D - dpop_k * tl.maximum(gap, 0.0))
        dx = -_sigmoid(-xd)
        loss = -_logsigmoid(xd)
        dpw = beta * dx * (1.0 + dpop_k * tl.where(gap > 0, 1.0, 0.0))
        dpl = -beta * dx
    else:  # "rdpo"
        # -logsig(b D + a (n_w - n_l)), raw lengths
        xr = x + rdpo_a * (nw_raw - nl_raw)
        dx = -_sigmoid(-xr)
        loss = -_logsigmoid(xr)
        dpw = beta * dx
        dpl = -beta * dx
    return loss, dpw, dpl


# ---------------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _loss_step_kernel(
    policy_ptr,      # [2P] L_s, chosen first
    counts_ptr,      # [2P] n_s (any int or float dtype)
    ref_ptr,         # [2P] R_s (read only when HAS_REF)
    anchor_ptr,      # [P] SPO anchor (read only when USE_SPO)
    bco_delta_ptr,   # [1] bco_pair shift (read only when HAS_BCO_DELTA)
    grad_ptr,        # [2P] out: g_s = dloss/dL_s
    result_ptr,      # [len(_RESULT_SLOTS)] out: loss, then the metrics
    P,
    beta, eps, gamma, dpop_k, rdpo_a, tau, exo_log_1me, exo_log_e,
    sft_weight, spo_lambda, spo_margin,
    LOSS: tl.constexpr, MEAN_BASIS: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_BCO_DELTA: tl.constexpr, USE_SFT: tl.constexpr, USE_SPO: tl.constexpr, SPO_MEAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK_P)
    zero = tl.zeros([BLOCK_P], ACC)
    # 1/P in ACC (P may arrive as a constexpr when it is 1, so no P.to(...)).
    inv_P = 1.0 / (tl.sum(zero, axis=0) + P)

    # ---- pass 1: the chosen token count, needed by the SFT term before any gradient ----------------
    chosen_tokens = 1.0
    bco_d = 0.0
    if USE_SFT:
        tok_acc = zero
        for p0 in range(0, P, BLOCK_P):
            i = p0 + lanes
            valid = i < P
            tok_acc += tl.load(counts_ptr + i, mask=valid, other=0).to(ACC)
        chosen_tokens = tl.maximum(tl.sum(tok_acc, axis=0), 1.0)
    if HAS_BCO_DELTA:
        bco_d = tl.load(bco_delta_ptr).to(ACC)

    # ---- pass 2: per-pair loss, g_s, metric sums ---------------------------------------------------
    loss_acc = zero
    rew_w_acc = zero
    rew_l_acc = zero
    margin_acc = zero
    correct_acc = zero
    Lw_acc = zero
    Ll_acc = zero
    nw_acc = zero
    pen_acc = zero
    active_acc = zero
    empty_acc = zero
    for p0 in range(0, P, BLOCK_P):
        i = p0 + lanes
        valid = i < P
        Lw, Ll = _load_pair(policy_ptr, i, P, valid, ACC)
        nw_raw, nl_raw = _load_pair(counts_ptr, i, P, valid, ACC)
        nw = tl.maximum(nw_raw, 1.0)  # an empty completion counts as length 1 (SPEC 7)
        nl = tl.maximum(nl_raw, 1.0)
        Rw, Rl = _load_ref_pair(ref_ptr, i, P, valid, HAS_REF, ACC)
        # basis: per-token means for ipo / sigmoid_norm / simpo (chain rule d/dL = d/dp / n), sums otherwise
        if MEAN_BASIS:
            scale_w = 1.0 / nw
            scale_l = 1.0 / nl
            pw = Lw * scale_w
            pl = Ll * scale_l
            rw = Rw * scale_w
            rl = Rl * scale_l
        else:
            scale_w = 1.0
            scale_l = 1.0
            pw = Lw
            pl = Ll
            rw = Rw
            rl = Rl
        loss_i, dpw, dpl = _base_loss(pw, pl, rw, rl, nw_raw, nl_raw, bco_d, beta, eps, gamma, dpop_k,
                                      rdpo_a, tau, exo_log_1me, exo_log_e, LOSS)
        gw = dpw * scale_w * inv_P
        gl = dpl * scale_l * inv_P
        if USE_SFT:
            gw -= sft_weight / chosen_tokens  # d/dL_w of sft_weight * (-sum L_w / sum n_w)
        if USE_SPO:
            a = tl.load(anchor_ptr + i, mask=valid, other=0.0).to(ACC)
            if SPO_MEAN:
                arg = a - Lw / nw + spo_margin
            else:
                arg = a - Lw + spo_margin
            active = arg > 0  # the kink at exactly 0 takes gradient 0
            pen_acc += tl.where(valid, tl.maximum(arg, 0.0), 0.0)
            active_acc += tl.where(valid & active, 1.0, 0.0)
            if SPO_MEAN:
                gw -= tl.where(active, spo_lambda * inv_P / nw, 0.0)
            else:
                gw -= tl.where(active, spo_lambda * inv_P, 0.0)
        tl.store(grad_ptr + i, gw, mask=valid)
        tl.store(grad_ptr + P + i, gl, mask=valid)

        # TRL 1.16: rewards b (L - R) and logps on the summed log-probs, for every loss type
        rew_w = beta * (Lw - Rw)
        rew_l = beta * (Ll - Rl)
        loss_acc += tl.where(valid, loss_i, 0.0)
        rew_w_acc += tl.where(valid, rew_w, 0.0)
        rew_l_acc += tl.where(valid, rew_l, 0.0)
        margin_acc += tl.where(valid, rew_w - rew_l, 0.0)
        correct_acc += tl.where(valid & (rew_w > rew_l), 1.0, 0.0)
        Lw_acc += tl.where(valid, Lw, 0.0)
        Ll_acc += tl.where(valid, Ll, 0.0)
        nw_acc += nw_raw  # masked lanes loaded 0
        empty_acc += tl.where(valid & (nw_raw == 0), 1.0, 0.0) + tl.where(valid & (nl_raw == 0), 1.0, 0.0)

    # ---- reduce and write, in the order of _RESULT_SLOTS -------------------------------------------
    nll = -tl.sum(Lw_acc, axis=0) / tl.maximum(tl.sum(nw_acc, axis=0), 1.0)
    loss = tl.sum(loss_acc, axis=0) * inv_P
    if USE_SFT:
        loss += sft_weight * nll
    if USE_SPO:
        penalty = tl.sum(pen_acc, axis=0) * inv_P
        active_fraction = tl.sum(active_acc, axis=0) * inv_P
        loss += spo_lambda * penalty
    else:  # slots written (NaN) but not returned: the SPO metrics exist only with SPO on
        penalty = float("nan")
        active_fraction = float("nan")
    tl.store(result_ptr + 0, loss)
    tl.store(result_ptr + 1, tl.sum(rew_w_acc, axis=0) * inv_P)    # rewards/chosen
    tl.store(result_ptr + 2, tl.sum(rew_l_acc, axis=0) * inv_P)    # rewards/rejected
    tl.store(result_ptr + 3, tl.sum(margin_acc, axis=0) * inv_P)   # rewards/margins
    tl.store(result_ptr + 4, tl.sum(correct_acc, axis=0) * inv_P)  # rewards/accuracies
    tl.store(result_ptr + 5, tl.sum(Lw_acc, axis=0) * inv_P)       # logps/chosen
    tl.store(result_ptr + 6, tl.sum(Ll_acc, axis=0) * inv_P)       # logps/rejected
    tl.store(result_ptr + 7, nll)                                  # nll
    tl.store(result_ptr + 8, penalty)                              # spo/penalty
    tl.store(result_ptr + 9, active_fraction)                      # spo/active_fraction
    tl.store(result_ptr + 10, tl.sum(empty_acc, axis=0))           # count/empty_completions


# ---------------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------------

def _block_p(num_pairs: int) -> int:
    return max(16, min(triton.next_power_of_2(num_pairs), MAX_BLOCK_P))


def uses_kernel(cfg) -> bool:
    """True when the kernel computes ``cfg``'s loss step; otherwise :func:`loss_step` runs the torch loss step
    (batch-coupled losses, multi-loss, f-divergences, WPO: see the module docstring)."""
    return (cfg.single_loss_type in TRITON_LOSS_TYPES and cfg.f_divergence_is_identity
            and not cfg.use_weighting)


def loss_step(policy_logps: Tensor, counts: Tensor, ref_logps, cfg, anchor=None, bco_delta=None, *,
              seq_stats=None) -> LossStep:
    """Per-pair losses, the batch loss, ``g_s = dloss/dL_s`` and the metrics, in one kernel launch (or the torch
    loss step where :func:`uses_kernel` is False).

    Args and result: as :func:`spo_kernels.losses.preference_loss_step`: ``policy_logps [2P]`` summed
    completion log-probs (chosen first), ``counts [2P]`` completion lengths, ``ref_logps [2P]`` or None,
    ``anchor [P]`` (per-token or summed per ``cfg.spo_normalize``; needed when ``spo_lambda > 0``, which is also
    when the SPO metrics exist),
    ``bco_delta`` a scalar tensor or None (no shift), ``seq_stats`` the per-token statistics' sums or None.
    Returns :class:`LossStep` with ``loss`` (0-d), ``grad [2P]`` and the metrics (0-d views of one result
    buffer, plus the statistics' metrics when ``seq_stats`` is given), fp32 (float64 for float64 log-probs).
    """
    if policy_logps.dim() != 1 or policy_logps.shape[0] % 2 != 0 or policy_logps.shape[0] == 0:
        raise ValueError(f"policy_logps must be [2P] with P >= 1, got shape {tuple(policy_logps.shape)}")
    S = policy_logps.shape[0]
    P = S // 2
    if tuple(counts.shape) != (S,):
        raise ValueError(f"counts must be [{S}], got {tuple(counts.shape)}")
    if not uses_kernel(cfg):  # it checks seq_stats itself
        return preference_loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta, seq_stats=seq_stats)
    check_seq_stats(seq_stats, S, cfg)
    device = policy_logps.device
    acc_torch = torch.promote_types(policy_logps.dtype, torch.float32)
    if acc_torch not in (torch.float32, torch.float64):
        raise TypeError(f"policy_logps must be a float tensor, got {policy_logps.dtype}")
    acc_tl = tl.float64 if acc_torch == torch.float64 else tl.float32

    loss_type = cfg.single_loss_type
    if ref_logps is None and not cfg.base_reference_free:
        raise ValueError(f"loss_type {list(cfg.loss_type)} needs ref_logps (or reference_free=True)")
    # R feeds the rewards whenever given (simpo / cpo never read it), R = 0 with reference_free=True.
    has_ref = ref_logps is not None and not cfg.reference_free
    if has_ref and tuple(ref_logps.shape) != (S,):
        raise ValueError(f"ref_logps must be [{S}], got {tuple(ref_logps.shape)}")
    # SPO (penalty, gradient and its two metrics) only when spo_lambda > 0 (SPEC 6).
    use_spo = cfg.spo_lambda > 0
    if use_spo and anchor is None:
        raise ValueError("spo_lambda > 0 needs the SPO anchor [P] (from the reference log-probs or given)")
    if use_spo and tuple(anchor.shape) != (P,):
        raise ValueError(f"anchor must be [{P}], got {tuple(anchor.shape)}")
    has_bco_delta = loss_type == "bco_pair" and bco_delta is not None
    if has_bco_delta and bco_delta.numel() != 1:
        raise ValueError(f"bco_delta must be a scalar tensor, got shape {tuple(bco_delta.shape)}")

    exo_e = cfg.label_smoothing if cfg.label_smoothing > 0 else 1e-3
    policy = policy_logps.detach().contiguous()
    counts_c = counts.detach().contiguous()
    ref = ref_logps.detach().contiguous() if has_ref else policy
    anchor_c = anchor.detach().contiguous() if use_spo else policy
    bco_c = bco_delta.detach().reshape(1) if has_bco_delta else policy

    grad = TH.empty((S,), acc_torch, device)
    result = TH.empty((len(_RESULT_SLOTS),), acc_torch, device)
    with TH.device_guard(policy):
        _loss_step_kernel[(1,)](
            policy, counts_c, ref, anchor_c, bco_c, grad, result, P,
            float(cfg.beta), float(cfg.label_smoothing), float(cfg.simpo_gamma), float(cfg.dpop_lambda),
            float(cfg.rdpo_alpha), float(cfg.discopop_tau), math.log1p(-exo_e), math.log(exo_e),
            float(cfg.sft_weight), float(cfg.spo_lambda), float(cfg.spo_margin),
            LOSS=loss_type, MEAN_BASIS=loss_type in MEAN_BASIS_LOSSES, HAS_REF=has_ref,
            HAS_BCO_DELTA=has_bco_delta, USE_SFT=cfg.sft_weight > 0, USE_SPO=use_spo,
            SPO_MEAN=cfg.spo_normalize == "mean", ACC=acc_tl, BLOCK_P=_block_p(P), num_warps=4,
        )
    metrics = {name: result[_RESULT_SLOTS.index(name)] for name in METRIC_NAMES
               if use_spo or name not in SPO_METRIC_NAMES}
    if seq_stats is not None:
        metrics.update(sequence_stat_metrics(seq_stats, counts, acc_torch))
    return LossStep(loss=result[0], grad=grad, metrics=metrics)
