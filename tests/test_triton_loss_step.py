"""The one-launch Triton loss step (spo_kernels/kernels/loss_step.py), run by the interpreter on CPU.

Checked against the independent float64 autograd oracle (:mod:`spo_kernels.reference`) and against the
closed-form torch step (:func:`spo_kernels.losses.preference_loss_step`) on fresh random inputs: every
loss type and SPO setting, label smoothing, reference-free, sft_weight, bco_pair's delta, empty
completions, several blocks of pairs, extreme margins, float64 log-probs, the statistics' metrics; and the
torch fallback for what the kernel does not compute (batch-coupled losses, multi-loss, f-divergences,
WPO). Result buffers are poisoned with NaN before the kernel runs, so an entry it fails to write fails
the test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from spo_kernels import reference as ref  # noqa: E402
from spo_kernels.config import F_DIVERGENCE_LOSSES, LOSS_TYPES, PreferenceLossConfig  # noqa: E402
from spo_kernels.kernels import loss_step as loss_step_mod  # noqa: E402
from spo_kernels.kernels import triton_helpers  # noqa: E402
from spo_kernels.kernels.loss_step import TRITON_LOSS_TYPES, loss_step, uses_kernel  # noqa: E402
from spo_kernels.losses import (METRIC_NAMES, SPO_METRIC_NAMES, STAT_METRIC_NAMES,  # noqa: E402
                                preference_loss_step)
from spo_kernels.output import SequenceStats  # noqa: E402
from batches import assert_close_scalar as assert_scalar

LOSS_RTOL = 1e-5   # SPEC 7, fp32
GRAD_RTOL = 1e-4   # SPEC 7, fp32, relative in norm


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launcher allocates starts as NaN."""
    monkeypatch.setattr(triton_helpers, "POISON_EMPTY", True)


# ---------------------------------------------------------------------------------------------------
# inputs and oracle
# ---------------------------------------------------------------------------------------------------

def make_inputs(P=5, seed=0, empty=(1,), spread=2.0, dtype=torch.float32):
    """Random ``L [2P]``, ``n [2P]`` (int64, ``empty`` sequences have n = 0 and L = 0), ``R [2P]``."""
    g = torch.Generator().manual_seed(seed)
    S = 2 * P
    n = torch.randint(1, 30, (S,), generator=g)
    n[list(empty)] = 0
    per_token = -(0.3 + 3.0 * torch.rand(S, generator=g, dtype=torch.float64))
    L = per_token * n
    R = L + spread * torch.randn(S, generator=g, dtype=torch.float64)
    R[n == 0] = 0.0
    return L.to(dtype), n, R.to(dtype)


def spo_anchor(cfg, L, n, P, seed=0):
    """An anchor with the SPO penalty active on about half the pairs: ``a - chosen + delta`` is
    +-(0.05 .. 0.55) with alternating signs (``chosen`` = Lbar_w or L_w per ``spo_normalize``)."""
    g = torch.Generator().manual_seed(seed)
    Lw = L[:P].double()
    chosen = Lw / n[:P].clamp(min=1).double() if cfg.spo_normalize == "mean" else Lw
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(P)], dtype=torch.float64)
    gap = signs * (0.05 + 0.5 * torch.rand(P, generator=g, dtype=torch.float64))
    return (chosen - cfg.spo_margin + gap).to(L.dtype)


def reference_anchor(cfg, R, n, P):
    """SPEC 4's default anchor: Rbar_w ("mean") or R_w ("sum")."""
    Rw = R[:P].double()
    return (Rw / n[:P].clamp(min=1).double() if cfg.spo_normalize == "mean" else Rw).to(R.dtype)


def oracle(L, n, R, cfg, anchor=None, bco_delta=None, seq_stats=None):
    """float64 autograd: (loss, dloss/dL, metrics)."""
    L64 = L.detach().double().requires_grad_(True)
    R64 = None if R is None else R.double()
    a64 = None if anchor is None else anchor.double()
    d64 = None if bco_delta is None else bco_delta.double()
    loss = ref.reference_pair_loss(L64, n, R64, cfg, a64, d64, seq_stats=seq_stats)
    loss.backward()
    metrics = ref.reference_metrics(L64.detach(), n, R64, cfg, a64, seq_stats=seq_stats)
    return loss.detach(), L64.grad, metrics


