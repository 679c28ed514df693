"""nn.Module wrappers, the named output, backend selection by environment, bco_pair's running mean."""

import pytest
import torch

import spo_kernels as sk
from batches import make_batch


def test_module_matches_function_and_output_is_named():
    batch = make_batch(seed=21)
    loss_fn = sk.FusedLinearPreferenceLoss(beta=0.2, spo_lambda=1.0, backend="torch")
    out = loss_fn(batch.hidden, batch.weight, batch.labels, batch.bias, ref_hidden=batch.ref_hidden,
                  ref_weight=batch.ref_weight, ref_bias=batch.bias)
    ref = sk.fused_linear_preference_loss(batch.hidden, batch.weight, batch.labels, batch.bias, ref_hidden=batch.ref_hidden,
                                          ref_weight=batch.ref_weight, ref_bias=batch.bias, beta=0.2, spo_lambda=1.0,
                                          backend="torch")
    assert isinstance(out, sk.PreferenceLossOutput)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out["loss"] is out.loss and out["rewards/margins"] is out.metrics["rewards/margins"]
    logged = out.log_dict()
    assert set(logged) == {"loss", *sk.METRIC_NAMES} and all(isinstance(v, float) for v in logged.values())
    assert "spo_lambda=1.0" in repr(loss_fn)


def test_logits_module():
    batch = make_batch(seed=22, bias=False)
    z = (batch.hidden @ batch.weight.t()).requires_grad_(True)
    ref_logps = torch.randn(4) - 20
    out = sk.PreferenceLoss(loss_type="ipo", backend="torch")(z * 1.0, batch.labels, ref_logps=ref_logps)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_environment_variable_selects_backend(monkeypatch):
    import spo_kernels.api as api
    used = []
    real = api.get_backend
    monkeypatch.setattr(api, "get_backend", lambda name: used.append(name) or real(name))
    batch = make_batch(seed=23)
    ref = torch.zeros(4) - 30
    monkeypatch.setenv("SPO_KERNELS_BACKEND", "reference")
    out = sk.fused_linear_preference_loss(batch.hidden, batch.weight, batch.labels, ref_logps=ref)
    assert used and set(used) == {"reference"}  # a backend like the others (autograd-differentiated)
    used.clear()
    monkeypatch.setenv("SPO_KERNELS_BACKEND", "torch")
    out2 = sk.fused_linear_preference_loss(batch.hidden, batch.weight, batch.labels, ref_logps=ref)
    assert used and set(used) == {"torch"}
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-6, atol=1e-7)
    used.clear()
    sk.fused_linear_preference_loss(batch.hidden, batch.weight, batch.labels, ref_logps=ref, backend="torch")
    assert set(used) == {"torch"}  # the argument wins over the environment


def test_bco_pair_module_is_unshifted_by_default():
    """TRL 1.16's bco_pair has no reward shift: the module's default equals bco_delta=None."""
    loss_fn = sk.FusedLinearPreferenceLoss(loss_type="bco_pair", backend="torch")
    b = make_batch(seed=26)
    ref = torch.zeros(4) - 25.0
    out = loss_fn(b.hidden, b.weight, b.labels, b.bias, ref_logps=ref)
    direct = sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias, ref_logps=ref,
                                             loss_type="bco_pair", backend="torch")
    shifted = sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias, ref_logps=ref,
                                              loss_type="bco_pair", backend="torch", bco_delta=torch.tensor(1.0))
    torch.testing.assert_close(out.loss, direct.loss)
    assert abs(float(out.loss - shifted.loss)) > 1e-3 and float(loss_fn.bco_steps) == 0.0
    with pytest.raises(TypeError, match="bco_running_mean"):
        sk.FusedLinearPreferenceLoss(loss_type="bco_pair", bco_running_mean="yes")


def test_bco_running_mean_matches_trl_update():
    """Opt-in running mean (TRL's RunningMoments before 1.16) over per-step mean rewards: step 1 uses the
    batch mean, step 2 the mean of the two steps' means."""
    loss_fn = sk.FusedLinearPreferenceLoss(loss_type="bco_pair", backend="torch", bco_running_mean=True)
    b1, b2 = make_batch(seed=24), make_batch(seed=25)
    ref = torch.zeros(4) - 25.0
    step_means = []
    outs = []
    for b in (b1, b2):
        outs.append(loss_fn(b.hidden, b.weight, b.labels, b.bias, ref_logps=ref))
        m = outs[-1].metrics
        step_means.append(float(m["rewards/chosen"] + m["rewards/rejected"]) / 2)
    assert float(loss_fn.bco_mean) == pytest.approx(sum(step_means) / 2, rel=1e-6)
    direct = sk.fused_linear_preference_loss(b2.hidden, b2.weight, b2.labels, b2.bias, ref_logps=ref,
                                             loss_type="bco_pair", bco_delta=torch.tensor(sum(step_means) / 2),
                                             backend="torch")
    torch.testing.assert_close(outs[1].loss, direct.loss, rtol=1e-6, atol=1e-7)
    state = loss_fn.state_dict()
    assert "bco_mean" in state and "bco_steps" in state
