"""SPOTrainer against TRL 1.16's DPOTrainer on the same tiny random model and data (nothing downloaded):
per-step loss, grad norm and every TRL metric within 1e-5 relative (tests/trl_parity.py defines the
error), per loss type, with LoRA, with precomputed reference log-probs, with Gemma 2's softcap and the
Cohere / Granite multipliers; evaluation; the SPO options; options we cannot honour raise."""

import math
import os
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

sys.path.insert(0, os.path.dirname(__file__))
import trl_parity as tp  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from spo_kernels import LOSS_TYPES  # noqa: E402
from spo_kernels.integrations.trl import SPOConfig, SPOTrainer  # noqa: E402

TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
SUPPORTED = [t for t in TRL_LOSS_TYPES if t in LOSS_TYPES]
UNSUPPORTED = [t for t in TRL_LOSS_TYPES if t not in LOSS_TYPES]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    import datasets
    datasets.disable_progress_bars()


def _parity(tmp_path, **kw):
    trl_logs, _ = tp.run(DPOTrainer, DPOConfig, tmp_path / "trl", **kw)
    spo_logs, _ = tp.run(SPOTrainer, SPOConfig, tmp_path / "spo", **kw)
    errs = tp.relative_errors(trl_logs, spo_logs)
    bad = {k: v for k, v in errs.items() if v > TOL}
    assert not bad, f"SPOTrainer differs from DPOTrainer: {bad}"
    # The check must be able to fail: the runs moved the model and every metric of TRL is compared.
    assert {"loss", "grad_norm", "entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins",
            "logps/chosen"} <= set(errs)
    assert len(trl_logs) == 3 and trl_logs[0]["loss"] != trl_logs[-1]["loss"]
    return trl_logs, spo_logs


@pytest.mark.parametrize("loss_type", SUPPORTED)
def test_parity_per_loss_type(tmp_path, loss_type):
    _parity(tmp_path, loss_type=loss_type, **tp.loss_kwargs(loss_type))


@pytest.mark.parametrize("loss_type", UNSUPPORTED or ["(none)"])
def test_unsupported_loss_type_raises_at_config(tmp_path, loss_type):
    if loss_type == "(none)":
        pytest.skip("every TRL 1.16 loss type is supported")
    with pytest.raises(ValueError, match="loss_type"):
        tp.train_args(SPOConfig, tmp_path, loss_type=loss_type)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_parity_head_transforms(tmp_path, kind):
    _parity(tmp_path, kind=kind)


def test_parity_multi_loss(tmp_path):
    """TRL's loss list with weights (RPO = sigmoid + weighted SFT)."""
    try:
        tp.train_args(SPOConfig, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    except NotImplementedError as exc:
        assert "loss_weights" in str(exc)
        return
    _parity(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


@pytest.mark.parametrize("options", [dict(gradient_checkpointing=True), dict(kind="gpt2"),
                                     dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)],
                         ids=["gradient_checkpointing", "gpt2_tied_head", "sync_ref_model"])
def test_parity_other_settings(tmp_path, options):
    _parity(tmp_path, **options)


def test_parity_precomputed_reference(tmp_path):
    _parity(tmp_path, precompute_ref_log_probs=True)


def test_parity_lora_adapter_disabled_reference(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)
    _parity(tmp_path, peft_config=lora)


@pytest.mark.parametrize("option,value", [("ld_alpha", 0.5), ("use_weighting", True),
                                          ("f_divergence_type", "js_divergence")])
def test_trl_options_match_or_raise(tmp_path, option, value):
    """An option either gives TRL's numbers or raises when the config is built, naming the option."""
    try:
        tp.train_args(SPOConfig, tmp_path, **{option: value})
    except NotImplementedError as exc:
        assert option in str(exc)
        return
    _parity(tmp_path, **{option: value})


def test_evaluation_with_logits(tmp_path):
    """prediction_loss_only=False works (the logits come from an extra plain forward, as in TRL) and the
    eval loss and metrics equal TRL's."""
    results = []
    for trainer_cls, config_cls, sub in ((DPOTrainer, DPOConfig, "trl"), (SPOTrainer, SPOConfig, "spo")):
        _, trainer = tp.run(trainer_cls, config_cls, tmp_path / sub, eval_=True, max_steps=1,
                            prediction_loss_only=False)
        results.append(trainer.evaluate())
    trl_eval, spo_eval = results
    for key, value in trl_eval.items():
        if key.endswith(("runtime", "per_second")):
            continue
        assert key in spo_eval
        assert math.isclose(spo_eval[key], value, rel_tol=TOL, abs_tol=1e-6), (key, value, spo_eval[key])
    assert "eval_loss" in spo_eval and "eval_rewards/margins" in spo_eval


def test_spo_margin_adds_the_penalty_at_the_first_step(tmp_path):
    """At step 1 the policy is the reference, so the "reference" anchor's penalty is exactly
    lam * relu(0 + delta) = lam * delta on every pair: the loss is TRL's plus lam * delta."""
    trl_logs, _ = tp.run(DPOTrainer, DPOConfig, tmp_path / "trl", max_steps=1)
    spo_logs, _ = tp.run(SPOTrainer, SPOConfig, tmp_path / "spo", max_steps=1, spo_lambda=2.0, spo_margin=0.25)
    assert math.isclose(spo_logs[0]["loss"], trl_logs[0]["loss"] + 0.5, rel_tol=1e-6)
    assert spo_logs[0]["spo/active_fraction"] == 1.0
    assert math.isclose(spo_logs[0]["spo/penalty"], 0.25, rel_tol=1e-5) or \
        math.isclose(spo_logs[0]["spo/penalty"], 0.5, rel_tol=1e-5)


def test_spo_one_step_anchor_trains(tmp_path):
    logs, _ = tp.run(SPOTrainer, SPOConfig, tmp_path, max_steps=2, spo_lambda=1.0, spo_anchor="one_step",
                     spo_alpha=0.5)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "spo/penalty" in logs[0] and "spo/active_fraction" in logs[0]


def test_plain_dpo_config_is_accepted(tmp_path):
    """A TRL user's own DPOConfig works unchanged (SPO off)."""
    trl_logs, _ = tp.run(DPOTrainer, DPOConfig, tmp_path / "trl", max_steps=1)
    spo_logs, _ = tp.run(SPOTrainer, DPOConfig, tmp_path / "spo", max_steps=1)
    assert math.isclose(spo_logs[0]["loss"], trl_logs[0]["loss"], rel_tol=TOL)


def test_label_smoothing_with_sigmoid_raises(tmp_path):
    """TRL 1.16's sigmoid ignores label_smoothing; ours would smooth: refused rather than different."""
    with pytest.raises(ValueError, match="label_smoothing"):
        tp.train_args(SPOConfig, tmp_path, loss_type="sigmoid", label_smoothing=0.1)


@pytest.mark.parametrize("field,value,error", [("spo_lambda", -1.0, ValueError), ("spo_anchor", "nope", ValueError),
                                               ("spo_normalize", "max", ValueError), ("spo_alpha", float("nan"),
                                                                                        ValueError)])
def test_bad_spo_options_raise_at_config(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        tp.train_args(SPOConfig, tmp_path, **{field: value})
