"""The Triton logits path (spo_kernels/kernels/logits_logprobs.py), run by the interpreter on CPU.

Forward (per-sequence log-probs) and backward (dlogits, in place and not) with ``backend="triton"`` against
the float64 reference (``backend="reference"`` on float64 copies of the
same inputs, autograd), on fresh random inputs with odd sizes (V = 97, T = 9): both layouts, softcap
and temperature, fp32/bf16/fp16, empty completions (an all-ignored sequence and, packed, a sequence with
no rows), peaked rows (+30 on the target, on another token, on the last vocab lane), flat rows, rows far
below 0 (a stray 0 from a lane past V would dominate them), V not a multiple of the vocab tile, and
upstream gradients that differ per sequence. Every float buffer the launchers allocate starts as NaN,
and direct backward calls get an ``out`` full of NaN or 1e30, so an entry the kernels skip fails. The
preference losses on this path (every loss type and option) are in tests/test_conformance.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import spo_kernels as sk  # noqa: E402
from spo_kernels.kernels import logits_logprobs as kmod  # noqa: E402
from spo_kernels.kernels import triton_helpers  # noqa: E402
from spo_kernels.layout import build_plan  # noqa: E402
from spo_kernels.kernels.types import KernelOptions, LogitTransform  # noqa: E402

IGNORE = -100
TOL = {  # SPEC 7: (loss / log-prob rel, gradient rel in norm)
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-3, 2e-2),
    torch.float16: (1e-3, 2e-2),
}
# Log-probs are computed in fp32 from the exact low-precision inputs, so they meet fp32's bound for
# every input dtype (the loss bound above is the SPEC's, looser for bf16/fp16).
LOGP_RTOL = 1e-5


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN."""
    monkeypatch.setattr(triton_helpers, "POISON_EMPTY", True)


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------

def make_batch(S=6, T=9, V=97, dtype=torch.float32, layout="padded", seed=0, scale=3.0):
    """Random logits and labels; returns ``(logits, labels, cu_seqlens or None)``.

    Padded ``[S, T, V]`` / ``[S, T]``; packed ``[N, V]`` / ``[N]`` with ``cu_seqlens [S+1]`` int32.
    Each sequence: a prompt (ignored), completion tokens, sometimes tail padding (ignored). Sequence 1
    has no completion token; packed, sequence S-2 has no rows at all. Special rows: the target logit
    30 above the rest, another logit 30 above the rest, the last vocab lane (V-1) 30 above the rest,
    all logits equal, and all logits near -60.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (S, T), generator=g)
    for s in range(S):
        prompt = int(torch.randint(1, T // 2, (1,), generator=g))
        pad = int(torch.randint(0, 3, (1,), generator=g))
        labels[s, :prompt] = IGNORE
        if pad:
            labels[s, T - pad:] = IGNORE
    labels[1] = IGNORE
    # special rows, spread over the completion tokens of sequences that keep them in both layouts
    cands = [(s, int(t)) for s in range(S) if s not in (1, S - 2) for t in (labels[s] != IGNORE).nonzero()]
    kinds = ["peak_target", "peak_other", "peak_last_lane", "flat", "far_below"]
    step = max(1, len(cands) // len(kinds))
    for kind, (s, t) in zip(kinds, cands[::step]):
        y = int(labels[s, t])
        if kind == "peak_target":
            x[s, t, y] += 30.0
        elif kind == "peak_other":
            x[s, t, (y + 1) % V] += 30.0
        elif kind == "peak_last_lane":
            x[s, t, V - 1] += 30.0
        elif kind == "flat":
            x[s, t] = 0.5
        else:
            x[s, t] = -60.0 + 0.1 * x[s, t]
    x = x.to(dtype)
    if layout == "padded":
        return x, labels, None
    lengths = []
    for s in range(S):
        keep = (labels[s] != IGNORE).nonzero()
        lengths.append(int(keep[-1]) + 1 if len(keep) else 3)
    lengths[S - 2] = 0  # a sequence with no rows at all
    rows = [x[s, :n] for s, n in enumerate(lengths)]
    lab = [labels[s, :n] for s, n in enumerate(lengths)]
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat(rows), torch.cat(lab), cu


def seq_weights(S, seed=0):
    """Non-uniform upstream gradient dloss/dL_s."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(S, generator=g, dtype=torch.float64)


