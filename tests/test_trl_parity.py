"""Parity with TRL 1.16's own ``DPOTrainer._compute_loss``: every TRL loss type and option, every loss step.

TRL itself is called: ``DPOTrainer._compute_loss`` runs unbound on a stub ``self`` that carries the config
fields (``loss_types``, ``loss_weights``, ``beta``, ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``,
``use_weighting``, ...) and stub policy / reference models whose forward returns the per-token outputs of
TRL's fused LM head (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) from
fixed random tensors. TRL's loss, its gradient with respect to the per-token log-probs (autograd through
its own code) and its logged metrics are the target. Our loss steps (``torch`` = the closed form also used by
the ``cpu`` backend, ``reference`` = the float64 autograd oracle, ``triton`` = the Triton loss step under
the interpreter) get the same data reduced to what the kernels hand them: per-sequence sums ``L_s``, ``R_s``
(LD-DPO's token weights applied), lengths, and the statistics' sums. Our gradient per token is
``g_s w_t m_t`` (SPEC 5, 8), compared with TRL's in norm.

TRL runs in float64 except for ``alpha_divergence``, whose dtype table has no float64 entry (TRL raises a
KeyError): that row is TRL in fp32, so its error is fp32 rounding.

The closing-note table: ``TRITON_INTERPRET=1 PYTHONPATH=$PWD python tests/test_trl_parity.py`` prints, for
every case x loss step, the max relative error of the loss, the gradient and each metric over the seeds.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from types import SimpleNamespace

if __name__ == "__main__":  # the table's Triton rows run under the interpreter without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("trl.trainer.dpo_trainer")

from spo_kernels.config import PreferenceLossConfig  # noqa: E402
from spo_kernels.losses import preference_loss_step  # noqa: E402
from spo_kernels.output import SequenceStats  # noqa: E402
from spo_kernels.reference import reference_metrics, reference_pair_loss  # noqa: E402

# The metrics TRL 1.16 logs that the loss step computes (TRL's names and meanings).
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
BACKENDS = ("torch", "reference", "triton")
SEEDS = (0, 1, 2)

# Every TRL 1.16 loss type (TRL's defaults: beta 0.1; exo_pair needs label_smoothing > 0 in TRL) and option.
CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "hinge": dict(loss_type="hinge"),
    "ipo": dict(loss_type="ipo"),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "aot": dict(loss_type="aot"),
    "aot (label_smoothing 0.1)": dict(loss_type="aot", label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired", label_smoothing=0.1),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop"),
    "sft": dict(loss_type="sft"),
    "sigmoid_norm": dict(loss_type="sigmoid_norm"),
    "RPO [sigmoid, sft] [1, 0.5]": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "MPO [sigmoid, bco_pair, sft] [0.8, 0.2, 1]": dict(loss_type=["sigmoid", "bco_pair", "sft"],
                                                       loss_weights=[0.8, 0.2, 1.0]),
    "f forward_kl (sigmoid)": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "f js_divergence (ipo)": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "f js_divergence (hinge, robust)": dict(loss_type=["hinge", "robust"], label_smoothing=0.1,
                                            f_divergence_type="js_divergence"),
    "f alpha_divergence 0.5 (sigmoid_norm)": dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence"),
    "f alpha_divergence 0.3 (discopop, exo_pair)": dict(loss_type=["discopop", "exo_pair"], label_smoothing=1e-3,
                                                        f_divergence_type="alpha_divergence",
                                                        f_alpha_divergence_coef=0.3),
    "WPO (sigmoid)": dict(loss_type="sigmoid", use_weighting=True),
    "WPO (ipo, nca_pair, apo_down)": dict(loss_type=["ipo", "nca_pair", "apo_down"], use_weighting=True),
    "LD-DPO ld_alpha 0.5 (sigmoid)": dict(loss_type="sigmoid", ld_alpha=0.5),
    "LD-DPO ld_alpha 0.3 (ipo, bco_pair, aot)": dict(loss_type=["ipo", "bco_pair", "aot"], ld_alpha=0.3),
}
# TRL's alpha_divergence has no float64 path: TRL in fp32 there.
FP32_TRL_CASES = tuple(k for k, v in CASES.items() if v.get("f_divergence_type") == "alpha_divergence")
# TRL's exo_pair takes log(e) and log1p(-e) of an fp32 tensor: fp32 constants in a float64 loss.
FP32_CONSTANT_CASES = tuple(k for k, v in CASES.items() if "exo_pair" in v["loss_type"])


# ---------------------------------------------------------------------------------------------------
# one batch of per-token model outputs, as TRL's fused LM head returns them
# ---------------------------------------------------------------------------------------------------

def make_batch(seed, P=5, T=16):
    """Padded batch ``[2P, T]``, chosen rows first: a prompt of 1-4 tokens, then the completion, then padding;
    one rejected completion is empty in seed 1. Per-token tensors are ``[2P, T-1]`` (TRL's shifted layout),
    zero outside the completion as the fused head returns them for label -100."""
    g = torch.Generator().manual_seed(seed)
    S = 2 * P
    prompt = torch.randint(1, 5, (S,), generator=g)
    comp = torch.stack([torch.randint(1, int(T - p), (1,), generator=g)[0] for p in prompt])
    if seed == 1:
        comp[P + 1] = 0
    pos = torch.arange(T)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + comp)[:, None])).long()
    attention_mask = (pos < (prompt + comp)[:, None]).long()
    m = completion_mask[:, 1:].double()
    lp = -(0.05 + 3.0 * torch.rand(S, T - 1, generator=g, dtype=torch.float64)) * m
    ref_lp = (lp + 0.3 * torch.randn(S, T - 1, generator=g, dtype=torch.float64)) * m
    return dict(
        completion_mask=completion_mask, attention_mask=attention_mask,
        input_ids=torch.randint(0, 50, (S, T), generator=g), m=m, logps=lp, ref_logps=ref_lp,
        entropy=3.0 * torch.rand(S, T - 1, generator=g, dtype=torch.float64) * m,
        log_sum_sq_probs=(lp + 0.4 * torch.rand(S, T - 1, generator=g, dtype=torch.float64) - 0.2) * m,
        mean_logits=(torch.randn(S, T - 1, generator=g, dtype=torch.float64) - 1.0) * m,
        is_top1=(torch.rand(S, T - 1, generator=g) < 0.4) & (m > 0),
    )


def ld_token_weights(m, ld_alpha):
    """LD-DPO's per-token weights (TRL 1.16): 1 on the first min(n_w, n_l) completion tokens of both
    sequences of a pair, ld_alpha past them; 1 everywhere without ld_alpha."""
    if ld_alpha is None:
        return m.clone()
    P = m.shape[0] // 2
    n = m.sum(1)
    shared = torch.minimum(n[:P], n[P:]).repeat(2)
    rank = m.cumsum(1)  # 1-based position within the completion
    return torch.where(rank <= shared[:, None], torch.ones_like(m), torch.full_like(m, ld_alpha)) * m


# ---------------------------------------------------------------------------------------------------
# TRL 1.16 itself
# ---------------------------------------------------------------------------------------------------

class _FusedHeadModel:
    """A model whose forward returns fixed per-token outputs, as TRL's fused LM head would."""

    is_gradient_checkpointing = False
    _modules: dict = {}  # no submodules (accelerate's compiled-region check reads it when peft is installed)

    def __init__(self, outputs, training=True):
        self.outputs = outputs
        self.training = training

    def __call__(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        return SimpleNamespace(**self.outputs)


def trl_compute(options, batch, dtype=torch.float64):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on ``batch``: (loss, d loss / d per-token log-probs, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    types = options["loss_type"] if isinstance(options["loss_type"], list) else [options["loss_type"]]
    lp = batch["logps"].detach().to(dtype).clone().requires_grad_(True)  # a leaf of its own: the batch stays as is
    policy = _FusedHeadModel(dict(log_probs=lp, entropy=batch["entropy"].to(dtype),
                                  mean_logits=batch["mean_logits"].to(dtype), is_top1=batch["is_top1"],
                                  log_sum_sq_probs=batch["log_sum_sq_probs"].to(dtype)))
    reference = _FusedHeadModel(dict(log_probs=batch["ref_logps"].to(dtype)), training=False)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(
        model=policy, ref_model=reference, accelerator=accelerator, aux_loss_enabled=False,
        ld_alpha=options.get("ld_alpha"), precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=options.get("discopop_tau", 0.05)),
        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=options.get("f_alpha_divergence_coef", 0.5),
        loss_types=types, loss_weights=options.get("loss_weights") or [1.0] * len(types),
        beta=options.get("beta", 0.1), label_smoothing=options.get("label_smoothing", 0.0),
        use_weighting=options.get("use_weighting", False),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, lp)
    metrics = {k: float(stub._metrics["train"][k][-1]) for k in TRL_METRICS}
    return float(loss.detach()), grad.double() * batch["m"], metrics


# ---------------------------------------------------------------------------------------------------
# ours: the per-sequence reduction the kernels do, then each loss step
# ---------------------------------------------------------------------------------------------------

def ours_compute(options, batch, backend):
    """Our loss step on the sums of ``batch``: (loss, per-token gradient ``g_s w_t m_t``, metrics)."""
    cfg = PreferenceLossConfig(**options)
    m = batch["m"]
    w = ld_token_weights(m, cfg.ld_alpha)
    L = (w * batch["logps"]).sum(1)
    R = (w * batch["ref_logps"]).sum(1)
    n = m.sum(1).long()
    stats = SequenceStats(*((batch[k].double() * m).sum(1) for k in
                            ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")))
    if backend == "torch":
        step = preference_loss_step(L, n, R, cfg, seq_stats=stats)
        loss, g, metrics = step.loss, step.grad, step.metrics
    elif backend == "triton":
        from spo_kernels.kernels.loss_step import loss_step
        step = loss_step(L, n, R, cfg, seq_stats=stats)
        loss, g, metrics = step.loss, step.grad, step.metrics
    else:
        Lg = L.clone().requires_grad_(True)
        loss = reference_pair_loss(Lg, n, R, cfg, seq_stats=stats)
        (g,) = torch.autograd.grad(loss, Lg)
        metrics = reference_metrics(L, n, R, cfg, seq_stats=stats)
    return float(loss.detach()), g.double()[:, None] * w, {k: float(metrics[k]) for k in TRL_METRICS}


def _rel(a, b):
    return abs(a - b) / abs(b) if b != 0 else abs(a)


def parity_errors(case, backend, seeds=SEEDS):
    """Max relative errors over ``seeds`` of loss, gradient (in norm) and each TRL metric vs TRL 1.16."""
    options = CASES[case]
    trl_dtype = torch.float32 if case in FP32_TRL_CASES else torch.float64
    worst = defaultdict(float)
    for seed in seeds:
        batch = make_batch(seed)
        t_loss, t_grad, t_metrics = trl_compute(options, batch, trl_dtype)
        o_loss, o_grad, o_metrics = ours_compute(options, batch, backend)
        worst["loss"] = max(worst["loss"], _rel(o_loss, t_loss))
        worst["grad"] = max(worst["grad"], float((o_grad - t_grad).norm() / t_grad.norm()))
        for k in TRL_METRICS:
            worst[k] = max(worst[k], _rel(o_metrics[k], t_metrics[k]))
    return dict(worst)


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------

# TRL computes these two in fp32 whatever the input dtype (``.float()``; an integer count divided by another).
FP32_METRICS = ("rewards/accuracies", "mean_token_accuracy")


def _tolerance(case, backend, quantity):
    """float64 everywhere: 1e-9; the Triton kernel gets its scalar options as fp32 (beta = 0.1 + 1.5e-9):
    1e-7; TRL in fp32 (alpha_divergence; the two fp32 metrics; exo_pair's fp32 log e): 1e-5 / 1.2e-7."""
    if case in FP32_TRL_CASES:
        return 1e-5
    if quantity in FP32_METRICS or (case in FP32_CONSTANT_CASES and quantity in ("loss", "grad")):
        return 1.2e-7
    return 1e-7 if backend == "triton" else 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    errors = parity_errors(case, backend)
    bad = {k: v for k, v in errors.items() if not v <= _tolerance(case, backend, k)}  # NaN fails too
    assert not bad, f"{case} / {backend}: {bad}"


def test_trl_harness_can_fail():
    """The comparison is sensitive: an option TRL has and we drop (here ld_alpha) shows up."""
    batch = make_batch(0)
    t_loss, _, _ = trl_compute(CASES["LD-DPO ld_alpha 0.5 (sigmoid)"], batch)
    o_loss, _, _ = ours_compute(CASES["sigmoid"], batch, "torch")
    assert _rel(o_loss, t_loss) > 1e-4


def test_trl_bco_pair_has_no_shift():
    """The issue's case: TRL 1.16's bco_pair on drifted rewards equals ours by default (no batch-mean shift)."""
    batch = make_batch(2)
    batch["ref_logps"] = batch["ref_logps"] - 2.0 * batch["m"]  # every reward drifts up
    t_loss, _, _ = trl_compute(CASES["bco_pair"], batch)
    o_loss, _, _ = ours_compute(CASES["bco_pair"], batch, "torch")
    assert _rel(o_loss, t_loss) < 1e-12


def test_wpo_with_sft_where_trl_raises():
    """TRL 1.16 crashes on sft with use_weighting (an in-place multiply of its expanded SFT loss); ours is
    the natural reading, the chosen token-mean NLL times the batch mean of the pair weights."""
    batch = make_batch(0)
    options = dict(loss_type=["sigmoid", "sft"], use_weighting=True)
    with pytest.raises(RuntimeError, match="single memory location"):
        trl_compute(options, batch)
    both, _, _ = ours_compute(options, batch, "torch")
    sigmoid, _, _ = ours_compute(dict(loss_type="sigmoid", use_weighting=True), batch, "torch")
    m, lp, lsp2 = batch["m"], batch["logps"], batch["log_sum_sq_probs"]
    w = torch.exp(((lp - lsp2) * m).sum(1) / m.sum(1).clamp(min=1))
    nll = -(lp[:5] * m[:5]).sum() / m[:5].sum()
    assert _rel(both, sigmoid + float(nll * (w[:5] * w[5:]).mean())) < 1e-12


# ---------------------------------------------------------------------------------------------------
# the closing-note table
# ---------------------------------------------------------------------------------------------------

def parity_table(backends=BACKENDS) -> str:
    """Markdown: one row per TRL 1.16 loss type / option x loss step, max relative error vs TRL's math."""
    short = {"rewards/chosen": "r/ch", "rewards/rejected": "r/rej", "rewards/margins": "r/marg",
             "rewards/accuracies": "r/acc", "logps/chosen": "lp/ch", "logps/rejected": "lp/rej",
             "entropy": "entropy", "logits/chosen": "lg/ch", "logits/rejected": "lg/rej",
             "mean_token_accuracy": "tok_acc"}
    cols = ["loss", "grad"] + list(TRL_METRICS)
    lines = ["| TRL 1.16 loss type / option | loss step | " + " | ".join(short.get(c, c) for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for case in CASES:
        for backend in backends:
            err = parity_errors(case, backend)
            cells = " | ".join(f"{err[c]:.1e}" for c in cols)
            note = " (TRL fp32)" if case in FP32_TRL_CASES else (
                " (TRL's log e in fp32)" if case in FP32_CONSTANT_CASES else "")
            lines.append(f"| {case}{note} | {backend} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(parity_table(tuple(sys.argv[1:]) or BACKENDS))
