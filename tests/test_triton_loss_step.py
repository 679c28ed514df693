"""The one-launch Triton loss step (spo_kernels/kernels/loss_step.py), run by the interpreter on CPU.

Checked against the independent float64 autograd oracle (:mod:`spo_kernels.reference`) and against the
closed-form torch step (:func:`spo_kernels.losses.preference_loss_step`) on fresh random inputs: every
loss type and SPO setting, label smoothing, reference-free, sft_weight, bco_pair's delta, empty
completions, several blocks of pairs, extreme margins, float64 log-probs. Result buffers are poisoned
with NaN before the kernel runs, so an entry it fails to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from spo_kernels import reference as ref  # noqa: E402
from spo_kernels.config import LOSS_TYPES, PreferenceLossConfig  # noqa: E402
from spo_kernels.kernels import loss_step as loss_step_mod  # noqa: E402
from spo_kernels.kernels import triton_helpers  # noqa: E402
from spo_kernels.kernels.loss_step import loss_step  # noqa: E402
from spo_kernels.losses import METRIC_NAMES, SPO_METRIC_NAMES, preference_loss_step  # noqa: E402
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


def oracle(L, n, R, cfg, anchor=None, bco_delta=None):
    """float64 autograd: (loss, dloss/dL, metrics)."""
    L64 = L.detach().double().requires_grad_(True)
    R64 = None if R is None else R.double()
    a64 = None if anchor is None else anchor.double()
    d64 = None if bco_delta is None else bco_delta.double()
    loss = ref.reference_pair_loss(L64, n, R64, cfg, a64, d64)
    loss.backward()
    metrics = ref.reference_metrics(L64.detach(), n, R64, cfg, a64)
    return loss.detach(), L64.grad, metrics




def rel_norm(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite gradient"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def expected_metric_names(cfg):
    """SPEC 6: the SPO metrics exist exactly when spo_lambda > 0."""
    return tuple(n for n in METRIC_NAMES if cfg.spo_lambda > 0 or n not in SPO_METRIC_NAMES)


def check_step(step, L, n, R, cfg, anchor=None, bco_delta=None, rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL):
    """The kernel's LossStep against the float64 oracle and the torch closed form."""
    P = L.shape[0] // 2
    acc = torch.promote_types(L.dtype, torch.float32)
    assert step.loss.dim() == 0 and step.loss.dtype == acc
    assert step.grad.shape == (2 * P,) and step.grad.dtype == acc
    names = expected_metric_names(cfg)
    assert tuple(step.metrics) == names

    loss64, grad64, metrics64 = oracle(L, n, R, cfg, anchor, bco_delta)
    assert_scalar(step.loss, loss64, rtol, "loss")
    assert rel_norm(step.grad, grad64) <= grad_rtol, (step.grad, grad64)
    # Differences of large terms (rewards, margins) are judged against the terms' size.
    nc = n.clamp(min=1).double()
    basis = L.double() / nc if cfg.mean_basis else L.double()
    rbasis = torch.zeros_like(basis) if R is None else (R.double() / nc if cfg.mean_basis else R.double())
    size = float(torch.cat([basis, rbasis]).abs().max())
    assert set(metrics64) == set(names)
    for name in names:
        scale = {"rewards/accuracies": 0.0, "count/empty_completions": 0.0}.get(
            name, cfg.beta * size if name.startswith("rewards/") else size)
        assert_scalar(step.metrics[name], metrics64[name], rtol, name, scale)

    torch_step = preference_loss_step(L, n, R, cfg, anchor, bco_delta)
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


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "simpo", "cpo"])
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


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
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


def test_one_launch_and_views_of_one_buffer(monkeypatch):
    launches = []
    kernel = loss_step_mod._loss_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(loss_step_mod, "_loss_step_kernel", Counting())
    cfg = PreferenceLossConfig(loss_type="bco_pair", sft_weight=0.5, spo_lambda=1.0)
    P = 4
    L, n, R = make_inputs(P, seed=81)
    anchor = spo_anchor(cfg, L, n, P, seed=81)
    step = loss_step(L, n, R, cfg, anchor)
    assert launches == [(1,)]
    base = step.loss.untyped_storage().data_ptr()
    assert all(m.untyped_storage().data_ptr() == base for m in step.metrics.values())
    check_step(step, L, n, R, cfg, anchor)