def make_seq_stats(L, n, seed=0):
    """Plausible per-sequence statistic sums (float64 [2P]): WPO weights of order 1."""
    g = torch.Generator().manual_seed(seed + 500)
    S = L.shape[0]
    nf = n.double()
    return SequenceStats(nf * 3 * torch.rand(S, generator=g, dtype=torch.float64),
                         L.double() + nf * (0.6 * torch.rand(S, generator=g, dtype=torch.float64) - 0.4),
                         nf * (torch.randn(S, generator=g, dtype=torch.float64) - 2),
                         torch.floor(nf * torch.rand(S, generator=g, dtype=torch.float64)))




def rel_norm(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite gradient"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def expected_metric_names(cfg, seq_stats=None):
    """SPEC 6: the SPO metrics exist exactly when spo_lambda > 0, the statistics' when they are given."""
    names = tuple(n for n in METRIC_NAMES if cfg.spo_lambda > 0 or n not in SPO_METRIC_NAMES)
    return names + (STAT_METRIC_NAMES if seq_stats is not None else ())


def check_step(step, L, n, R, cfg, anchor=None, bco_delta=None, rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL,
               seq_stats=None):
    """The kernel's LossStep against the float64 oracle and the torch closed form."""
    P = L.shape[0] // 2
    acc = torch.promote_types(L.dtype, torch.float32)
    assert step.loss.dim() == 0 and step.loss.dtype == acc
    assert step.grad.shape == (2 * P,) and step.grad.dtype == acc
    names = expected_metric_names(cfg, seq_stats)
    assert tuple(step.metrics) == names

    loss64, grad64, metrics64 = oracle(L, n, R, cfg, anchor, bco_delta, seq_stats)
    assert_scalar(step.loss, loss64, rtol, "loss")
    assert rel_norm(step.grad, grad64) <= grad_rtol, (step.grad, grad64)
    # Differences of large terms (rewards, margins: of summed log-probs) are judged against the terms' size.
    size = float(torch.cat([L.double(), torch.zeros(1) if R is None else R.double()]).abs().max())
    assert set(metrics64) == set(names)
    for name in names:
        scale = {"rewards/accuracies": 0.0, "count/empty_completions": 0.0, "mean_token_accuracy": 0.0}.get(
            name, cfg.beta * size if name.startswith("rewards/") else size)
        assert_scalar(step.metrics[name], metrics64[name], rtol, name, scale)

    torch_step = preference_loss_step(L, n, R, cfg, anchor, bco_delta, seq_stats=seq_stats)
    assert_scalar(step.loss, torch_step.loss, rtol, "loss vs torch closed form")
    assert rel_norm(step.grad, torch_step.grad) <= grad_rtol


# ---------------------------------------------------------------------------------------------------
# every loss type x SPO setting
# ---------------------------------------------------------------------------------------------------

SPO_SETTINGS = {
    "off": {},                                                     # no anchor: no SPO metrics
    "anchor_ignored": {"spo_lambda": 0.0},                         # anchor given, lambda 0: still off
    "mean": {"spo_lambda": 1.0, "spo_margin": 0.05},               # per-token penalty
    "sum": {"spo_lambda": 0.5, "spo_margin": -0.2, "spo_normalize": "sum"},
}


@pytest.mark.parametrize("spo", list(SPO_SETTINGS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_and_spo_setting(loss_type, spo):
    seed = LOSS_TYPES.index(loss_type) * 10 + list(SPO_SETTINGS).index(spo)
    sft = 0.3 if seed % 2 else 0.0
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.2, sft_weight=sft, **SPO_SETTINGS[spo])
    P = 6
    L, n, R = make_inputs(P, seed=seed, empty=(1, P + 3))
    anchor = None if spo == "off" else spo_anchor(cfg, L, n, P, seed=seed)
    step = loss_step(L, n, R, cfg, anchor)
    check_step(step, L, n, R, cfg, anchor)
    if cfg.spo_lambda == 0:
        assert not set(SPO_METRIC_NAMES) & set(step.metrics)
    else:
        frac = float(step.metrics["spo/active_fraction"])
        assert 0.0 < frac < 1.0, "inputs should have some active and some inactive SPO pairs"


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "simpo", "cpo", "aot", "aot_unpaired"])
def test_label_smoothing(loss_type):
    cfg = PreferenceLossConfig(loss_type=loss_type, label_smoothing=0.2, beta=0.5)
    L, n, R = make_inputs(7, seed=11)
    check_step(loss_step(L, n, R, cfg), L, n, R, cfg)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "dpop", "nca_pair"])
