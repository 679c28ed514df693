"""The ``cpu`` backend (C++ extension spo_kernels._cpu) against the float64 reference and the torch backend.

Skipped when the extension is not built. Tolerances are SPEC 7's: fp32 inputs, loss / log-probs rel
1e-5 and gradients rel (norm) 1e-4; bf16 / fp16 inputs, loss rel 1e-3 and gradients rel 2e-2.
"""

from __future__ import annotations

import pytest
import torch

import spo_kernels as sk
from spo_kernels.backends import get_backend, resolve_backend_name
from spo_kernels.backends.cpu import CpuBackend, extension_available
from spo_kernels.backends.torch_chunked import TorchChunkedBackend
from spo_kernels.layout import build_plan
from spo_kernels.kernels.types import KernelOptions, LogitTransform

import batches
from batches import rel_err

pytestmark = pytest.mark.skipif(not extension_available(),
                                reason="spo_kernels._cpu (the cpu backend's C++ extension) is not built")

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-3, 2e-2), torch.float16: (1e-3, 2e-2)}


# ---------------------------------------------------------------------------------------------
# batches and comparisons
# ---------------------------------------------------------------------------------------------

def make_batch(P=2, T=23, H=40, V=97, **kwargs) -> dict:
    """The shared fp32 test batch (tests/batches.py) as a dict of its tensors."""
    b = batches.make_batch(P=P, T=T, H=H, V=V, **kwargs)
    return dict(hidden=b.hidden, weight=b.weight, bias=b.bias, labels=b.labels, ref_hidden=b.ref_hidden,
                ref_weight=b.ref_weight)


def to_packed(x, labels):
    """[S, T, ...] -> packed [N, ...] keeping each sequence's prefix through its last completion token."""
    lengths = []
    for row in labels:
        idx = (row != -100).nonzero()
        lengths.append(int(idx[-1]) + 1 if len(idx) else 1 + len(lengths) % 3)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    xs = torch.cat([x[s, :n] for s, n in enumerate(lengths)]) if x is not None else None
    ls = torch.cat([labels[s, :n] for s, n in enumerate(lengths)])
    return xs, ls, cu



def assert_rel(a, b, tol, what):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: rel err {err:.3g} > {tol:g}"


def layout_inputs(batch, layout, dtype):
    """(hidden, ref_hidden, labels, cu_seqlens) in the requested layout and dtype."""
    h, rh, labels = batch["hidden"], batch["ref_hidden"], batch["labels"]
    if layout == "packed":
        ph, pl, cu = to_packed(h, labels)
        prh, _, _ = to_packed(rh, labels)
        return ph.to(dtype), prh.to(dtype), pl, cu
    return h.to(dtype), rh.to(dtype), labels, None


