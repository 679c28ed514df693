"""SPEC 7's fp16 gradient scaling in the Triton fused-linear backward (kernels/linear_backward.py).

With fp16 inputs the backward stores ``dz = g (onehot - softmax) * chain`` to an fp16 scratch that the dW /
dhidden GEMMs read. Unscaled, a small upstream gradient puts most entries below fp16's subnormal range
(6e-8) and they flush to zero; the kernels therefore store ``dz * 2^e`` (``_fp16_dz_scale``, computed on
the device) and divide the GEMMs' fp32 sums by ``2^e``. Checked here against a float64 autograd reference
on the same fp16-rounded inputs, in the interpreter, with small odd shapes (H=40, V=97), at SPEC 7's
fp16 tolerance (gradients rel-norm <= 2e-2; NaN/inf never pass):

- a tiny upstream gradient: the scaled path passes, the unscaled store (``SCALE_FP16_DZ = False``) fails;
- a large upstream gradient with a chain factor of 8 (multiplier / temperature): no overflow, and a scale
  that ignored the chain factor would have overflowed fp16.
"""

from __future__ import annotations

import math

import pytest
import torch

import spo_kernels as sk
from spo_kernels.kernels import linear_backward as LB
from spo_kernels.kernels import linear_logprobs as LL
from batches import rel_err

GRAD_TOL = 2e-2
FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-poison every torch.empty of the module (reading unwritten memory fails the test)."""
    monkeypatch.setattr(LL, "POISON_EMPTY", True)


def _case(seed, *, h_scale, w_scale, S=4, T=13, H=40, V=97):
    """fp16 hidden [S, T, H], weight [V, H], bias [V]; labels with a ragged ignored prompt."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(S, T, H, generator=g) * h_scale).half()
    weight = (torch.randn(V, H, generator=g) * w_scale).half()
    bias = (torch.randn(V, generator=g) * 0.5).half()
    return hidden, weight, bias, _labels(g, S, T, V)


