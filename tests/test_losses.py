"""The closed-form loss table (losses.py) against the independent autograd oracle (reference.py)."""

import pytest
import torch

from spo_kernels import LOSS_TYPES, METRIC_NAMES, PreferenceLossConfig
from spo_kernels.losses import SPO_METRIC_NAMES, preference_loss_step
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


def _anchor_for(cfg, spo, R, n, anchor):
    P = R.shape[0] // 2
    if spo == "tensor_anchor":
        return anchor
    if cfg.spo_normalize == "mean":
        return R[:P] / n[:P].clamp(min=1)
    return R[:P]


@pytest.mark.parametrize("spo", list(SPO_SETTINGS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_closed_form_matches_autograd(loss_type, spo):
    L, n, R, anchor_t = _inputs()
    for extra in (dict(), dict(label_smoothing=0.2, sft_weight=0.3), dict(reference_free=True)):
        cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.3, **SPO_SETTINGS[spo], **extra)
        anchor = _anchor_for(cfg, spo, R, n, anchor_t)
        step = preference_loss_step(L, n, R, cfg, anchor)
        Lg = L.clone().requires_grad_(True)
        ref_loss = reference_pair_loss(Lg, n, R, cfg, anchor)
        (ref_grad,) = torch.autograd.grad(ref_loss, Lg)
        assert torch.isfinite(step.loss) and torch.isfinite(step.grad).all()
        torch.testing.assert_close(step.loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(step.grad, ref_grad, rtol=1e-9, atol=1e-12)
        ref_m = reference_metrics(L, n, R, cfg, anchor)
        names = [k for k in METRIC_NAMES if cfg.spo_lambda > 0 or k not in SPO_METRIC_NAMES]
        assert set(step.metrics) == set(names) == set(ref_m)
        for k in names:
            torch.testing.assert_close(step.metrics[k], ref_m[k], rtol=1e-10, atol=1e-12, equal_nan=True)


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