def run_linear(batch, layout, dtype, backend, *, compute_dtype=None, frozen=False, **opts):
    """fused_linear_preference_loss with grads. compute_dtype: upcast the (dtype-rounded) inputs first."""
    h, rh, labels, cu = layout_inputs(batch, layout, dtype)
    w, rw = batch["weight"].to(dtype), batch["ref_weight"].to(dtype)
    b = None if batch["bias"] is None else batch["bias"].to(dtype)
    if compute_dtype is not None:
        h, rh, w, rw = h.to(compute_dtype), rh.to(compute_dtype), w.to(compute_dtype), rw.to(compute_dtype)
        b = None if b is None else b.to(compute_dtype)
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(not frozen)
    if b is not None:
        b = b.detach().requires_grad_(not frozen)
    kw = dict(opts)
    if backend is not None:
        kw["backend"] = backend
    out = sk.fused_linear_preference_loss(h, w, labels, b, cu_seqlens=cu, ref_hidden=rh, ref_weight=rw,
                                          ref_bias=None if b is None else b.detach(), **kw)
    out.loss.backward()
    return out, {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def assert_loss_close(loss, ref_out, tol, beta, what):
    """|loss - ref| <= tol * max(|ref|, beta * max|L|): the loss is a (beta-scaled) difference of fp32
    log-probs, so its error is bounded by the log-probs' relative error times their size."""
    a, b = float(loss.detach()), float(ref_out.loss.detach())
    scale = max(abs(b), beta * float(ref_out.policy_logps.abs().max()))
    assert a == a and abs(a - b) <= tol * scale, f"{what}: {a} vs {b} (tol {tol:g} x {scale:.3g})"


def check_torch_agreement(out, grads, tor, tor_grads, ref, ref_grads, dtype, beta):
    """fp32: cpu and torch backends agree to SPEC 7's tolerances. bf16: the torch backend rounds its
    GEMM output (the logits) to bf16 while the cpu backend keeps them in fp32, so instead of agreeing
    with it the cpu backend must be at least as close to the reference."""
    loss_tol, grad_tol = TOL[dtype]
    if dtype == torch.float32:
        assert_loss_close(out.loss, tor, loss_tol, beta, "cpu vs torch loss")
        for k in grads:
            if grads[k] is not None:
                assert_rel(grads[k], tor_grads[k], grad_tol, f"cpu vs torch d{k}")
        return
    assert rel_err(out.loss, ref.loss) <= max(rel_err(tor.loss, ref.loss), loss_tol)
    for k in grads:
        if grads[k] is not None:
            assert rel_err(grads[k], ref_grads[k]) <= max(1.05 * rel_err(tor_grads[k], ref_grads[k]), grad_tol)


def check_against(out, grads, ref_out, ref_grads, dtype, what, beta):
    loss_tol, grad_tol = TOL[dtype]
    assert out.loss.dtype == torch.float32
    assert_loss_close(out.loss, ref_out, loss_tol, beta, f"{what} loss")
    assert_rel(out.policy_logps, ref_out.policy_logps, loss_tol, f"{what} logps")
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None:
            assert g is None, f"{what}: unexpected grad for {name}"
            continue
        assert g is not None and g.dtype == dtype, f"{what}: grad {name} missing or wrong dtype"
        assert_rel(g, r, grad_tol, f"{what} d{name}")


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------

def test_auto_selects_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SPO_KERNELS_BACKEND", raising=False)
    assert resolve_backend_name(None, torch.device("cpu")) == "cpu"
    assert isinstance(get_backend("cpu"), CpuBackend)
    batch = make_batch(seed=3)
    auto, auto_g = run_linear(batch, "padded", torch.float32, None, beta=0.2)
    cpu, cpu_g = run_linear(batch, "padded", torch.float32, "cpu", beta=0.2)
    # the cpu backend is deterministic: no backend argument must give the very same numbers
    assert torch.equal(auto.loss, cpu.loss)
    for k in auto_g:
        assert torch.equal(auto_g[k], cpu_g[k])
    monkeypatch.setenv("SPO_KERNELS_BACKEND", "torch")
    assert resolve_backend_name(None, torch.device("cpu")) == "torch"


# ---------------------------------------------------------------------------------------------
# fused-linear path
# ---------------------------------------------------------------------------------------------

# Input shapes the conformance test (tests/test_conformance.py) does not draw: a peaked softmax and a flat
# one; every loss type, option, layout and fp32 / bf16 against the reference is covered there.
VARIANTS = {
    "peaked": dict(batch=dict(peaked=True), opts=dict()),
    "flat": dict(batch=dict(scale=1e-3), opts=dict()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_linear_vs_reference_and_torch(variant, layout, dtype):
    v = VARIANTS[variant]
    batch = make_batch(seed=11, **v["batch"])
    opts = dict(beta=0.5, **v["opts"])
    out, grads = run_linear(batch, layout, dtype, "cpu", **opts)
    ref, ref_grads = run_linear(batch, layout, dtype, "reference", compute_dtype=torch.float64, **opts)
    check_against(out, grads, ref, ref_grads, dtype, f"cpu vs reference [{variant}/{layout}]", opts["beta"])
    tor, tor_grads = run_linear(batch, layout, dtype, "torch", **opts)
    check_torch_agreement(out, grads, tor, tor_grads, ref, ref_grads, dtype, opts["beta"])
    for k, val in out.metrics.items():
        r = ref.metrics[k]
        assert (val != val) == (r != r), k


def test_frozen_head_fast_path(monkeypatch):
    """fp32 frozen head: the forward also computes (onehot - softmax) @ W and the backward only scales
    it (no linear_backward call); a second backward (retain_graph) falls back to recomputing."""
    import spo_kernels.backends.cpu as cpu_mod

    calls = []
    real = cpu_mod._cpu

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def linear_backward(self, *args, **kwargs):
            calls.append(1)
            return real.linear_backward(*args, **kwargs)

    monkeypatch.setattr(cpu_mod, "_cpu", Spy())
    monkeypatch.setenv("SPO_KERNELS_CPU_BLOCK_MB", "0.05")  # several token tiles (tile floor: 128 tokens)
    batch = make_batch(P=3, T=120, seed=8)
    h, _, labels, cu = layout_inputs(batch, "packed", torch.float32)
    w, b = batch["weight"], batch["bias"]
    hh = h.detach().requires_grad_(True)
    out = sk.fused_linear_preference_loss(hh, w, labels, b, cu_seqlens=cu, ref_logps=torch.zeros(6),
                                          softcap=4.0, temperature=0.9, backend="cpu")
    out.loss.backward(retain_graph=True)
    assert calls == []
    fast = hh.grad.clone()
    hh.grad = None
    out.loss.backward()
    assert calls == [1]
    assert_rel(fast, hh.grad, 1e-5, "fast path vs recompute")
    ref, ref_grads = run_linear(batch, "packed", torch.float32, "reference", compute_dtype=torch.float64,
                                frozen=True)
    monkeypatch.setenv("SPO_KERNELS_CPU_FROZEN_FASTPATH", "0")
    slow, slow_grads = run_linear(batch, "packed", torch.float32, "cpu", frozen=True)
    monkeypatch.setenv("SPO_KERNELS_CPU_FROZEN_FASTPATH", "1")
    fast2, fast_grads = run_linear(batch, "packed", torch.float32, "cpu", frozen=True)
    assert len(calls) == 2  # only the run with the fast path switched off called linear_backward
    check_against(fast2, fast_grads, ref, ref_grads, torch.float32, "frozen fast path", 0.1)
    assert_rel(fast_grads["hidden"], slow_grads["hidden"], 1e-5, "fast vs regular path")


def test_fp16_fused_linear():
    batch = make_batch(seed=2)
    out, grads = run_linear(batch, "packed", torch.float16, "cpu", softcap=4.0)
    ref, ref_grads = run_linear(batch, "packed", torch.float16, "reference", compute_dtype=torch.float64,
                                softcap=4.0)
    check_against(out, grads, ref, ref_grads, torch.float16, "fp16", 0.1)


# ---------------------------------------------------------------------------------------------
# logits path
# ---------------------------------------------------------------------------------------------

def run_logits(batch, layout, dtype, backend, inplace, *, compute_dtype=None, **opts):
    """preference_loss on logits = hidden @ W^T + b (rounded to dtype); returns (out, dlogits)."""
    h, rh, labels, cu = layout_inputs(batch, layout, torch.float32)
    w, b = batch["weight"], batch["bias"]
    logits = h @ w.t() + (b if b is not None else 0)
    ref_logits = rh @ batch["ref_weight"].t() + (b if b is not None else 0)
    logits, ref_logits = logits.to(dtype), ref_logits.to(dtype)
    if compute_dtype is not None:
        logits, ref_logits = logits.to(compute_dtype), ref_logits.to(compute_dtype)
    logits = logits.detach().requires_grad_(True)
    out = sk.preference_loss(logits, labels, cu_seqlens=cu, ref_logits=ref_logits, backend=backend,
                             inplace_backward=inplace, **opts)
    out.loss.backward()
    return out, logits.grad


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "alloc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_path_vs_reference_and_torch(variant, layout, dtype, inplace):
    v = VARIANTS[variant]
    batch = make_batch(seed=13, **v["batch"])
    opts = dict(beta=0.3, spo_lambda=0.5, **v["opts"])
    out, g = run_logits(batch, layout, dtype, "cpu", inplace, **opts)
    ref, rg = run_logits(batch, layout, dtype, "reference", False, compute_dtype=torch.float64, **opts)
    loss_tol, grad_tol = TOL[dtype]
    assert g.dtype == dtype
    assert_loss_close(out.loss, ref, loss_tol, opts["beta"], "loss")
    assert_rel(out.policy_logps, ref.policy_logps, loss_tol, "logps")
    assert_rel(out.ref_logps, ref.ref_logps, loss_tol, "ref logps")
    assert_rel(g, rg, grad_tol, "dlogits")
    # the logits path reads the same (dtype) logits in every backend: cpu and torch agree at any dtype
    tor, tg = run_logits(batch, layout, dtype, "torch", inplace, **opts)
    assert_loss_close(out.loss, tor, loss_tol, opts["beta"], "cpu vs torch loss")
    assert_rel(g, tg, grad_tol, "cpu vs torch dlogits")


def test_sequence_logprobs_any_upstream_gradient():
    batch = make_batch(seed=17)
    h, _, labels, cu = layout_inputs(batch, "packed", torch.float32)
    w, b = batch["weight"], batch["bias"]
    coef = torch.randn(len(cu) - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def grads(backend, dtype):
        hh, ww, bb = (x.to(dtype).detach().requires_grad_(True) for x in (h, w, b))
        lp = sk.fused_linear_sequence_logprobs(hh, ww, labels, bb, cu_seqlens=cu, backend=backend,
                                               softcap=2.5, temperature=1.3).logps
        (lp.double() * coef).sum().backward()
        z = (hh @ ww.t() + bb).detach().requires_grad_(True)
        lz = sk.sequence_logprobs(z, labels, cu_seqlens=cu, backend=backend, softcap=2.5, temperature=1.3).logps
        (lz.double() * coef).sum().backward()
        return lp, hh.grad, ww.grad, bb.grad, lz, z.grad

    ours, ref = grads("cpu", torch.float32), grads("reference", torch.float64)
    for i, (a, r) in enumerate(zip(ours, ref)):
        assert_rel(a, r, 1e-5 if i in (0, 4) else 1e-4, f"output {i}")


# ---------------------------------------------------------------------------------------------
# the ops directly: poisoned outputs, strides, tiling, need-flags, determinism
# ---------------------------------------------------------------------------------------------

def _plan(labels, V, cu=None):
    lead = labels.shape
    return build_plan(labels, V, -100, lead, labels.device, cu, pairs=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_logits_backward_poisoned_out_and_strides(dtype):
    g = torch.Generator().manual_seed(1)
    N, V = 37, 97
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    cu = torch.tensor([0, 10, 37], dtype=torch.int32)
    plan = _plan(labels, V, cu)
    wide = (torch.randn(N, 2 * V, generator=g) * 3).to(dtype)
    logits = wide[:, ::2]  # rows not contiguous in the last dim
    cpu, tor = CpuBackend(), TorchChunkedBackend()
    seq, lse, _ = cpu.logits_forward(logits, plan, transform=LogitTransform(softcap=4.0, temperature=0.8),
                                     options=KernelOptions())
    seq_t, lse_t, _ = tor.logits_forward(logits, plan, transform=LogitTransform(softcap=4.0, temperature=0.8),
                                         options=KernelOptions())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert seq.dtype == torch.float64 and lse.dtype == acc  # sums in float64 (SPEC 7)
    assert_rel(seq, seq_t, 1e-6, "seq")
    assert_rel(lse, lse_t, 1e-6, "lse")
    grad_seq = torch.randn(2, generator=g, dtype=acc)
    out = torch.full((N, V), float("nan"), dtype=dtype)
    cpu.logits_backward(logits, plan, transform=LogitTransform(softcap=4.0, temperature=0.8), lse=lse,
                        grad_seq=grad_seq, out=out)
    ref = torch.full((N, V), float("nan"), dtype=dtype)
    tor.logits_backward(logits, plan, transform=LogitTransform(softcap=4.0, temperature=0.8), lse=lse_t,
                        grad_seq=grad_seq, out=ref)
    assert torch.isfinite(out.float()).all()
    assert torch.all(out[::3] == 0)
    assert_rel(out, ref, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, "dlogits")
    # out with a strided last dim too
    out2 = torch.full((N, 2 * V), float("nan"), dtype=dtype)[:, 1::2]
    cpu.logits_backward(logits, plan, transform=LogitTransform(softcap=4.0, temperature=0.8), lse=lse,
                        grad_seq=grad_seq, out=out2)
    assert torch.equal(out2, out)
    # in place on a contiguous buffer: same numbers
    buf = logits.contiguous()
    cpu.logits_backward(buf, plan, transform=LogitTransform(softcap=4.0, temperature=0.8), lse=lse, grad_seq=grad_seq,
                        out=buf)
    assert torch.equal(buf, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_ops_many_tiles_and_blocks(monkeypatch, dtype):
    """> 4096 tokens (several token tiles) and a tiny block budget (many vocabulary blocks), with a
    multiplier, token weights and per-token statistics, against the torch backend in float64 on the same
    (dtype-rounded) inputs; fp32 also through the frozen-head forward (many whole-vocabulary tiles)."""
    g = torch.Generator().manual_seed(4)
    N, H, V = 5000, 12, 300
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:300] = -100
    cu = torch.tensor([0, 2000, 2600, 4100, 5000], dtype=torch.int32)
    plan = build_plan(labels, V, -100, labels.shape, labels.device, cu, pairs=False,
                      token_weights=torch.rand(N, generator=g) + 0.5)
    assert plan.num_tokens > 4096
    monkeypatch.setenv("SPO_KERNELS_CPU_BLOCK_MB", "0.01")  # clamps to 64 KiB: blocks of 64 vocab rows
    cpu, tor = CpuBackend(), TorchChunkedBackend()
    tr, opts = LogitTransform(multiplier=1.4, softcap=2.0, temperature=1.5), KernelOptions(token_stats=True)
    ours_f = cpu.linear_forward(hidden, weight, bias, plan, tr, opts, save_lse=True)
    h64, w64, b64 = hidden.double(), weight.double(), bias.double()
    ref_f = tor.linear_forward(h64, w64, b64, plan, tr, opts, save_lse=True)
    loss_tol, grad_tol = TOL[dtype]
    assert_rel(ours_f.seq_logps, ref_f.seq_logps, loss_tol, "seq")
    assert_rel(ours_f.lse, ref_f.lse, loss_tol, "lse")
    for name in ("entropy", "log_sum_p2", "mean_logit"):
        assert_rel(getattr(ours_f.stats, name), getattr(ref_f.stats, name), loss_tol, name)
    assert torch.equal(ours_f.stats.is_argmax.double(), ref_f.stats.is_argmax)
    gs = torch.randn(4, generator=g)
    ours = cpu.linear_backward(hidden, weight, bias, plan, tr, opts, ours_f.lse, gs, True, True, True)
    ref = tor.linear_backward(h64, w64, b64, plan, tr, opts, ref_f.lse, gs.double(), True, True, True)
    for k in ("hidden", "weight", "bias"):
        assert getattr(ours, k).dtype == dtype
        assert_rel(getattr(ours, k), getattr(ref, k), grad_tol, k)
    assert torch.all(ours.hidden[:300] == 0)
    if dtype == torch.float32:  # the frozen-head forward: dhidden up to g, with the token weights in it
        frozen, dh_unit = cpu.linear_forward_for_backward(hidden, weight, bias, plan, tr, opts)
        assert dh_unit is not None
        assert_rel(frozen.seq_logps, ref_f.seq_logps, loss_tol, "frozen seq")
        assert torch.equal(frozen.stats.is_argmax.double(), ref_f.stats.is_argmax)
        assert_rel(frozen.stats.entropy, ref_f.stats.entropy, loss_tol, "frozen entropy")
        dh = cpu.linear_backward(hidden, weight, bias, plan, tr, opts, frozen.lse, gs, True, False, False,
                                 extra=dh_unit).hidden
        assert_rel(dh, ref.hidden, grad_tol, "frozen dhidden")


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)])
def test_linear_backward_need_flags(need):
    batch = make_batch(seed=9)
    h, _, labels, cu = layout_inputs(batch, "packed", torch.bfloat16)
    w, b = batch["weight"].to(torch.bfloat16), batch["bias"].to(torch.bfloat16)
    plan = _plan(labels, w.shape[0], cu)
    cpu, tor = CpuBackend(), TorchChunkedBackend()
    _, lse, _ = cpu.linear_forward(h, w, b, plan, transform=LogitTransform(), options=KernelOptions(), save_lse=True)
    gs = torch.randn(plan.num_seqs)
    flags = dict(zip(("need_hidden", "need_weight", "need_bias"), need))
    ours = cpu.linear_backward(h, w, b, plan, transform=LogitTransform(),
                               options=KernelOptions(deterministic=True, grad_filter_eps=0.1), lse=lse, grad_seq=gs,
                               **flags)
    ref = tor.linear_backward(h, w, b, plan, transform=LogitTransform(), options=KernelOptions(), lse=lse, grad_seq=gs,
                              **flags)
    for k, flag in zip(("hidden", "weight", "bias"), need):
        a, r = getattr(ours, k), getattr(ref, k)
        if not flag:
            assert a is None
        else:
            assert a.dtype == torch.bfloat16 and a.shape == r.shape
            assert_rel(a, r, 2e-2, k)


def test_linear_empty_plan_and_determinism():
    batch = make_batch(seed=21)
    h, _, labels, cu = layout_inputs(batch, "packed", torch.float32)
    w, b = batch["weight"], batch["bias"]
    cpu = CpuBackend()
    empty = _plan(torch.full_like(labels, -100), w.shape[0], cu)
    seq, lse, _ = cpu.linear_forward(h, w, b, empty, transform=LogitTransform(), options=KernelOptions(), save_lse=True)
    assert torch.equal(seq, torch.zeros(empty.num_seqs)) and lse.numel() == 0
    gr = cpu.linear_backward(h, w, b, empty, transform=LogitTransform(), options=KernelOptions(), lse=lse,
                             grad_seq=torch.ones(empty.num_seqs), need_hidden=True, need_weight=True, need_bias=True)
    assert torch.all(gr.hidden == 0) and torch.all(gr.weight == 0) and torch.all(gr.bias == 0)
    plan = _plan(labels, w.shape[0], cu)
    runs = []
    for _ in range(2):
        s, l, _ = cpu.linear_forward(h, w, b, plan, transform=LogitTransform(), options=KernelOptions(), save_lse=True)
        runs.append((s, cpu.linear_backward(h, w, b, plan, transform=LogitTransform(), options=KernelOptions(), lse=l,
                                            grad_seq=torch.ones(plan.num_seqs), need_hidden=True, need_weight=True,
                                            need_bias=True)))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, c in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, c)


def test_extension_rejects_malformed_plans():
    """The ops index raw memory with the plan: out-of-range rows / targets are errors, not crashes."""
    from spo_kernels import _cpu

    logits = torch.randn(6, 10)
    idx, tgt, off = torch.tensor([0, 2, 5]), torch.tensor([1, 9, 3]), torch.tensor([0, 2, 3])
    xf = (1.0, 0.0, 1.0)  # multiplier, softcap (off), temperature
    seq, _, stats = _cpu.logits_forward(logits, idx, tgt, off, None, *xf, False)
    assert seq.shape == (2,) and stats is None
    with pytest.raises(RuntimeError, match="token_idx"):
        _cpu.logits_forward(logits, torch.tensor([0, 2, 6]), tgt, off, None, *xf, False)
    with pytest.raises(RuntimeError, match="targets"):
        _cpu.logits_forward(logits, idx, torch.tensor([1, 10, 3]), off, None, *xf, False)
    with pytest.raises(RuntimeError, match="seq_offsets"):
        _cpu.logits_forward(logits, idx, tgt, torch.tensor([0, 2, 4]), None, *xf, False)
    with pytest.raises(RuntimeError, match="token_weights"):
        _cpu.logits_forward(logits, idx, tgt, off, torch.ones(2), *xf, False)
    with pytest.raises(RuntimeError, match="temperature"):
        _cpu.logits_forward(logits, idx, tgt, off, None, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="multiplier"):
        _cpu.logits_forward(logits, idx, tgt, off, None, float("nan"), 0.0, 1.0, False)
    w = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="token_idx"):
        _cpu.linear_forward(torch.randn(6, 4), w, None, torch.tensor([0, -1, 5]), tgt, off, None, *xf, False, 1 << 20)
    with pytest.raises(RuntimeError, match="targets"):
        _cpu.linear_forward_frozen(torch.randn(6, 4), w, None, idx, torch.tensor([1, 9, 10]), off, None, *xf, False,
                                   1 << 20)
    # the backward ops go through the same plan checks, and check seq_id and lse as well
    lse, gs, sid = torch.zeros(3), torch.ones(2), torch.tensor([0, 0, 1])
    out = torch.empty_like(logits)
    _cpu.logits_backward(logits, idx, tgt, sid, None, lse, gs, *xf, out)
    with pytest.raises(RuntimeError, match="targets"):
        _cpu.logits_backward(logits, idx, torch.tensor([1, 9, 10]), sid, None, lse, gs, *xf, out)
    with pytest.raises(RuntimeError, match="seq_id"):
        _cpu.logits_backward(logits, idx, tgt, torch.tensor([0, 0, 2]), None, lse, gs, *xf, out)
    with pytest.raises(RuntimeError, match="lse"):
        _cpu.logits_backward(logits, idx, tgt, sid, None, torch.zeros(2), gs, *xf, out)
    with pytest.raises(RuntimeError, match="token_weights"):
        _cpu.logits_backward(logits, idx, tgt, sid, torch.ones(3, dtype=torch.int64), lse, gs, *xf, out)
    h = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="token_idx"):
        _cpu.linear_backward(h, w, None, torch.tensor([0, 2, 6]), tgt, sid, None, lse, gs, *xf, True, True, False,
                             1 << 20, False)
    with pytest.raises(RuntimeError, match="seq_id"):
        _cpu.linear_backward(h, w, None, idx, tgt, torch.tensor([0, -1, 1]), None, lse, gs, *xf, True, True, False,
                             1 << 20, False)
    with pytest.raises(RuntimeError, match="bias"):
        _cpu.linear_forward(h, w, torch.zeros(9), idx, tgt, off, None, *xf, False, 1 << 20)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_variant(isa):
    """The row kernels are compiled once per instruction set; each one this CPU runs gives the same
    results as the torch backend (all dtypes, multiplier / softcap / temperature, token weights, per-token
    statistics over several column chunks, in-place backward)."""
    from spo_kernels import _cpu

    if not _cpu.set_isa(isa):
        pytest.skip(f"this CPU (or build) has no {isa} variant")
    try:
        assert _cpu.isa() == isa
        g = torch.Generator().manual_seed(6)
        N, V = 19, 2 * 2048 + 211  # three column chunks of the row kernels
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::4] = -100
        weights = torch.rand(N, generator=g) + 0.25
        cu = torch.tensor([0, 7, 19], dtype=torch.int32)
        plan = build_plan(labels, V, -100, labels.shape, labels.device, cu, pairs=False, token_weights=weights)
        cpu, tor = CpuBackend(), TorchChunkedBackend()
        opts = KernelOptions(token_stats=True)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for tr in (LogitTransform(), LogitTransform(multiplier=1.3, softcap=3.0, temperature=0.7),
                       LogitTransform(multiplier=0.6, temperature=1.2)):
                logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
                rows = plan.token_idx[::3]
                logits[rows, plan.targets[::3]] = logits[rows].amax(1)  # ties with an earlier maximum or not
                ours = cpu.logits_forward(logits, plan, tr, opts)
                theirs = tor.logits_forward(logits, plan, tr, opts)
                assert_rel(ours.seq_logps, theirs.seq_logps, 1e-6, f"{isa} {dtype} seq")
                for name in ("entropy", "log_sum_p2", "mean_logit"):
                    assert_rel(getattr(ours.stats, name), getattr(theirs.stats, name), 1e-5, f"{isa} {dtype} {name}")
                assert torch.equal(ours.stats.is_argmax, theirs.stats.is_argmax)
                assert 0 < int(ours.stats.is_argmax.sum()) < plan.num_tokens
                gs = torch.randn(2, generator=g, dtype=ours.seq_logps.dtype)
                ref = torch.empty_like(logits)
                tor.logits_backward(logits, plan, tr, theirs.lse, gs, ref)
                cpu.logits_backward(logits, plan, tr, ours.lse, gs, logits)  # in place
                assert_rel(logits, ref, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, f"{isa} {dtype}")
    finally:
        _cpu.set_isa("auto")


