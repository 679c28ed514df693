"""The Triton fused-linear path compiled on a real GPU, at real shapes (skipped without CUDA).

- G1: Llama-3-8B head (H = 4096, V = 128256), P = 8 pairs, T = 2048, about half of each sequence
  completion, bf16, DPO sigmoid with the reference model's hidden states, through the public function;
  against an fp32 computation chunked over the completion tokens (closed-form gradient);
- N * V > 2^31 (the dz scratch then holds more than 2^31 elements: 64-bit offsets there);
- hidden rows and head rows past 2^31 elements (64-bit offsets into [N, H] and [V, H]);
- more than 65535 token blocks' worth of plan tokens and many sequences (grid axis 0 only);
- compiled specializations the interpreter cannot check: fp32 (ieee dots) and fp16, softcap +
  temperature + bias, frozen head, streaming orders, bitwise determinism, the gradient filter.
NaN never passes: every compared tensor must be finite.

The helpers take any device, so that the test logic itself can be dry-run on CPU in the interpreter at
tiny shapes (``_dry_run`` at the bottom, not collected).
"""

from __future__ import annotations

import pytest
import torch

import spo_kernels as sk
from spo_kernels.config import PreferenceLossConfig
from spo_kernels.kernels import linear_logprobs as LL
from spo_kernels.layout import build_plan
from spo_kernels.reference import reference_pair_loss
from spo_kernels.kernels.types import KernelOptions, LogitTransform
from batches import need_gpu_memory as _need_memory, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
IGNORE = -100




@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {})
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# chunked fp32 oracle over the plan (closed form; never holds more than `chunk` rows of logits)
# ---------------------------------------------------------------------------------------------------

def _transform(z, softcap, temperature):
    """SPEC 2 on raw logits; returns (z, dz/dz_raw or None)."""
    chain = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
        chain = 1 - t * t
    if temperature != 1.0:
        z = z / temperature
        chain = (chain if chain is not None else torch.ones_like(z)) / temperature
    return z, chain


def _logits(h, weight, bias, dtype):
    z = h.to(dtype) @ weight.to(dtype).t()
    return z + bias.to(dtype) if bias is not None else z


def oracle_forward(hidden2d, weight, bias, plan, softcap=None, temperature=1.0, chunk=1024, dtype=torch.float32):
    """``(seq_logps [S], lse [Nc])`` in ``dtype`` from the inputs (already rounded to their dtype)."""
    dev = hidden2d.device
    lse = torch.empty(plan.num_tokens, dtype=dtype, device=dev)
    logp = torch.empty_like(lse)
    w = weight.to(dtype)
    for a in range(0, plan.num_tokens, chunk):
        b = min(a + chunk, plan.num_tokens)
        z, _ = _transform(_logits(hidden2d[plan.token_idx[a:b]], w, bias, dtype), softcap, temperature)
        lse[a:b] = torch.logsumexp(z, 1)
        logp[a:b] = z.gather(1, plan.targets[a:b, None]).squeeze(1) - lse[a:b]
        del z
    seq = torch.zeros(plan.num_seqs, dtype=dtype, device=dev).index_add_(0, plan.seq_id, logp)
    return seq, lse


def oracle_backward(hidden2d, weight, bias, plan, lse, grad_seq, softcap=None, temperature=1.0, chunk=1024,
                    dtype=torch.float32, need_weight=True):
    """Closed-form ``(dhidden on plan rows [Nc, H], dW [V, H] or None, db [V] or None)`` in ``dtype``."""
    dev = hidden2d.device
    w = weight.to(dtype)
    g_tok = grad_seq.to(dtype)[plan.seq_id]
    dh = torch.empty(plan.num_tokens, hidden2d.shape[1], dtype=dtype, device=dev)
    dw = torch.zeros(w.shape, dtype=dtype, device=dev) if need_weight else None
    db = torch.zeros(w.shape[0], dtype=dtype, device=dev) if (bias is not None and need_weight) else None
    for a in range(0, plan.num_tokens, chunk):
        b = min(a + chunk, plan.num_tokens)
        h = hidden2d[plan.token_idx[a:b]].to(dtype)
        z, chain = _transform(_logits(h, w, bias, dtype), softcap, temperature)
        d = torch.exp(z - lse[a:b, None].to(dtype)).mul_(-g_tok[a:b, None])
        d[torch.arange(b - a, device=dev), plan.targets[a:b]] += g_tok[a:b]
        if chain is not None:
            d.mul_(chain)
        dh[a:b] = d @ w
        if dw is not None:
            dw.addmm_(d.t(), h)
        if db is not None:
            db += d.sum(0)
        del z, d, chain
    return dh, dw, db


