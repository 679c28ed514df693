"""The closed-form loss step (losses.py, loss_formulas.py) against the independent float64 autograd
oracle (reference.py): every loss type, SPO setting, label smoothing, reference-free, f-divergence,
multi-loss, WPO, the statistics' metrics, bco_pair's opt-in shift, and the configuration's constraints."""

import dataclasses

import pytest
import torch

from spo_kernels import LOSS_TYPES, METRIC_NAMES, PreferenceLossConfig
from spo_kernels.config import (F_DIVERGENCE_LOSSES, F_DIVERGENCES, SMOOTHED_LOSSES, SORTING_LOSSES,
                                TRL_LOSS_TYPES)
from spo_kernels.losses import SPO_METRIC_NAMES, STAT_METRIC_NAMES, preference_loss_step
from spo_kernels.output import SequenceStats
from spo_kernels.reference import reference_metrics, reference_pair_loss

SPO_SETTINGS = {
    "off": dict(),
    "mean": dict(spo_lambda=1.0),
    "sum_margin": dict(spo_lambda=0.7, spo_normalize="sum", spo_margin=0.5),
    "tensor_anchor": dict(spo_lambda=2.0, spo_margin=-0.1),
}


def _inputs(P=6, seed=0, empty=True):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 30, (2 * P,), generator=g)
    if empty:
        n[1] = 0  # a chosen sequence with no completion tokens
        n[P + 2] = 0
    L = -(torch.rand(2 * P, generator=g, dtype=torch.float64) * 2 + 0.2) * n.clamp(min=1)
    L[n == 0] = 0.0
    R = L + torch.randn(2 * P, generator=g, dtype=torch.float64) * 3
    anchor = (R[:P] / n[:P].clamp(min=1)) + 0.1 * torch.randn(P, generator=g, dtype=torch.float64)
    return L, n, R, anchor


def _seq_stats(L, n, seed=0):
    """Per-sequence sums of plausible per-token statistics: log sum p^2 near the token log-probs (WPO weights
    of order 1), entropies in (0, 3), mean logits around -2, argmax hits <= n."""
    g = torch.Generator().manual_seed(seed + 1000)
    S = L.shape[0]
    nf = n.double()
    lsp2 = L + nf * (0.6 * torch.rand(S, generator=g, dtype=torch.float64) - 0.4)
    ent = nf * 3 * torch.rand(S, generator=g, dtype=torch.float64)
    logit = nf * (torch.randn(S, generator=g, dtype=torch.float64) - 2)
    hits = torch.floor(nf * torch.rand(S, generator=g, dtype=torch.float64))
    return SequenceStats(ent, lsp2, logit, hits)


def _anchor_for(cfg, spo, R, n, anchor):
    P = R.shape[0] // 2
    if spo == "tensor_anchor":
        return anchor
    if cfg.spo_normalize == "mean":
        return R[:P] / n[:P].clamp(min=1)
    return R[:P]


def _check_against_oracle(L, n, R, cfg, anchor=None, bco_delta=None, seq_stats=None):
    """Closed form vs float64 autograd of the oracle: loss, g_s and every metric."""
    step = preference_loss_step(L, n, R, cfg, anchor, bco_delta, seq_stats=seq_stats)
    Lg = L.clone().requires_grad_(True)
    ref_loss = reference_pair_loss(Lg, n, R, cfg, anchor, bco_delta, seq_stats=seq_stats)
    (ref_grad,) = torch.autograd.grad(ref_loss, Lg)
    assert torch.isfinite(step.loss) and torch.isfinite(step.grad).all()
    torch.testing.assert_close(step.loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.grad, ref_grad, rtol=1e-9, atol=1e-12)
    ref_m = reference_metrics(L, n, R, cfg, anchor, seq_stats=seq_stats)
    names = [k for k in METRIC_NAMES if cfg.spo_lambda > 0 or k not in SPO_METRIC_NAMES]
    names += list(STAT_METRIC_NAMES) if seq_stats is not None else []
    assert list(step.metrics) == names and set(names) == set(ref_m)
    for k in names:
        torch.testing.assert_close(step.metrics[k], ref_m[k], rtol=1e-10, atol=1e-12, equal_nan=True)
    return step


