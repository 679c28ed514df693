"""What is particular to the ``torch`` backend (chunking, the in-place logits buffer, fp16, a real vocabulary
size, peaked and flat softmax rows, primitives with any upstream gradient); the generic cases (every loss
type, option, layout, fp32 / bf16) are in tests/test_conformance.py."""

import pytest
import torch

import spo_kernels as sk
from spo_kernels import METRIC_NAMES
from batches import assert_close_scalar, assert_metrics_close, make_batch, pack, packed_lengths, rel_err, run_fused


def _compare(out, grads, ref_out, ref_grads, low_precision=False, beta=0.1):
    loss_tol, logp_tol, grad_tol = (1e-3, 1e-3, 2e-2) if low_precision else (1e-5, 1e-5, 1e-4)
    assert_close_scalar(out.loss, ref_out.loss, loss_tol, "loss")
    assert rel_err(out.policy_logps, ref_out.policy_logps) <= logp_tol
    assert set(out.metrics) == set(ref_out.metrics)
    spo_on = "spo/penalty" in ref_out.metrics
    assert set(out.metrics) == {k for k in METRIC_NAMES if spo_on or not k.startswith("spo/")}
    assert_metrics_close(out.metrics, ref_out.metrics, loss_tol, beta)
    for k, g in ref_grads.items():
        if g is None:
            assert grads[k] is None
            continue
        assert rel_err(grads[k], g) <= grad_tol, (k, rel_err(grads[k], g))


def test_fused_linear_fp16():
    """fp16 (the conformance test covers fp32 and bf16)."""
    lowp = make_batch(P=2, T=13, H=40, V=97, seed=3, dtype=torch.float16)
    ref_out, ref_grads = run_fused(lowp, "reference", torch.float64, spo_lambda=1.0)
    out, grads = run_fused(lowp, "torch", spo_lambda=1.0)
    assert out.loss.dtype == torch.float32 and grads["weight"].dtype == torch.float16
    _compare(out, grads, ref_out, ref_grads, low_precision=True)


def test_peaked_and_flat_softmax():
    for batch in (make_batch(seed=7, peaked=True), make_batch(seed=8, scale=0.0)):
        ref_out, ref_grads = run_fused(batch, "reference", torch.float64)
        out, grads = run_fused(batch, "torch")
        _compare(out, grads, ref_out, ref_grads)


def test_small_chunks_cover_every_token(monkeypatch):
    """Chunks of one or a few rows give the same result as one big chunk."""
    batch = make_batch(seed=9)
    ref_out, ref_grads = run_fused(batch, "reference", torch.float64, spo_lambda=1.0)
    monkeypatch.setenv("SPO_KERNELS_CHUNK_MB", str(97 * 4 * 3 / 2**20))  # 3 rows per chunk
    out, grads = run_fused(batch, "torch", spo_lambda=1.0)
    _compare(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_logprobs_nonuniform_upstream(packed):
    """Primitives with a random upstream gradient, against autograd on float64."""
    batch = make_batch(P=2, T=10, seed=16)
    up = torch.randn(4, dtype=torch.float64)
    hidden, labels, cu = batch.hidden, batch.labels, None
    if packed:
        hidden, labels, cu = pack(batch.hidden, batch.labels, packed_lengths(batch.labels))

    def run(backend, dtype):
        h = hidden.to(dtype).detach().requires_grad_(True)
        w = batch.weight.to(dtype).detach().requires_grad_(True)
        b = batch.bias.to(dtype).detach().requires_grad_(True)
        res = sk.fused_linear_sequence_logprobs(h, w, labels, b, cu_seqlens=cu, backend=backend, softcap=4.0)
        (res.logps * up.to(res.logps.dtype)).sum().backward()
        return res, h.grad, w.grad, b.grad

    ours, ref = run("torch", torch.float32), run("reference", torch.float64)
    assert rel_err(ours[0].logps, ref[0].logps) <= 1e-5
    assert torch.equal(ours[0].counts, ref[0].counts)
    for a, b in zip(ours[1:], ref[1:]):
        assert rel_err(a, b) <= 1e-4


# ---- logits path (torch backend) -------------------------------------------------------------

def _logits_of(batch, dtype=torch.float32):
    z = batch.hidden.double() @ batch.weight.double().t() + batch.bias.double()
    rz = batch.ref_hidden.double() @ batch.ref_weight.double().t() + batch.bias.double()
    return z.to(dtype), rz.to(dtype)


def _run_logits(z, rz, labels, backend, inplace=True, cu=None, **opts):
    leaf = z.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf whose buffer the in-place backward may overwrite
    out = sk.preference_loss(x, labels, cu_seqlens=cu, ref_logits=rz, backend=backend,
                             inplace_backward=inplace, **opts)
    out.loss.backward()
    return out, leaf.grad


def test_logits_inplace_overwrites_buffer_and_packed_matches():
    batch = make_batch(P=2, T=9, seed=18)
    z, rz = _logits_of(batch)
    x = z.clone().requires_grad_(True)
    buf = x * 1.0
    out = sk.preference_loss(buf, batch.labels, ref_logits=rz, backend="torch")
    out.loss.backward()
    assert buf.data_ptr() != 0 and torch.equal(x.grad, buf.detach())  # the grad IS the old logits buffer
    lengths = packed_lengths(batch.labels)
    zp, lab, cu = pack(z, batch.labels, lengths)
    rzp, _, _ = pack(rz, batch.labels, lengths)
    outp, gp = _run_logits(zp, rzp, lab, "torch", cu=cu)
    torch.testing.assert_close(outp.loss, out.loss)
    torch.testing.assert_close(gp, pack(x.grad, batch.labels, lengths)[0])


def test_logits_fp16():
    """fp16 logits (the conformance test covers fp32 and bf16)."""
    dtype = torch.float16
    batch = make_batch(P=2, T=9, seed=19)
    z, rz = _logits_of(batch, dtype)
    ref_out, ref_grad = _run_logits(z.double(), rz.double(), batch.labels, "reference")
    out, grad = _run_logits(z, rz, batch.labels, "torch")
    assert grad.dtype == dtype
    assert_close_scalar(out.loss, ref_out.loss, 1e-3, "loss")
    assert rel_err(grad, ref_grad) <= 2e-2


@pytest.mark.parametrize("peaked", [False, True])
def test_bf16_head_at_a_real_vocab_size(peaked):
    """A 16-bit GEMM would round the logits to bf16 (loss errors ~1e-2 at V=8k); ours run in fp32."""
    lowp = make_batch(P=2, T=48, H=64, V=8192, seed=31, peaked=peaked, scale=2.0, dtype=torch.bfloat16)
    ref_out, ref_grads = run_fused(lowp, "reference", torch.float64)
    out, grads = run_fused(lowp, "torch")
    _compare(out, grads, ref_out, ref_grads, low_precision=True)