def test_reference_free_with_spo_reference_anchor(loss_type):
    # reference_free affects the base loss only; the SPO anchor still comes from R (SPEC 4).
    cfg = PreferenceLossConfig(loss_type=loss_type, reference_free=True, spo_lambda=1.0)
    P = 5
    L, n, R = make_inputs(P, seed=21)
    anchor = reference_anchor(cfg, R, n, P)
    check_step(loss_step(L, n, R, cfg, anchor), L, n, R, cfg, anchor)


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "sft"])
def test_reference_free_losses_without_ref(loss_type):
    cfg = PreferenceLossConfig(loss_type=loss_type, sft_weight=1.0)
    L, n, _ = make_inputs(4, seed=31)
    step = loss_step(L, n, None, cfg)
    check_step(step, L, n, None, cfg)
    assert "spo/penalty" not in step.metrics


def test_bco_pair_given_delta():
    cfg = PreferenceLossConfig(loss_type="bco_pair", beta=0.3)
    L, n, R = make_inputs(5, seed=41)
    delta = torch.tensor(0.37)
    check_step(loss_step(L, n, R, cfg, None, delta), L, n, R, cfg, None, delta)


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "simpo"])
def test_several_blocks_of_pairs(monkeypatch, loss_type):
    # 37 pairs in blocks of 16: two full blocks and a partial one, in both passes.
    monkeypatch.setattr(loss_step_mod, "MAX_BLOCK_P", 16)
    cfg = PreferenceLossConfig(loss_type=loss_type, sft_weight=0.5, spo_lambda=1.0)
    P = 37
    L, n, R = make_inputs(P, seed=51, empty=(0, 20, P + 36))
    anchor = spo_anchor(cfg, L, n, P, seed=51)
    check_step(loss_step(L, n, R, cfg, anchor), L, n, R, cfg, anchor)


def test_single_pair():
    cfg = PreferenceLossConfig(loss_type="sigmoid", spo_lambda=1.0, sft_weight=0.1)
    L, n, R = make_inputs(1, seed=61, empty=())
    anchor = spo_anchor(cfg, L, n, 1, seed=61)
    check_step(loss_step(L, n, R, cfg, anchor), L, n, R, cfg, anchor)


def test_all_completions_empty():
    # n treated as 1 in means, L = 0: every output finite, nll = 0, count/empty = 2P.
    cfg = PreferenceLossConfig(loss_type="ipo", sft_weight=1.0, spo_lambda=1.0)
    P = 3
    L, n, R = torch.zeros(2 * P), torch.zeros(2 * P, dtype=torch.int64), torch.zeros(2 * P)
    anchor = torch.tensor([0.5, -0.5, 0.0])
    step = loss_step(L, n, R, cfg, anchor)
    check_step(step, L, n, R, cfg, anchor)
    assert float(step.metrics["count/empty_completions"]) == 2 * P
    assert float(step.metrics["nll"]) == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_margins_stay_finite(loss_type):
    # b D = +-200 (and dpop's gap term far beyond): stable forms give finite loss and gradient.
    L = torch.tensor([-10.0, -2010.0, -50.0, -3000.0, -2010.0, -10.0, -3000.0, -50.0])
    n = torch.tensor([10, 20, 5, 30, 20, 10, 30, 5])
    R = torch.tensor([-12.0, -9.0, -40.0, -1000.0, -8.0, -11.0, -1100.0, -52.0])
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.1)
    step = loss_step(L, n, R, cfg)
    assert torch.isfinite(step.loss) and torch.isfinite(step.grad).all()
    check_step(step, L, n, R, cfg)


def test_float64_log_probs_compute_in_float64():
    cfg = PreferenceLossConfig(loss_type="discopop", spo_lambda=1.0, sft_weight=0.2)
    P = 5
    L, n, R = make_inputs(P, seed=71, dtype=torch.float64)
    anchor = spo_anchor(cfg, L, n, P, seed=71)
    step = loss_step(L, n, R, cfg, anchor)
    assert step.loss.dtype == torch.float64
    # Scalar options reach the kernel as fp32 (beta = 0.1 is 0.1 + 1.5e-9): 1e-7 is far below fp32's 1e-5.
    check_step(step, L, n, R, cfg, anchor, rtol=1e-7, grad_rtol=1e-7)


def _launch_counter(monkeypatch):
    launches = []
    kernel = loss_step_mod._loss_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(loss_step_mod, "_loss_step_kernel", Counting())
    return launches