@pytest.mark.parametrize("spo", list(SPO_SETTINGS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_closed_form_matches_autograd(loss_type, spo):
    L, n, R, anchor_t = _inputs()
    smoothing = dict(label_smoothing=0.2) if loss_type in SMOOTHED_LOSSES else {}
    for extra in (dict(), dict(sft_weight=0.3, **smoothing), dict(reference_free=True)):
        cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.3, **SPO_SETTINGS[spo], **extra)
        _check_against_oracle(L, n, R, cfg, _anchor_for(cfg, spo, R, n, anchor_t))


@pytest.mark.parametrize("f_div", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_f_divergence_scores(loss_type, f_div):
    """Every f-divergence with every loss type TRL allows it for; alpha at 0.5 (TRL's default), 0.3 and
    within 1e-6 of 1 (reverse_kl)."""
    L, n, R, _ = _inputs(seed=3)
    R = L + 0.3 * (R - L)  # log-ratios of order 1: forward_kl's exp(-u) stays finite
    smoothing = dict(label_smoothing=0.1) if loss_type in SMOOTHED_LOSSES else {}
    coefs = (0.5, 0.3, 1.0 + 1e-7) if f_div == "alpha_divergence" else (0.5,)
    for a in coefs:
        cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.4, f_divergence_type=f_div,
                                   f_alpha_divergence_coef=a, **smoothing)
        _check_against_oracle(L, n, R, cfg)


def test_alpha_divergence_clamp_takes_zero_gradient():
    """Past TRL's clamp ((a - 1) u > 80) the score is constant: g_s = 0 there, as autograd of the clamp."""
    L = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    R = torch.tensor([160.0, -20.0], dtype=torch.float64)  # chosen log-ratio -170: (a-1) u = 85 > 80
    cfg = PreferenceLossConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    step = _check_against_oracle(L, torch.tensor([5, 5]), R, cfg)
    assert float(step.grad[0]) == 0.0 and float(step.grad[1]) != 0.0


@pytest.mark.parametrize("types,weights", [
    (["sigmoid", "sft"], [1.0, 0.3]),                    # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),   # MPO
    (["aot", "hinge", "ipo"], None),
    (["aot_unpaired", "sigmoid_norm", "simpo", "dpop"], [0.5, -0.25, 2.0, 1.0]),
])
def test_multi_loss_is_the_weighted_sum(types, weights):
    L, n, R, anchor = _inputs(seed=5)
    cfg = PreferenceLossConfig(loss_type=types, loss_weights=weights, beta=0.2, spo_lambda=0.5)
    step = _check_against_oracle(L, n, R, cfg, R[:6] / n[:6].clamp(min=1))
    assert cfg.loss_type == tuple(types)
    # and the sum of the single-type steps (SPO counted once)
    total_loss, total_grad = 0.0, 0.0
    for lt, w in zip(types, weights or [1.0] * len(types)):
        one = preference_loss_step(L, n, R, PreferenceLossConfig(loss_type=lt, beta=0.2))
        total_loss, total_grad = total_loss + w * one.loss, total_grad + w * one.grad
    spo_only = preference_loss_step(L, n, R, cfg, R[:6] / n[:6].clamp(min=1))
    off = dataclasses.replace(cfg, spo_lambda=0.0)
    torch.testing.assert_close(preference_loss_step(L, n, R, off).loss, total_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preference_loss_step(L, n, R, off).grad, total_grad, rtol=1e-12, atol=1e-14)
    assert float(spo_only.loss) >= float(total_loss)


@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt not in SORTING_LOSSES])
def test_wpo_weighting(loss_type):
    """use_weighting: each pair's loss times exp(mean(logp - log sum p^2)) of chosen and of rejected,
    detached (autograd of the oracle sees no gradient through the weights)."""
    L, n, R, _ = _inputs(seed=7)
    stats = _seq_stats(L, n, seed=7)
    smoothing = dict(label_smoothing=0.1) if loss_type in SMOOTHED_LOSSES else {}
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.3, use_weighting=True, **smoothing)
    weighted = _check_against_oracle(L, n, R, cfg, seq_stats=stats)
    plain = preference_loss_step(L, n, R, cfg.replace(use_weighting=False), seq_stats=stats)
    assert abs(float(weighted.loss - plain.loss)) > 1e-6  # the weights are not all 1