# ---------------------------------------------------------------------------------------------
# logit multiplier, token weights, per-token statistics (SPEC 2, 8)
# ---------------------------------------------------------------------------------------------

def _feature_inputs(dtype, seed, V=4099):
    """Odd shapes, 3 packed sequences (one empty), a few boosted vocabulary entries (peaked rows), every third
    target its token's argmax (the transforms are increasing, so the argmax of the raw logits), token
    weights in [0, 1.5] with zeros."""
    g = torch.Generator().manual_seed(seed)
    N, H = 37, 40
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g) * 0.5
    bias[torch.tensor([3, V // 2, V - 2])] += 3.0  # in the first, a middle and the last vocabulary block
    bias = bias.to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    raw = hidden.double() @ weight.double().t() + bias.double()
    labels[::3] = raw.argmax(1)[::3]
    labels[1::5] = -100
    labels[20:26] = -100  # the second sequence has no completion token
    cu = torch.tensor([0, 20, 26, N], dtype=torch.int32)
    weights = torch.rand(N, generator=g) * 1.5
    weights[::7] = 0.0
    return hidden, weight, bias, labels, cu, weights


TRANSFORMS = {"multiplier": dict(logit_multiplier=0.37),
              "all": dict(logit_multiplier=2.5, softcap=10.0, temperature=0.7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("path", ["linear", "logits", "frozen"])
def test_multiplier_weights_stats_vs_reference(monkeypatch, path, transform, dtype):
    """logit multiplier + token weights + per-token statistics through the public functions, against the
    float64 reference on the same (dtype-rounded) inputs: log-probs, the per-sequence sums of every
    statistic, and every gradient (non-uniform upstream gradient)."""
    if path == "frozen" and dtype == torch.bfloat16:
        pytest.skip("the frozen-head forward is for fp32/fp64 heads")
    monkeypatch.setenv("SPO_KERNELS_CPU_BLOCK_MB", "0.01")  # several vocabulary blocks on the linear path
    h, w, b, labels, cu, tw = _feature_inputs(dtype, seed=31)
    coef = torch.randn(len(cu) - 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = dict(TRANSFORMS[transform], cu_seqlens=cu, token_weights=tw, token_stats=True)

    def run(backend, cast):
        hh = h.to(cast).detach().requires_grad_(True)
        ww = w.to(cast).detach().requires_grad_(path == "linear")
        bb = b.to(cast).detach().requires_grad_(path == "linear")
        if path == "logits":
            x = (h.double() @ w.double().t() + b.double()).to(dtype).to(cast).requires_grad_(True)
            out = sk.sequence_logprobs(x, labels, backend=backend, **opts)
            leaves = {"logits": x}
        else:
            out = sk.fused_linear_sequence_logprobs(hh, ww, labels, bb, backend=backend, **opts)
            leaves = {"hidden": hh, "weight": ww, "bias": bb} if path == "linear" else {"hidden": hh}
        (out.logps.double() * coef).sum().backward()
        return out, {k: v.grad for k, v in leaves.items()}

    ours, grads = run("cpu", dtype)
    ref, ref_grads = run("reference", torch.float64)
    loss_tol, grad_tol = TOL[dtype]
    assert_rel(ours.logps, ref.logps, loss_tol, "logps")
    assert ours.stats is not None
    for name in ref.stats._fields:
        assert_rel(getattr(ours.stats, name), getattr(ref.stats, name), loss_tol, f"stats.{name}")
    assert float(ref.stats.argmax_hits.sum()) >= 5  # the argmax statistic is exercised both ways
    for k, g in grads.items():
        assert g is not None and g.dtype == dtype, k
        assert_rel(g, ref_grads[k], grad_tol, f"d{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("path", ["linear", "logits"])
def test_token_stats_per_token_vs_reference(monkeypatch, path, dtype):
    """The ops' per-token statistics against SPEC 8's definitions on the float64 transformed logits, token by
    token (is_argmax exactly, the first maximum winning ties); the forward's log-probs and LSEs are the same
    with and without statistics; without them the result has none."""
    from spo_kernels import reference as ref_impl

    monkeypatch.setenv("SPO_KERNELS_CPU_BLOCK_MB", "0.01")
    h, w, b, labels, cu, tw = _feature_inputs(dtype, seed=41, V=2 * 2048 + 517)
    plan = build_plan(labels, w.shape[0], -100, labels.shape, labels.device, cu, pairs=False, token_weights=tw)
    # no softcap on the logits path, which keeps its -inf entries -inf (softcap maps them to -cap)
    transform = LogitTransform(multiplier=1.7, softcap=None if path == "logits" else 6.0, temperature=0.9)
    logits = (h.double() @ w.double().t() + b.double()).to(dtype)
    if path == "logits":
        logits[plan.token_idx[0], 100:3000] = float("-inf")  # masked entries: p = 0, no 0 * inf
        logits[plan.token_idx[1]] = 0.0  # all tied: the first column is the argmax
        z_raw = logits
    else:
        z_raw = h.double() @ w.double().t() + b.double()

    def fwd(stats):
        opts = KernelOptions(token_stats=stats)
        if path == "logits":
            return CpuBackend().logits_forward(logits, plan, transform, opts)
        return CpuBackend().linear_forward(h, w, b, plan, transform, opts, save_lse=True)

    on, off = fwd(True), fwd(False)
    assert off.stats is None
    torch.testing.assert_close(on.seq_logps, off.seq_logps, rtol=1e-6, atol=0)
    torch.testing.assert_close(on.lse, off.lse, rtol=1e-6, atol=0)
    z = ref_impl.transform_logits(z_raw.double().index_select(0, plan.token_idx), transform.softcap,
                                  transform.temperature, transform.multiplier)
    entropy, log_sum_p2, mean_logit, is_argmax = ref_impl.reference_token_stats(z, plan.targets)
    tol = 1e-5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, r in (("entropy", entropy), ("log_sum_p2", log_sum_p2), ("mean_logit", mean_logit)):
        x = getattr(on.stats, name)
        assert x.dtype == acc and x.shape == (plan.num_tokens,)
        if path == "logits":  # the masked row's mean is -inf in both
            assert torch.equal(torch.isinf(x), torch.isinf(r))
            x, r = x[1:], r[1:]
        assert_rel(x, r, tol, name)
    assert torch.equal(on.stats.is_argmax.double(), is_argmax)
    assert 5 <= int(is_argmax.sum()) < plan.num_tokens


@pytest.mark.parametrize("path", ["linear", "logits"])
def test_token_weights_scale_log_probs_and_gradients(path):
    """Weights of 1 give the unweighted numbers bitwise; weights of 0 leave a token out of both the sum and
    the gradient (its dlogits row is exactly 0)."""
    h, w, b, labels, cu, _ = _feature_inputs(torch.float32, seed=5, V=97)
    plan = build_plan(labels, w.shape[0], -100, labels.shape, labels.device, cu, pairs=False)
    ones = build_plan(labels, w.shape[0], -100, labels.shape, labels.device, cu, pairs=False,
                      token_weights=torch.ones(labels.shape))
    mask = torch.ones(labels.shape)
    mask[plan.token_idx[::2]] = 0.0
    half = build_plan(labels, w.shape[0], -100, labels.shape, labels.device, cu, pairs=False, token_weights=mask)
    cpu, tr, opts = CpuBackend(), LogitTransform(multiplier=0.5), KernelOptions()
    gs = torch.tensor([0.7, -1.1, 1.3])
    logits = h @ w.t() + b
    if path == "logits":
        res = [cpu.logits_forward(logits, p, tr, opts) for p in (plan, ones, half)]
        grads = []
        for p, r in zip((plan, ones, half), res):
            out = torch.empty_like(logits)
            cpu.logits_backward(logits, p, tr, r.lse, gs, out)
            grads.append(out)
        zero_rows = plan.token_idx[::2]
        assert torch.all(grads[2][zero_rows] == 0) and not torch.all(grads[2] == 0)
    else:
        res = [cpu.linear_forward(h, w, b, p, tr, opts, save_lse=True) for p in (plan, ones, half)]
        grads = [cpu.linear_backward(h, w, b, p, tr, opts, r.lse, gs, True, True, True).hidden
                 for p, r in zip((plan, ones, half), res)]
        assert torch.all(grads[2][plan.token_idx[::2]] == 0)
    assert torch.equal(res[0].seq_logps, res[1].seq_logps) and torch.equal(grads[0], grads[1])
    # the half-weighted sums are the unweighted per-token log-probs of the kept tokens
    logp = (logits.index_select(0, plan.token_idx).double() * 0.5).log_softmax(-1)
    logp = logp.gather(1, plan.targets[:, None])[:, 0] * mask[plan.token_idx].double()
    expect = torch.zeros(plan.num_seqs, dtype=torch.float64).index_add_(0, plan.seq_id, logp)
    assert_rel(res[2].seq_logps, expect, 1e-6, "weighted sums")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_preference_loss_ld_alpha_and_multiplier(layout, dtype):
    """The whole loss with LD-DPO's length weights (token weights from ld_alpha) and a logit multiplier,
    policy and reference heads through the cpu backend, against the float64 reference."""
    batch = make_batch(seed=19, T=29)
    opts = dict(beta=0.4, ld_alpha=0.3, logit_multiplier=0.7, softcap=5.0)
    out, grads = run_linear(batch, layout, dtype, "cpu", **opts)
    ref, ref_grads = run_linear(batch, layout, dtype, "reference", compute_dtype=torch.float64, **opts)
    check_against(out, grads, ref, ref_grads, dtype, f"ld_alpha + multiplier [{layout}]", opts["beta"])
    assert_rel(out.ref_logps, ref.ref_logps, TOL[dtype][0], "ref logps")
    plain, _ = run_linear(batch, layout, dtype, "cpu", beta=0.4, logit_multiplier=0.7, softcap=5.0)
    assert not torch.allclose(plain.policy_logps, out.policy_logps)  # the weights changed the sums