def test_one_launch_and_views_of_one_buffer(monkeypatch):
    launches = _launch_counter(monkeypatch)
    cfg = PreferenceLossConfig(loss_type="bco_pair", sft_weight=0.5, spo_lambda=1.0)
    P = 4
    L, n, R = make_inputs(P, seed=81)
    anchor = spo_anchor(cfg, L, n, P, seed=81)
    step = loss_step(L, n, R, cfg, anchor)
    assert launches == [(1,)]
    base = step.loss.untyped_storage().data_ptr()
    assert all(m.untyped_storage().data_ptr() == base for m in step.metrics.values())
    check_step(step, L, n, R, cfg, anchor)


# ---------------------------------------------------------------------------------------------------
# TRL 1.16 options: which run in the kernel, which fall back to the torch loss step
# ---------------------------------------------------------------------------------------------------

FALLBACK_CONFIGS = {
    "aot": dict(loss_type="aot", label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired"),
    "sft": dict(loss_type="sft", spo_lambda=1.0),
    "multi_loss": dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 1.0, 0.2]),
    "forward_kl": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "js_divergence": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "alpha_divergence": dict(loss_type="hinge", f_divergence_type="alpha_divergence"),
    "wpo": dict(loss_type="sigmoid_norm", use_weighting=True),
}


@pytest.mark.parametrize("name", list(FALLBACK_CONFIGS))
def test_torch_fallback_for_what_the_kernel_does_not_compute(monkeypatch, name):
    """No launch, the torch loss step's results, and those match the float64 oracle."""
    launches = _launch_counter(monkeypatch)
    cfg = PreferenceLossConfig(beta=0.2, **FALLBACK_CONFIGS[name])
    assert not uses_kernel(cfg)
    P = 7
    L, n, R = make_inputs(P, seed=91, spread=0.5)
    stats = make_seq_stats(L, n, seed=91)
    anchor = spo_anchor(cfg, L, n, P, seed=91) if cfg.spo_lambda > 0 else None
    step = loss_step(L, n, R, cfg, anchor, seq_stats=stats)
    assert launches == []
    check_step(step, L, n, R, cfg, anchor, seq_stats=stats)


@pytest.mark.parametrize("loss_type", TRITON_LOSS_TYPES)
def test_kernel_computes_every_per_pair_loss(monkeypatch, loss_type):
    launches = _launch_counter(monkeypatch)
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.2)
    assert uses_kernel(cfg)
    L, n, R = make_inputs(3, seed=93)
    loss_step(L, n, R, cfg)
    assert launches == [(1,)]
    # alpha within 1e-6 of 1 is reverse_kl: still the kernel
    if loss_type in F_DIVERGENCE_LOSSES:
        assert uses_kernel(cfg.replace(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0))


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "ipo"])
def test_statistics_metrics_with_the_kernel(loss_type):
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.2, spo_lambda=1.0)
    P = 6
    L, n, R = make_inputs(P, seed=95, empty=(2, P))
    stats = make_seq_stats(L, n, seed=95)
    anchor = spo_anchor(cfg, L, n, P, seed=95)
    check_step(loss_step(L, n, R, cfg, anchor, seq_stats=stats), L, n, R, cfg, anchor, seq_stats=stats)


def test_bco_pair_unshifted_by_default():
    """TRL 1.16: -logsig(u_w) - logsig(-u_l) with no shift (no batch-mean reward subtracted)."""
    cfg = PreferenceLossConfig(loss_type="bco_pair", beta=0.3)
    L, n, R = make_inputs(5, seed=97)
    R = R - 40.0  # drifted rewards: the batch-mean shift would change the loss by far more than 1e-5
    step = loss_step(L, n, R, cfg)
    check_step(step, L, n, R, cfg)
    uw, ul = 0.3 * (L[:5].double() - R[:5].double()), 0.3 * (L[5:].double() - R[5:].double())
    want = (-torch.nn.functional.logsigmoid(uw) - torch.nn.functional.logsigmoid(-ul)).mean()
    assert_scalar(step.loss, want, LOSS_RTOL, "bco_pair")


def test_missing_reference_is_an_error():
    L, n, _ = make_inputs(3, seed=99)
    with pytest.raises(ValueError, match="ref_logps"):
        loss_step(L, n, None, PreferenceLossConfig(loss_type="sigmoid"))
    with pytest.raises(ValueError, match="seq_stats"):
        loss_step(L, n, L, PreferenceLossConfig(use_weighting=True))