def test_wpo_needs_the_statistics_and_refuses_sorting_losses():
    L, n, R, _ = _inputs()
    with pytest.raises(ValueError, match="seq_stats"):
        preference_loss_step(L, n, R, PreferenceLossConfig(use_weighting=True))
    for lt in SORTING_LOSSES:
        with pytest.raises(ValueError, match="use_weighting"):
            PreferenceLossConfig(loss_type=lt, use_weighting=True)
    bad = SequenceStats(*(torch.zeros(3, dtype=torch.float64) for _ in range(4)))
    with pytest.raises(ValueError, match="seq_stats.entropy_sum"):
        preference_loss_step(L, n, R, PreferenceLossConfig(), seq_stats=bad)
    with pytest.raises(TypeError, match="seq_stats"):
        preference_loss_step(L, n, R, PreferenceLossConfig(), seq_stats=(1, 2, 3, 4))


def test_statistics_metrics_as_trl_defines_them():
    """entropy: mean over every completion token; logits/*: mean over chosen / rejected tokens;
    mean_token_accuracy: fraction of chosen tokens; worked by hand, and 0 without tokens (TRL's 0.0)."""
    L = torch.tensor([-4.0, -6.0, -3.0, -9.0], dtype=torch.float64)
    n = torch.tensor([2, 4, 3, 1])
    stats = SequenceStats(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                          torch.zeros(4, dtype=torch.float64),
                          torch.tensor([-2.0, -4.0, 3.0, 1.0], dtype=torch.float64),
                          torch.tensor([1.0, 3.0, 0.0, 1.0], dtype=torch.float64))
    m = _check_against_oracle(L, n, L + 1, PreferenceLossConfig(), seq_stats=stats).metrics
    assert float(m["entropy"]) == pytest.approx(10 / 10)
    assert float(m["logits/chosen"]) == pytest.approx(-6 / 6)
    assert float(m["logits/rejected"]) == pytest.approx(4 / 4)
    assert float(m["mean_token_accuracy"]) == pytest.approx(4 / 6)
    zero = torch.zeros(4, dtype=torch.float64)
    m = _check_against_oracle(zero, torch.zeros(4, dtype=torch.int64), zero, PreferenceLossConfig(),
                              seq_stats=SequenceStats(zero, zero, zero, zero)).metrics
    assert all(float(m[k]) == 0.0 for k in STAT_METRIC_NAMES)


def test_rewards_and_logps_are_sums_for_every_loss_type():
    """TRL 1.16: rewards b (L - R) and logps on the summed log-probs, ipo and the mean-basis types included;
    R whenever given (TRL's sft logs b (L - R) too), R = 0 with reference_free=True or without R."""
    L, n, R, _ = _inputs()
    for lt in LOSS_TYPES:
        cfg = PreferenceLossConfig(loss_type=lt, beta=0.3)
        m = preference_loss_step(L, n, R, cfg).metrics
        torch.testing.assert_close(m["logps/chosen"], L[:6].mean())
        torch.testing.assert_close(m["rewards/rejected"], 0.3 * (L[6:] - R[6:]).mean())
        m = preference_loss_step(L, n, R, cfg.replace(reference_free=True)).metrics
        torch.testing.assert_close(m["rewards/rejected"], 0.3 * L[6:].mean())
        if cfg.base_reference_free:
            m = preference_loss_step(L, n, None, cfg).metrics
            torch.testing.assert_close(m["rewards/chosen"], 0.3 * L[:6].mean())