def check_dhidden(dh_full, dh_plan_ref, plan, tol):
    """Plan rows against the oracle; every other row exactly zero."""
    assert rel_err(dh_full[plan.token_idx], dh_plan_ref) <= tol
    outside = torch.ones(dh_full.shape[0], dtype=torch.bool, device=dh_full.device)
    outside[plan.token_idx] = False
    assert bool((dh_full[outside] == 0).all()), "dhidden is not exactly zero outside the plan"


def make_labels(S, T, V, prompt_frac=0.5, seed=0, device="cuda"):
    """Ragged prompts around ``prompt_frac * T`` (ignored), completions, and a short padded tail."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (S, T), generator=g)
    for s in range(S):
        prompt = int(T * prompt_frac) + int(torch.randint(-T // 16, T // 16 + 1, (1,), generator=g))
        tail = int(torch.randint(0, T // 32 + 1, (1,), generator=g))
        labels[s, :prompt] = IGNORE
        if tail:
            labels[s, T - tail:] = IGNORE
    return labels.to(device)


def logprobs_case(hidden2d, weight, bias, plan, grad_seq, *, softcap=None, temperature=1.0, need_weight=True,
                  lp_tol=1e-5, g_tol=1e-4, chunk=1024, **bwd):
    """Forward + backward of the op pair against the oracle; returns the Triton grads."""
    seq, lse, _ = LL.linear_forward(hidden2d, weight, bias, plan,
                                    transform=LogitTransform(softcap=softcap, temperature=temperature),
                                    options=KernelOptions(), save_lse=True)
    # float64 oracle: the kernel's sums are float64, and an fp32 oracle's own rounding (which depends on the
    # BLAS's accumulation order, hence on the machine) is as large as the 1e-5 tolerance.
    ref_seq, ref_lse = oracle_forward(hidden2d, weight, bias, plan, softcap, temperature, chunk, dtype=torch.float64)
    assert seq.dtype == torch.float64 and lse.dtype == torch.float32  # sums in float64 (SPEC 7)
    assert rel_err(seq, ref_seq) <= lp_tol, f"seq logps: {rel_err(seq, ref_seq):.3e}"
    assert rel_err(lse, ref_lse) <= lp_tol
    grads = LL.linear_backward(hidden2d, weight, bias, plan,
                               transform=LogitTransform(softcap=softcap, temperature=temperature),
                               options=KernelOptions(**bwd), lse=lse, grad_seq=grad_seq, need_hidden=True,
                               need_weight=need_weight,
                               need_bias=bias is not None and need_weight)
    dh_ref, dw_ref, db_ref = oracle_backward(hidden2d, weight, bias, plan, ref_lse, grad_seq, softcap, temperature,
                                             chunk, need_weight=need_weight)
    check_dhidden(grads.hidden, dh_ref, plan, g_tol)
    if need_weight:
        assert grads.weight.dtype == weight.dtype
        assert rel_err(grads.weight, dw_ref) <= g_tol, f"dW: {rel_err(grads.weight, dw_ref):.3e}"
        if bias is not None:
            assert rel_err(grads.bias, db_ref) <= g_tol
    else:
        assert grads.weight is None and grads.bias is None
    return grads


# ---------------------------------------------------------------------------------------------------
# G1 through the public function
# ---------------------------------------------------------------------------------------------------

def test_g1_dpo_bf16():
    """H=4096, V=128256, P=8, T=2048, half completion, bf16, DPO sigmoid with reference hidden states."""
    _need_memory(40)
    dpo_case(P=8, T=2048, H=4096, V=128256)


def dpo_case(P, T, H, V, dtype=torch.bfloat16):
    S = 2 * P
    g = torch.Generator(device=DEV).manual_seed(0)
    hidden = torch.randn(S, T, H, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=DEV, generator=g) / H ** 0.5).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(S, T, H, device=DEV, generator=g)).to(dtype)
    labels = make_labels(S, T, V, device=DEV)
    cfg = PreferenceLossConfig(loss_type="sigmoid", beta=0.1)

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    on_gpu = hidden.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = sk.fused_linear_preference_loss(h, w, labels, ref_hidden=ref_hidden, config=cfg, backend="triton")
    out.loss.backward()
    if on_gpu:
        # Issue 4's goal: peak extra <= 1.05x the lower bound dhidden + dW (+ O(N)). The backward's own
        # allocations are plan_backward's (tested on CPU to match the code); 32 MiB for the O(N) vectors.
        peak = torch.cuda.max_memory_allocated() - base
        lower_bound = h.numel() * 2 + w.numel() * 2
        print(f"G1 peak extra {peak / 2**20:.0f} MiB = {peak / lower_bound:.3f}x the lower bound "
              f"{lower_bound / 2**20:.0f} MiB")
        assert peak <= 1.05 * lower_bound + 32 * 2**20, f"peak extra {peak / 2**20:.0f} MiB"

    # Oracle: fp32 chunked log-probs, the float64 loss and its g_s by autograd, the closed-form grads.
    plan = build_plan(labels, V, IGNORE, labels.shape, hidden.device)
    h2, r2 = hidden.reshape(-1, H), ref_hidden.reshape(-1, H)
    pol, lse = oracle_forward(h2, weight, None, plan)
    ref, _ = oracle_forward(r2, weight, None, plan)
    L = pol.double().requires_grad_(True)
    loss = reference_pair_loss(L, plan.counts, ref.double(), cfg)
    (grad_seq,) = torch.autograd.grad(loss, L)
    assert rel_err(out.policy_logps, pol) <= 1e-4
    assert rel_err(out.ref_logps, ref) <= 1e-4
    assert abs(float(out.loss.detach()) - float(loss.detach())) <= 1e-3 * abs(float(loss.detach()))
    dh_ref, dw_ref, _ = oracle_backward(h2, weight, None, plan, lse, grad_seq.float())
    check_dhidden(h.grad.reshape(-1, H), dh_ref, plan, 2e-2)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(w.grad, dw_ref) <= 2e-2, f"dW: {rel_err(w.grad, dw_ref):.3e}"


# ---------------------------------------------------------------------------------------------------
# 64-bit offsets and grid limits
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("one_block", [True, False], ids=["dz-scratch-over-2^31", "streamed"])
def test_nv_over_2_31(monkeypatch, one_block):
    """Nc * V = 17000 * 128256 > 2^31. With a scratch big enough for the whole plane, the dz buffer itself
    has more than 2^31 elements."""
    _need_memory(40)
    Nc, H, V = 17000, 64, 128256
    assert Nc * V > 2**31
    if one_block:
        monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"scratch_bytes": Nc * V * 2 + 2**20})
    g = torch.Generator(device=DEV).manual_seed(1)
    hidden = torch.randn(Nc + 100, H, device=DEV, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device=DEV, generator=g) / H ** 0.25).to(torch.bfloat16)
    bias = (0.5 * torch.randn(V, device=DEV, generator=g)).to(torch.bfloat16)
    labels = torch.full((Nc + 100,), IGNORE, device=DEV, dtype=torch.int64)
    labels[100:] = torch.randint(0, V, (Nc,), device=DEV, generator=g)
    labels[-5:] = V - 1  # targets in the last (partial) vocabulary tile
    cu = torch.tensor([0, 40, 6000, 12000, Nc + 100], dtype=torch.int32, device=DEV)
    plan = build_plan(labels, V, IGNORE, labels.shape, hidden.device, cu, pairs=False)
    grad_seq = torch.tensor([0.5, -1.0, 0.25, 2.0], device=DEV)
    logprobs_case(hidden, weight, bias, plan, grad_seq, lp_tol=1e-5, g_tol=2e-2)


def test_hidden_and_head_rows_past_2_31():
    """hidden [540000, 4096] and W [530000, 4096] have more than 2^31 elements; plan tokens sit on the last
    hidden rows and targets on the last head rows."""
    _need_memory(40)
    H = 4096
    N, V = 540000, 530000
    assert N * H > 2**31 and V * H > 2**31
    g = torch.Generator(device=DEV).manual_seed(2)
    hidden = torch.empty(N, H, device=DEV, dtype=torch.bfloat16).normal_(generator=g)
    weight = torch.empty(V, H, device=DEV, dtype=torch.bfloat16).normal_(std=H ** -0.5, generator=g)
    labels = torch.full((N,), IGNORE, device=DEV, dtype=torch.int64)
    labels[:16] = torch.randint(0, V, (16,), device=DEV, generator=g)
    labels[N - 48:] = torch.randint(V - 200, V, (48,), device=DEV, generator=g)
    cu = torch.tensor([0, N // 2, N], dtype=torch.int32, device=DEV)
    plan = build_plan(labels, V, IGNORE, labels.shape, hidden.device, cu, pairs=False)
    grad_seq = torch.tensor([1.0, -0.5], device=DEV)
    logprobs_case(hidden, weight, None, plan, grad_seq, lp_tol=1e-5, g_tol=2e-2, chunk=64)


def test_million_tokens_many_sequences():
    """2^20 plan tokens (8192 token blocks) in 4096 sequences, small H and V: grids stay on axis 0."""
    _need_memory(16)
    N, H, V, S = 2**20, 32, 80, 4096
    g = torch.Generator(device=DEV).manual_seed(3)
    hidden = torch.randn(N, H, device=DEV, generator=g).to(torch.bfloat16)
    weight = torch.randn(V, H, device=DEV, generator=g).to(torch.bfloat16) / 4
    labels = torch.randint(0, V, (N,), device=DEV, generator=g)
    cu = torch.linspace(0, N, S + 1, device=DEV).round().to(torch.int32)
    plan = build_plan(labels, V, IGNORE, labels.shape, hidden.device, cu, pairs=False)
    grad_seq = torch.randn(S, device=DEV, generator=g)
    logprobs_case(hidden, weight, None, plan, grad_seq, lp_tol=1e-5, g_tol=2e-2, chunk=2**16)


# ---------------------------------------------------------------------------------------------------
# compiled specializations
# ---------------------------------------------------------------------------------------------------

def _mid_case(dtype, seed=4, Nt=3000, H=1024, V=32000, bias=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(Nt, H, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=DEV, generator=g) / H ** 0.5).to(dtype)
    b = (0.5 * torch.randn(V, device=DEV, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, V, (Nt,), device=DEV, generator=g)
    labels[::3] = IGNORE
    cu = torch.tensor([0, Nt * 7 // 30, Nt // 2, Nt * 22 // 30, Nt], dtype=torch.int32, device=DEV)
    plan = build_plan(labels, V, IGNORE, labels.shape, hidden.device, cu, pairs=False)
    grad_seq = torch.tensor([0.7, -0.3, 1.5, -2.0], device=DEV)
    return hidden, weight, b, plan, grad_seq


@pytest.mark.parametrize("dtype,tol", [(torch.float32, (1e-5, 1e-4)), (torch.float16, (1e-5, 2e-2)),
                                       (torch.bfloat16, (1e-5, 2e-2))])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (30.0, 0.7)])
def test_dtypes_and_transforms(dtype, tol, softcap, temperature):
    _need_memory(8)
    hidden, weight, bias, plan, grad_seq = _mid_case(dtype)
    logprobs_case(hidden, weight, bias, plan, grad_seq, softcap=softcap, temperature=temperature,
                  lp_tol=tol[0], g_tol=tol[1])


@pytest.mark.parametrize("outer", ["vocab", "token"])
def test_streaming_orders(monkeypatch, outer):
    """Several steps of each order (8 MiB of scratch): fp32 accumulators, exact results."""
    _need_memory(8)
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"outer": outer, "scratch_bytes": 8 * 2**20})
    hidden, weight, bias, plan, grad_seq = _mid_case(torch.bfloat16)
    logprobs_case(hidden, weight, bias, plan, grad_seq, g_tol=2e-2)


def test_frozen_head():
    _need_memory(8)
    hidden, weight, bias, plan, grad_seq = _mid_case(torch.bfloat16)
    logprobs_case(hidden, weight, bias, plan, grad_seq, need_weight=False, g_tol=2e-2)


def test_deterministic_and_filter():
    """Bitwise-identical gradients across runs (with and without deterministic=True); the filter is
    exact when off and close when on."""
    _need_memory(8)
    hidden, weight, bias, plan, grad_seq = _mid_case(torch.bfloat16)
    _, lse, _ = LL.linear_forward(hidden, weight, bias, plan, transform=LogitTransform(), options=KernelOptions(),
                                  save_lse=True)

    def bwd(**kw):
        return LL.linear_backward(hidden, weight, bias, plan, transform=LogitTransform(), options=KernelOptions(**kw),
                                  lse=lse,
                                  grad_seq=grad_seq, need_hidden=True, need_weight=True, need_bias=True)

    first = bwd(deterministic=True)
    for kw in (dict(deterministic=True), dict()):
        again = bwd(**kw)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    filtered = bwd(grad_filter_eps=1e-6)
    for a, b in zip(filtered, first):
        assert rel_err(a, b) <= 2e-2


def _dry_run():
    """Run this file's checks on CPU in the interpreter at tiny shapes (not collected by pytest):
    ``TRITON_INTERPRET=1 python -c "import tests.test_gpu_linear as t; t._dry_run()"``."""
    global DEV
    DEV = "cpu"
    LL.CONFIG_OVERRIDES = {"scratch_bytes": 4096}
    hidden, weight, bias, plan, grad_seq = _mid_case(torch.float32, Nt=90, H=48, V=101)
    logprobs_case(hidden, weight, bias, plan, grad_seq, softcap=30.0, temperature=0.7)
    logprobs_case(hidden, weight, bias, plan, grad_seq, need_weight=False)
    hidden, weight, bias, plan, grad_seq = _mid_case(torch.bfloat16, Nt=90, H=48, V=101)
    logprobs_case(hidden, weight, bias, plan, grad_seq, g_tol=2e-2)
    labels = make_labels(4, 64, 101, device="cpu")
    plan = build_plan(labels, 101, IGNORE, labels.shape, hidden.device)
    logprobs_case(hidden[:1].expand(256, 48).contiguous(), weight, None, plan, grad_seq, g_tol=2e-2)
    dpo_case(P=2, T=32, H=48, V=101)
    LL.CONFIG_OVERRIDES = {}
    print("dry run ok")