def reference_logps_and_grad(logits, labels, cu, softcap, temperature, w):
    """float64 autograd on a float64 copy of the same inputs: ``(L [S], d(sum w L)/dlogits)``."""
    x64 = logits.detach().double().requires_grad_(True)
    out = sk.sequence_logprobs(x64, labels, cu_seqlens=cu, softcap=softcap, temperature=temperature,
                               backend="reference")
    (out.logps * w).sum().backward()
    return out.logps.detach(), x64.grad


def rel_norm(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_logps(actual, expected, rtol=LOGP_RTOL):
    assert torch.isfinite(actual).all(), actual
    err = (actual.double() - expected.double()).abs()
    bound = rtol * expected.double().abs() + 1e-9
    assert bool((err <= bound).all()), (actual, expected)




# ---------------------------------------------------------------------------------------------------
# sequence_logprobs: forward and backward through autograd
# ---------------------------------------------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (dtype, layout, softcap, temperature, vocab tile cap, in-place backward)
CASES = [
    (F32, "padded", None, 1.0, 4096, True),
    (F32, "packed", None, 1.0, 32, False),
    (F32, "padded", 5.0, 1.0, 32, True),
    (F32, "packed", 5.0, 1.0, 4096, True),
    (F32, "padded", None, 0.7, 4096, False),
    (F32, "packed", None, 0.7, 16, True),
    (F32, "padded", 5.0, 0.7, 16, False),
    (F32, "packed", 30.0, 1.3, 4096, False),
    (BF16, "padded", None, 1.0, 32, True),
    (BF16, "packed", 5.0, 0.7, 4096, False),
    (F16, "padded", 5.0, 0.7, 4096, True),
    (F16, "packed", None, 1.0, 32, False),
]


def _case_id(case):
    dtype, layout, cap, tau, block, inplace = case
    return f"{str(dtype)[6:]}-{layout}-cap{cap}-tau{tau}-blk{block}-{'inplace' if inplace else 'alloc'}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sequence_logprobs_forward_backward(monkeypatch, case):
    dtype, layout, softcap, temperature, max_block_v, inplace = case
    monkeypatch.setattr(kmod, "MAX_BLOCK_V", max_block_v)  # 97 = 3*32 + 1 = 6*16 + 1: last tile has 1 lane
    seed = CASES.index(case)
    logits, labels, cu = make_batch(dtype=dtype, layout=layout, seed=seed)
    S = 6
    w = seq_weights(S, seed)
    ref_logps, ref_grad = reference_logps_and_grad(logits, labels, cu, softcap, temperature, w)

    x = logits.clone().requires_grad_(True)
    buf = x * 1  # a non-leaf buffer: the in-place backward never overwrites a leaf (SPEC 6)
    out = sk.sequence_logprobs(buf, labels, cu_seqlens=cu, softcap=softcap, temperature=temperature,
                               backend="triton", inplace_backward=inplace)
    assert out.logps.dtype == torch.float32 and out.logps.shape == (S,)
    assert_logps(out.logps, ref_logps)
    assert float(out.logps[1].detach()) == 0.0  # no completion token
    (out.logps * w.float()).sum().backward()
    _, grad_rtol = TOL[dtype]
    assert x.grad.dtype == dtype
    assert rel_norm(x.grad, ref_grad) <= grad_rtol
    # rows outside the plan are exactly zero (in place: the buffer held logits there)
    ignored = (labels == IGNORE)
    assert bool((x.grad[ignored] == 0).all())
    if inplace:  # the buffer now holds the gradient
        assert torch.equal(buf.detach(), x.grad), "in-place backward must write into the logits buffer"
    else:
        assert torch.equal(buf.detach(), logits)


@pytest.mark.parametrize("max_block_v", [32, 4096])
def test_vocab_a_multiple_of_the_tile(monkeypatch, max_block_v):
    # V = 128: four full tiles of 32, or one full tile of 128; no partial tile at all.
    monkeypatch.setattr(kmod, "MAX_BLOCK_V", max_block_v)
    logits, labels, cu = make_batch(V=128, layout="packed", seed=50)
    w = seq_weights(6, 50)
    ref_logps, ref_grad = reference_logps_and_grad(logits, labels, cu, 5.0, 1.0, w)
    x = logits.clone().requires_grad_(True)
    out = sk.sequence_logprobs(x, labels, cu_seqlens=cu, softcap=5.0, backend="triton")
    assert_logps(out.logps, ref_logps)
    (out.logps * w.float()).sum().backward()
    assert rel_norm(x.grad, ref_grad) <= 1e-4


def test_float64_logits_compute_in_float64():
    logits, labels, cu = make_batch(dtype=torch.float64, layout="packed", seed=40)
    w = seq_weights(6, 40)
    ref_logps, ref_grad = reference_logps_and_grad(logits, labels, cu, 5.0, 0.7, w)
    x = logits.clone().requires_grad_(True)
    out = sk.sequence_logprobs(x, labels, cu_seqlens=cu, softcap=5.0, temperature=0.7, backend="triton")
    assert out.logps.dtype == torch.float64
    # softcap / temperature reach the kernel as fp32 scalars (0.7 is 0.7 - 1.2e-8): 1e-7, not 1e-15
    assert_logps(out.logps, ref_logps, rtol=1e-7)
    (out.logps * w).sum().backward()
    assert rel_norm(x.grad, ref_grad) <= 1e-7


def test_no_completion_tokens_at_all():
    logits, labels, _ = make_batch(seed=41)
    labels[:] = IGNORE
    x = logits.clone().requires_grad_(True)
    out = sk.sequence_logprobs(x, labels, backend="triton")
    assert bool((out.logps == 0).all()) and bool((out.counts == 0).all())
    out.logps.sum().backward()
    assert bool((x.grad == 0).all())  # in place: every row of the logits buffer zeroed


# ---------------------------------------------------------------------------------------------------
# the launchers directly: poisoned out, strides, in place
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), 1e30])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_backward_writes_every_element(monkeypatch, poison, dtype):
    monkeypatch.setattr(kmod, "MAX_BLOCK_V", 64)  # V = 200 = 3*64 + 8
    logits, labels, cu = make_batch(S=4, T=7, V=200, dtype=dtype, layout="packed", seed=42)
    plan = build_plan(labels, 200, IGNORE, labels.shape, logits.device, cu)
    w = seq_weights(4, 42)
    ref_logps, ref_grad = reference_logps_and_grad(logits, labels, cu, 8.0, 1.0, w)
    seq, lse, _ = kmod.logits_forward(logits, plan, transform=LogitTransform(softcap=8.0), options=KernelOptions())
    assert seq.dtype == torch.float64 and lse.dtype == torch.float32 and lse.shape == (plan.num_tokens,)
    assert_logps(seq, ref_logps)
    before = logits.clone()
    out = torch.full_like(logits, poison)
    kmod.logits_backward(logits, plan, transform=LogitTransform(softcap=8.0), lse=lse, grad_seq=w.float(), out=out)
    assert torch.equal(logits, before), "out-of-place backward must not touch the logits"
    assert rel_norm(out, ref_grad) <= TOL[dtype][1]
    # in place on a copy: identical result
    buf = logits.clone()
    kmod.logits_backward(buf, plan, transform=LogitTransform(softcap=8.0), lse=lse, grad_seq=w.float(), out=buf)
    assert torch.equal(buf, out)