def _labels(g, S, T, V):
    labels = torch.randint(0, V, (S, T), generator=g)
    for s in range(S):
        labels[s, : int(torch.randint(1, T // 2, (1,), generator=g))] = -100
    return labels


def _underflow_case(seed, S=4, T=13, H=40, V=97):
    """fp16 inputs on which an upstream gradient of ~1.5e-6 gives dz entries of ~1.5e-8 off the target
    (softmax ~1e-2 on 97 tokens, logit std ~0.75), below fp16's smallest subnormal (6e-8), while dW and
    dhidden themselves stay above 1e-5 (so that the fp16 outputs can hold them to ~1e-3):

    - hidden rows share a large component ``30 e_0``: a never-targeted vocabulary row of dW is
      ``-g sum_t p_tv h_t``, made of small dz entries only;
    - weight rows share ``10 e_1``: ``sum_v dz_tv = 0``, so in dhidden that component cancels exactly,
      unless the small entries are lost;
    - the logits come from the other 38 dimensions only (``e_0 . W_v = h_t . e_1 = 0``).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.zeros(S, T, H)
    hidden[..., 0] = 30.0
    hidden[..., 2:] = 0.012 * torch.randn(S, T, H - 2, generator=g)
    weight = torch.zeros(V, H)
    weight[:, 1] = 10.0
    weight[:, 2:] = 10.0 * torch.randn(V, H - 2, generator=g)
    return hidden.half(), weight.half(), _labels(g, S, T, V)


def _reference_grads(hidden, weight, bias, labels, grad_seq, multiplier=1.0, softcap=None, temperature=1.0):
    """float64 autograd of ``sum_s grad_seq[s] L_s`` over the fp16 inputs upcast: (dhidden, dW[, db])."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * multiplier
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (tok.sum(-1) * grad_seq.double()).sum().backward()
    return (h.grad, w.grad) + ((b.grad,) if b is not None else ())


def _triton_grads(hidden, weight, bias, labels, grad_seq, **transform):
    params = [x.clone().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    out = sk.fused_linear_sequence_logprobs(*params[:2], labels, *params[2:], backend="triton", **transform)
    out.logps.backward(grad_seq)
    for x in params:
        assert x.grad.dtype == torch.float16
    return tuple(x.grad for x in params)


def _errors(got, ref):
    return {name: rel_err(a.double(), r) for name, a, r in zip(("dhidden", "dweight", "dbias"), got, ref)}


@pytest.mark.parametrize("overrides", [{"block_h": 32}, {"block_h": 32, "scratch_bytes": 4096, "block_n": 32,
                                                         "block_v": 32}], ids=["one-range", "several-ranges"])
def test_tiny_upstream_gradient_underflows_unscaled_not_scaled(monkeypatch, overrides):
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", overrides)
    hidden, weight, labels = _underflow_case(1)
    grad_seq = torch.tensor([1.5e-6, -2.0e-6, 1.2e-6, -1.7e-6])
    ref = _reference_grads(hidden, weight, None, labels, grad_seq)

    scaled = _errors(_triton_grads(hidden, weight, None, labels, grad_seq), ref)
    assert set(scaled) == {"dhidden", "dweight"} and all(e <= GRAD_TOL for e in scaled.values()), scaled

    monkeypatch.setattr(LB, "SCALE_FP16_DZ", False)  # the unscaled fp16 store
    unscaled = _errors(_triton_grads(hidden, weight, None, labels, grad_seq), ref)
    assert unscaled["dhidden"] > GRAD_TOL and unscaled["dweight"] > GRAD_TOL, unscaled


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the deliberately wrong scale makes inf - inf
def test_large_upstream_gradient_with_chain_factor_does_not_overflow(monkeypatch):
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"block_h": 32})
    hidden, weight, bias, labels = _case(2, h_scale=0.05, w_scale=1.0)
    transform = dict(logit_multiplier=2.0, softcap=30.0, temperature=0.25)  # chain factor <= 2 / 0.25 = 8
    grad_seq = torch.tensor([1000.0, -700.0, 400.0, -900.0])
    ref = _reference_grads(hidden, weight, bias, labels, grad_seq, multiplier=2.0, softcap=30.0, temperature=0.25)
    max_dz = 1000.0 * 8.0  # bound on |dz|; the target entries come close to it (1 - p ~ 1, tanh' ~ 1)
    # A scale that left the chain factor out (2^(14 - ceil(log2 1000)) = 16) would overflow fp16 here,
    # and the unscaled values are within fp16's range: the test can tell a wrong bound from a right one.
    assert max_dz * 2.0 ** (14 - math.ceil(math.log2(1000.0))) > FP16_MAX
    errors = _errors(_triton_grads(hidden, weight, bias, labels, grad_seq, **transform), ref)
    assert set(errors) == {"dhidden", "dweight", "dbias"} and all(e <= GRAD_TOL for e in errors.values()), errors

    # The same run with the chain factor left out of the bound overflows: the check above can fail.
    real_scale = LB._fp16_dz_scale
    monkeypatch.setattr(LB, "_fp16_dz_scale", lambda g, w, inv_temp: real_scale(g, w, 1.0))
    wrong = _triton_grads(hidden, weight, bias, labels, grad_seq, **transform)
    assert not all(torch.isfinite(x).all() for x in wrong[:2])


@pytest.mark.parametrize("grad,weights,inv_temp,bound", [
    ([1e-6, -3e-6], None, 1.0, 3e-6),
    ([1000.0, -700.0], None, 8.0, 8000.0),
    ([0.5, float("nan")], [0.25, 2.0, float("nan")], 4.0, 4.0),  # NaN left out of the bound
    ([3.0, 1.0], [0.5, 1.0], 1.0, 3.0),
])
def test_scale_is_a_power_of_two_bounding_dz(grad, weights, inv_temp, bound):
    w = None if weights is None else torch.tensor(weights)
    scale, inv = LB._fp16_dz_scale(torch.tensor(grad), w, inv_temp).tolist()
    e = math.log2(scale)
    assert e == round(e) and scale * inv == 1.0
    assert bound * scale <= 2.0 ** 14 and bound * scale > 2.0 ** 13  # largest |dz| in (2^13, 2^14]


def test_scale_extremes():
    zero = LB._fp16_dz_scale(torch.zeros(3), None, 1.0).tolist()
    assert zero == [2.0 ** 100, 2.0 ** -100]  # nothing to scale: the largest scale, still finite
    inf = LB._fp16_dz_scale(torch.tensor([1.0, float("inf")]), None, 1.0).tolist()
    assert inf == [2.0 ** -100, 2.0 ** 100]  # inf stays inf: the smallest scale
    undefined = LB._fp16_dz_scale(torch.tensor([float("inf")]), torch.zeros(2), 1.0).tolist()
    assert undefined == [1.0, 1.0]  # bound inf * 0 = NaN: no scaling rather than a garbage bit pattern


def test_only_fp16_launches_with_scaling():
    """bf16 / fp32 launch the kernels exactly as without the feature (no scale arguments at all)."""
    from spo_kernels.kernels.types import LogitTransform
    from spo_kernels.layout import build_plan

    hidden, weight, _, labels = _case(3, h_scale=1.0, w_scale=0.2)
    plan = build_plan(labels, 97, -100, labels.shape, torch.device("cpu"), pairs=False)
    lse = torch.zeros(plan.num_tokens)
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        cfg = LL.kernel_config(dt, device=hidden.device, Nc=plan.num_tokens, H=40)
        run = LB.BlockLaunches(cfg, hidden.reshape(-1, 40).to(dt), weight.to(dt), None, plan, LogitTransform(), lse,
                               torch.ones(4), 0.0, lse, lse)
        assert bool(run.scale_args) == (dt == torch.float16), dt