def test_bco_pair_is_unshifted_by_default_and_shifts_on_request():
    """TRL 1.16's bco_pair has no reward shift: on drifted rewards the old batch-mean shift gave a different
    loss (the issue's 1.152 vs 2.206). The shift stays available as bco_delta."""
    L, n, R, _ = _inputs()
    R = R - 40.0  # drifted rewards: every b (L - R) near +12
    cfg = PreferenceLossConfig(loss_type="bco_pair", beta=0.3)
    P = 6
    uw, ul = 0.3 * (L[:P] - R[:P]), 0.3 * (L[P:] - R[P:])
    trl = (-torch.nn.functional.logsigmoid(uw) - torch.nn.functional.logsigmoid(-ul)).mean()
    step = _check_against_oracle(L, n, R, cfg)
    torch.testing.assert_close(step.loss, trl, rtol=1e-12, atol=0)
    d = torch.cat([uw, ul]).mean()
    shifted = _check_against_oracle(L, n, R, cfg, bco_delta=d)
    assert abs(float(shifted.loss - step.loss)) > 1.0


def test_aot_gradient_follows_the_sort_permutation():
    """aot on three pairs worked by hand: sort(L_w - L_l) = [-3, 1, 2] from pairs [2, 0, 1]; the gradient of
    sorted position k goes to the pair the sort put there."""
    Lw = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    L = torch.cat([Lw, torch.zeros(3, dtype=torch.float64)])
    R = torch.cat([torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])
    cfg = PreferenceLossConfig(loss_type="aot", beta=1.0)
    step = _check_against_oracle(L, torch.tensor([3] * 6), R, cfg)
    delta = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64) - torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
    d = -torch.sigmoid(-delta) / 3
    want = torch.stack([d[1], d[2], d[0]])
    torch.testing.assert_close(step.grad[:3], want)
    torch.testing.assert_close(step.grad[3:], -want)


def test_sft_loss_is_the_chosen_token_mean_nll():
    L, n, _, _ = _inputs()
    step = _check_against_oracle(L, n, None, PreferenceLossConfig(loss_type="sft"))
    torch.testing.assert_close(step.loss, -L[:6].sum() / n[:6].sum())
    assert (step.grad[6:] == 0).all() and torch.allclose(step.grad[:6], -1 / n[:6].sum().double())


def test_reference_needed_unless_reference_free():
    L, n, R, _ = _inputs()
    with pytest.raises(ValueError, match="ref_logps"):
        preference_loss_step(L, n, None, PreferenceLossConfig(loss_type=["sft", "sigmoid"]))
    assert PreferenceLossConfig(loss_type=["sft", "simpo"]).base_reference_free
    preference_loss_step(L, n, None, PreferenceLossConfig(loss_type=["sigmoid", "sft"], reference_free=True))


@pytest.mark.parametrize("options,match", [
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "dpo++"]), "loss_type"),
    (dict(loss_type=["sigmoid", 3]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, float("nan")]), "loss_weights"),
    (dict(loss_weights=1.0), "loss_weights"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(f_divergence_type="js_divergence", loss_type="nca_pair"), "f_divergence_type"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf")), "f_alpha_divergence_coef"),
    (dict(use_weighting=True, loss_type=["sigmoid", "aot"]), "use_weighting"),
    (dict(label_smoothing=0.1, loss_type="hinge"), "label_smoothing"),
    (dict(label_smoothing=0.1, loss_type=["sigmoid", "robust"]), "label_smoothing"),
    (dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]), "ld_alpha"),
    (dict(ld_alpha=0.5, sft_weight=0.1), "ld_alpha"),
    (dict(ld_alpha=0.5, use_weighting=True), "ld_alpha"),
])
def test_config_constraints(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PreferenceLossConfig(**options)


def test_config_stores_tuples():
    cfg = PreferenceLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1, 0.5) and hash(cfg)
    assert PreferenceLossConfig(loss_type="ipo").loss_type == ("ipo",)
    assert PreferenceLossConfig(loss_type="ipo").single_loss_type == "ipo" and cfg.single_loss_type is None
    assert cfg.replace(beta=0.2).loss_type == ("sigmoid", "sft")
    assert set(TRL_LOSS_TYPES) <= set(LOSS_TYPES)
    PreferenceLossConfig(ld_alpha=1.0, sft_weight=0.1)  # ld_alpha = 1 weights nothing