def test_strided_logits():
    # Row stride > V (a slice of a wider buffer) and a column stride != 1 (a transposed view).
    logits, labels, cu = make_batch(S=4, T=7, V=97, layout="packed", seed=43)
    N, V = logits.shape
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    w = seq_weights(4, 43)
    ref_logps, ref_grad = reference_logps_and_grad(logits, labels, cu, None, 0.9, w)
    wide = torch.full((N, V + 11), 1e4)
    wide[:, :V] = logits
    row_strided = wide[:, :V]
    col_strided = logits.t().contiguous().t()
    assert col_strided.stride() == (1, N)
    for view in (row_strided, col_strided):
        seq, lse, _ = kmod.logits_forward(view, plan, transform=LogitTransform(temperature=0.9),
                                          options=KernelOptions())
        assert_logps(seq, ref_logps)
        out = torch.full_like(view, float("nan"))  # keeps view's strides
        kmod.logits_backward(view, plan, transform=LogitTransform(temperature=0.9), lse=lse, grad_seq=w.float(),
                             out=out)
        assert rel_norm(out, ref_grad) <= 1e-4
    # in place into the strided buffer itself; the padding columns of `wide` stay untouched
    kmod.logits_backward(row_strided, plan, transform=LogitTransform(temperature=0.9), lse=lse, grad_seq=w.float(),
                         out=row_strided)
    assert rel_norm(row_strided, ref_grad) <= 1e-4
    assert bool((wide[:, V:] == 1e4).all())


