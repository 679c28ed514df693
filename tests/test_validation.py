"""SPEC 7: bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import spo_kernels as sk
from spo_kernels.backends import Backend
from batches import make_batch


class _Exploding(Backend):
    """A backend whose every op fails the test: validation must stop bad input before it."""

    name = "exploding"

    def _boom(self, *a, **k):
        raise AssertionError("a kernel ran before validation rejected the input")

    loss_step = logits_forward = logits_backward = linear_forward = linear_backward = _boom


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    import spo_kernels.api as api
    monkeypatch.setattr(api, "get_backend", lambda name: _Exploding())


@pytest.fixture
def batch():
    return make_batch(P=2, T=7, H=16, V=23)


def _call(batch, **kw):
    args = dict(hidden=batch.hidden, weight=batch.weight, labels=batch.labels, bias=batch.bias,
                ref_logps=torch.zeros(4), backend="torch")
    args.update(kw)
    return sk.fused_linear_preference_loss(**args)


CASES = [
    ("beta", dict(beta=0.0), ValueError),
    ("beta", dict(beta=-1.0), ValueError),
    ("label_smoothing", dict(label_smoothing=0.5), ValueError),
    ("label_smoothing", dict(label_smoothing=-0.1), ValueError),
    ("loss_type", dict(loss_type="dpo++"), ValueError),
    ("spo_lambda", dict(spo_lambda=-1.0), ValueError),
    ("spo_normalize", dict(spo_normalize="max"), ValueError),
    ("temperature", dict(temperature=0.0), ValueError),
    ("softcap", dict(softcap=-3.0), ValueError),
    ("backend", dict(backend="cuda-magic"), ValueError),
    ("spo_anchor", dict(spo_lambda=1.0, spo_anchor="one_step"), ValueError),
    ("spo_anchor", dict(spo_lambda=1.0, spo_anchor=torch.zeros(3)), ValueError),
    ("ref_logps", dict(ref_logps=torch.zeros(3)), ValueError),
    ("ref_logps", dict(ref_logps=None), ValueError),
    ("bco_delta", dict(loss_type="bco_pair", bco_delta=torch.zeros(2)), ValueError),
    ("grad_filter_eps", dict(grad_filter_eps=-0.1), ValueError),
]


@pytest.mark.parametrize("name,kw,exc", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_option_is_named(batch, name, kw, exc):
    with pytest.raises(exc, match=name):
        _call(batch, **kw)


def test_shape_dtype_device_mismatches(batch):
    with pytest.raises(ValueError, match="weight"):
        _call(batch, weight=batch.weight[:, :-1])
    with pytest.raises(TypeError, match="weight"):
        _call(batch, weight=batch.weight.double())
    with pytest.raises(ValueError, match="bias"):
        _call(batch, bias=batch.bias[:-1])
    with pytest.raises(ValueError, match="labels"):
        _call(batch, labels=batch.labels[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        _call(batch, labels=batch.labels.float())
    with pytest.raises(TypeError, match="hidden"):
        _call(batch, hidden=batch.hidden.long())
    with pytest.raises(ValueError, match="hidden"):
        _call(batch, hidden=batch.hidden[0])
    with pytest.raises(ValueError, match="ref_hidden"):
        _call(batch, ref_logps=None, ref_hidden=batch.hidden[:, :-1])
    with pytest.raises(ValueError, match="device|meta"):
        _call(batch, weight=batch.weight.to("meta"))


def test_odd_number_of_sequences(batch):
    with pytest.raises(ValueError, match="even"):
        _call(batch, hidden=batch.hidden[:3], labels=batch.labels[:3], ref_logps=torch.zeros(3))


def test_label_out_of_range(batch):
    for bad in (23, -5):
        labels = batch.labels.clone()
        labels[1, 5] = bad
        with pytest.raises(ValueError, match=r"labels.*\[0, 23\)"):
            _call(batch, labels=labels)


def test_cu_seqlens_checks(batch):
    h = batch.hidden.reshape(-1, 16)
    lab = batch.labels.reshape(-1)
    N = h.shape[0]
    good = torch.tensor([0, 7, 14, 21, N], dtype=torch.int32)
    with pytest.raises(ValueError, match="monotone"):
        _call(batch, hidden=h, labels=lab, cu_seqlens=torch.tensor([0, 9, 7, 21, N], dtype=torch.int32))
    with pytest.raises(ValueError, match="cover"):
        _call(batch, hidden=h, labels=lab, cu_seqlens=torch.tensor([0, 7, 14, 21, N - 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens"):
        _call(batch, hidden=h, labels=lab, cu_seqlens=good.float())
    with pytest.raises(ValueError, match="even"):
        _call(batch, hidden=h, labels=lab, cu_seqlens=torch.tensor([0, 7, 14, N], dtype=torch.int32),
              ref_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="packed"):
        _call(batch, cu_seqlens=good)


def test_reference_anchor_needs_reference_even_when_reference_free(batch):
    with pytest.raises(ValueError, match="spo_anchor='reference'"):
        _call(batch, ref_logps=None, loss_type="simpo", spo_lambda=1.0)
    with pytest.raises(ValueError, match="spo_anchor='reference'"):
        _call(batch, ref_logps=None, reference_free=True, spo_lambda=1.0)


def test_logits_path_checks(batch):
    z = torch.randn(4, 7, 23)
    with pytest.raises(ValueError, match="labels"):
        sk.preference_loss(z, batch.labels[:, :-1], ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="ref_logits"):
        sk.preference_loss(z, batch.labels, ref_logits=z[:, :-1])
    with pytest.raises(ValueError, match="logits"):
        sk.preference_loss(z[0], batch.labels, ref_logps=torch.zeros(4))
    with pytest.raises(TypeError, match="config"):
        sk.preference_loss(z, batch.labels, ref_logps=torch.zeros(4), config=dict(beta=1.0))
    with pytest.raises(TypeError, match="unknown loss option"):
        sk.preference_loss(z, batch.labels, ref_logps=torch.zeros(4), config=sk.PreferenceLossConfig(), betta=1.0)


def test_env_var_selects_backend(batch, monkeypatch):
    monkeypatch.setenv("SPO_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPO_KERNELS_BACKEND"):
        _call(batch, backend=None)