def test_spo_penalty_and_gradient_by_hand():
    """SPEC 4 on numbers worked by hand: only the pair whose chosen per-token log-prob fell below the
    anchor is penalized, with dloss/dL_w = -(lam/P)/n_w."""
    L = torch.tensor([-10.0, -4.0, -20.0, -9.0], dtype=torch.float64)  # chosen: -10 (n=5), -4 (n=2)
    n = torch.tensor([5, 2, 4, 3])
    R = torch.tensor([-5.0, -6.0, -20.0, -9.0], dtype=torch.float64)   # ref chosen per token: -1, -3
    cfg = PreferenceLossConfig(loss_type="hinge", beta=1e-6, spo_lambda=1.0)
    step = preference_loss_step(L, n, R, cfg, R[:2] / n[:2])
    # pair 0: Lbar=-2 < anchor -1 -> penalty 1; pair 1: Lbar=-2 > anchor -3 -> inactive
    assert float(step.metrics["spo/penalty"]) == pytest.approx(0.5)
    assert float(step.metrics["spo/active_fraction"]) == pytest.approx(0.5)
    hinge_only = preference_loss_step(L, n, R, cfg.replace(spo_lambda=0.0), R[:2] / n[:2])
    torch.testing.assert_close(step.grad - hinge_only.grad,
                               torch.tensor([-1.0 / 2 / 5, 0, 0, 0], dtype=torch.float64))
    assert float(step.loss - hinge_only.loss) == pytest.approx(0.5)


def test_spo_kink_takes_zero_gradient():
    L = torch.tensor([-6.0, -8.0], dtype=torch.float64)
    n = torch.tensor([3, 4])
    cfg = PreferenceLossConfig(loss_type="cpo", spo_lambda=1.0)
    base = preference_loss_step(L, n, None, cfg.replace(spo_lambda=0.0), torch.tensor([-2.0], dtype=torch.float64))
    at_kink = preference_loss_step(L, n, None, cfg, torch.tensor([-2.0], dtype=torch.float64))
    torch.testing.assert_close(at_kink.grad, base.grad)
    assert float(at_kink.metrics["spo/active_fraction"]) == 0.0


def test_spo_metrics_only_when_spo_is_on():
    """SPEC 6: spo/penalty and spo/active_fraction exist only when spo_lambda > 0 (an anchor alone does
    not turn them on); SPO on without an anchor is an error, never a silently missing penalty."""
    L, n, R, anchor = _inputs()
    for a in (None, anchor):
        step = preference_loss_step(L, n, R, PreferenceLossConfig(), a)
        assert not set(SPO_METRIC_NAMES) & set(step.metrics)
        assert not set(SPO_METRIC_NAMES) & set(reference_metrics(L, n, R, PreferenceLossConfig(), a))
    on = preference_loss_step(L, n, R, PreferenceLossConfig(spo_lambda=0.5), anchor)
    assert set(SPO_METRIC_NAMES) <= set(on.metrics)
    with pytest.raises(ValueError, match="anchor"):
        preference_loss_step(L, n, R, PreferenceLossConfig(spo_lambda=0.5), None)


def test_empty_completions_are_counted_not_nan():
    L, n, R, anchor = _inputs()
    for lt in LOSS_TYPES:
        step = preference_loss_step(L, n, R, PreferenceLossConfig(loss_type=lt, spo_lambda=1.0), anchor)
        assert torch.isfinite(step.loss) and torch.isfinite(step.grad).all(), lt
        assert float(step.metrics["count/empty_completions"]) == 2.0


def test_discopop_extreme_margins_stay_finite():
    L = torch.tensor([-1e4, 0.0, 0.0, -1e4])
    n = torch.tensor([10, 10, 10, 10])
    step = preference_loss_step(L, n, torch.zeros(4), PreferenceLossConfig(loss_type="discopop", beta=1.0))
    assert torch.isfinite(step.loss) and torch.isfinite(step.grad).all()