# ---------------------------------------------------------------------------------------------------
# the prefetching forward and the launch parameters (issue 9)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [20, 32, 64, 65, 95, 129], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_forward_prefetch_and_plain_loop(monkeypatch, V, dtype):
    """Tiles of 32 lanes: V below one tile (only the masked tile), exactly one or two full tiles (no masked
    tile: the prefetch's last fold is the last tile), a full tile plus 1 lane, and longer streams. Both
    loops against the float64 reference, softcap and temperature on, and bitwise equal to each other
    (same arithmetic in the same order)."""
    monkeypatch.setattr(kmod, "MAX_BLOCK_V", 32)
    logits, labels, cu = make_batch(V=V, dtype=dtype, layout="packed", seed=60 + V)
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    w = seq_weights(6, 60 + V)
    ref_logps, _ = reference_logps_and_grad(logits, labels, cu, 5.0, 0.8, w)
    ref_lse = None
    results = {}
    for prefetch in (1, 0):
        monkeypatch.setattr(kmod, "CONFIG_OVERRIDES", {"logits_fwd": {"prefetch": prefetch}})
        assert kmod.launch_params("logits_fwd", dtype, V, logits.device)["prefetch"] == prefetch
        seq, lse, _ = kmod.logits_forward(logits, plan, transform=LogitTransform(softcap=5.0, temperature=0.8),
                                          options=KernelOptions())
        assert_logps(seq, ref_logps)
        if ref_lse is None:
            z = 5.0 * torch.tanh(logits.double()[plan.token_idx] / 5.0) / 0.8
            ref_lse = torch.logsumexp(z, dim=1)
        assert rel_norm(lse, ref_lse) <= 1e-6
        results[prefetch] = (seq, lse)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_prefetch_is_the_default_except_float64():
    for dt in (F32, BF16, F16):
        assert kmod.launch_params("logits_fwd", dt, 128256, torch.device("cpu")) == \
            {"block_v": 4096, "num_warps": 8, "prefetch": 1}
    assert kmod.launch_params("logits_fwd", torch.float64, 97, torch.device("cpu"))["prefetch"] == 0
    assert kmod.launch_params("logits_bwd", BF16, 97, torch.device("cpu")) == {"block_v": 128, "num_warps": 4}


def test_launch_overrides_are_validated(monkeypatch):
    monkeypatch.setattr(kmod, "CONFIG_OVERRIDES", {"logits_bwd": {"block_v": 48}})
    with pytest.raises(ValueError, match="block_v"):
        kmod.launch_params("logits_bwd", BF16, 97, torch.device("cpu"))
    monkeypatch.setattr(kmod, "CONFIG_OVERRIDES", {"logits_fwd": {"prefetch": 1, "stages": 2}})
    with pytest.raises(ValueError, match="unknown \\['stages'\\]"):
        kmod.launch_params("logits_fwd", BF16, 97, torch.device("cpu"))


@pytest.mark.parametrize("bwd", [{"block_v": 16, "num_warps": 2}, {"block_v": 256, "num_warps": 8}])
def test_backward_launch_overrides(monkeypatch, bwd):
    """Other backward tiles through CONFIG_OVERRIDES (what a table entry sets): same gradient, every element
    written (a NaN out), the tile clipped to next_pow2(V) when larger."""
    logits, labels, cu = make_batch(S=4, T=7, V=97, layout="packed", seed=70)
    plan = build_plan(labels, 97, IGNORE, labels.shape, logits.device, cu)
    w = seq_weights(4, 70)
    _, ref_grad = reference_logps_and_grad(logits, labels, cu, None, 1.0, w)
    monkeypatch.setattr(kmod, "CONFIG_OVERRIDES", {"logits_bwd": bwd})
    assert kmod.launch_params("logits_bwd", F32, 97, logits.device)["block_v"] == min(bwd["block_v"], 128)
    _, lse, _ = kmod.logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    out = torch.full_like(logits, float("nan"))
    kmod.logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=w.float(), out=out)
    assert rel_norm(out, ref_grad) <= 1e-4
