"""The Triton logits path and loss step compiled on a real GPU, at real shapes (skipped without CUDA).

- G2's shape: N = 32768 tokens, V = 128256, bf16 logits, half the tokens completion, against a
  float64 reference computed chunk by chunk (the full float64 log-softmax would be 34 GB);
- N * V > 2^31 (element offsets past int32) with completion tokens on the rows beyond it;
- more than 65535 plan tokens (grid axis 0 only);
- compiled specializations the interpreter cannot check: float64, softcap + temperature, column stride,
  one pair (P = 1 becomes a constexpr), every loss type.
NaN never passes: every output is checked finite, and ``out`` buffers start as NaN.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import spo_kernels as sk  # noqa: E402
from spo_kernels import reference as ref  # noqa: E402
from spo_kernels.config import LOSS_TYPES, PreferenceLossConfig  # noqa: E402
from spo_kernels.kernels.logits_logprobs import logits_backward, logits_forward  # noqa: E402
from spo_kernels.kernels.loss_step import loss_step  # noqa: E402
from spo_kernels.layout import build_plan  # noqa: E402
from spo_kernels.losses import METRIC_NAMES, preference_loss_step  # noqa: E402
from spo_kernels.kernels.types import KernelOptions, LogitTransform
from batches import need_gpu_memory as _need_memory

pytestmark = pytest.mark.gpu

IGNORE = -100
DEV = "cuda"




@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# chunked float64 reference over the plan
# ---------------------------------------------------------------------------------------------------

def _transform64(z, softcap, temperature):
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


def chunked_reference_forward(logits2d, plan, softcap=None, temperature=1.0, rows_per_chunk=1024):
    """float64 ``(seq_logps [S], lse [Nc])`` from ``[N, V]`` logits, ``rows_per_chunk`` rows at a time."""
    lse = torch.empty(plan.num_tokens, dtype=torch.float64, device=logits2d.device)
    logp = torch.empty_like(lse)
    for a in range(0, plan.num_tokens, rows_per_chunk):
        b = min(a + rows_per_chunk, plan.num_tokens)
        z = _transform64(logits2d.index_select(0, plan.token_idx[a:b]).double(), softcap, temperature)
        lse[a:b] = torch.logsumexp(z, dim=1)
        logp[a:b] = z.gather(1, plan.targets[a:b, None]).squeeze(1) - lse[a:b]
        del z
    seq = torch.zeros(plan.num_seqs, dtype=torch.float64, device=logits2d.device)
    seq.index_add_(0, plan.seq_id, logp)
    return seq, lse


def check_gradient_chunked(out, logits2d, plan, grad_seq, softcap=None, temperature=1.0,
                           rows_per_chunk=1024):
    """Relative error in norm of ``out`` against the float64 closed form on plan rows, and exact zeros
    (no NaN, no leftover) on every other row. Returns the relative error."""
    err2 = torch.zeros((), dtype=torch.float64, device=out.device)
    ref2 = torch.zeros((), dtype=torch.float64, device=out.device)
    g_tok = grad_seq.double()[plan.seq_id]
    for a in range(0, plan.num_tokens, rows_per_chunk):
        b = min(a + rows_per_chunk, plan.num_tokens)
        rows = plan.token_idx[a:b]
        x = logits2d.index_select(0, rows).double().requires_grad_(True)
        z = _transform64(x, softcap, temperature)
        # float64 autograd of sum_t g_t logp_t, one chunk of rows at a time
        logp = z.gather(1, plan.targets[a:b, None]).squeeze(1) - torch.logsumexp(z, dim=1)
        (grad_ref,) = torch.autograd.grad((logp * g_tok[a:b]).sum(), x)
        got = out.index_select(0, rows).double()
        assert torch.isfinite(got).all(), "non-finite gradient on plan rows"
        err2 += ((got - grad_ref) ** 2).sum()
        ref2 += (grad_ref ** 2).sum()
        del x, z, grad_ref, got
    in_plan = torch.zeros(plan.num_rows, dtype=torch.bool, device=out.device)
    in_plan[plan.token_idx] = True
    other = (~in_plan).nonzero().squeeze(1)
    for a in range(0, other.numel(), rows_per_chunk):
        block = out.index_select(0, other[a:a + rows_per_chunk])
        assert bool((block == 0).all()), "rows outside the plan must be exactly 0"
    return float((err2.sqrt() / ref2.sqrt().clamp(min=1e-300)).item())


def assert_rel(actual, expected, rtol, name):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs()
    assert bool((err <= rtol * expected.abs() + 1e-9).all()), \
        f"{name}: max rel error {float((err / expected.abs().clamp(min=1e-30)).max()):.3g}"


def packed_batch(num_seqs, seq_len, vocab, dtype, seed, completion_frac=0.5):
    """Packed ``[N, V]`` logits with ``num_seqs`` sequences of ``seq_len`` rows: prompt first, the last
    ``completion_frac`` of each sequence is completion. Special rows: +30 on the target, +30 on the last
    vocab lane, all equal, all near -60."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    N = num_seqs * seq_len
    logits = torch.randn(N, vocab, generator=g, device=DEV, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (N,), generator=g, device=DEV)
    prompt = int(seq_len * (1 - completion_frac))
    for s in range(num_seqs):
        labels[s * seq_len: s * seq_len + prompt] = IGNORE
    cu = torch.arange(0, N + 1, seq_len, dtype=torch.int32, device=DEV)
    comp = (labels != IGNORE).nonzero().squeeze(1)
    r0, r1, r2, r3 = (int(comp[k]) for k in (0, comp.numel() // 3, comp.numel() // 2, -1))
    logits[r0, int(labels[r0])] += 30
    logits[r1, vocab - 1] += 30
    logits[r2] = 0.5
    logits[r3] = (logits[r3].float() * 0.1 - 60).to(dtype)
    return logits, labels, cu


# ---------------------------------------------------------------------------------------------------
# real shapes
# ---------------------------------------------------------------------------------------------------

def test_g2_shape_bf16_forward_backward():
    """N = 32768, V = 128256 bf16 (8.4 GB), half the tokens completion, 16 packed sequences."""
    _need_memory(40)
    V = 128256
    logits, labels, cu = packed_batch(16, 2048, V, torch.bfloat16, seed=0)
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    assert plan.num_tokens == 16384

    seq, lse, _ = logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    seq64, lse64 = chunked_reference_forward(logits, plan)
    assert seq.dtype == torch.float64  # sums in float64 (SPEC 7)
    assert_rel(seq, seq64, 1e-5, "seq_logps")
    assert_rel(lse, lse64, 1e-5, "lse")
    seq_again, _, _ = logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    assert torch.equal(seq, seq_again), "the forward must be deterministic"

    grad_seq = torch.randn(16, device=DEV) / 16
    out = torch.full_like(logits, float("nan"))
    logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq, out=out)
    assert check_gradient_chunked(out, logits, plan, grad_seq) <= 2e-2
    # in place: bitwise the same result written over the logits
    logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq, out=logits)
    assert torch.equal(logits, out)


def test_g2_dpo_end_to_end_in_place():
    """preference_loss picks triton for CUDA tensors; gradient lands in the logits buffer."""
    _need_memory(40)
    V = 128256
    logits, labels, cu = packed_batch(16, 2048, V, torch.bfloat16, seed=1)
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    seq64, _ = chunked_reference_forward(logits, plan)
    ref_logps = (seq64 + 5 * torch.randn(16, device=DEV, dtype=torch.float64)).float()

    # expected loss and dloss/dL from the float64 oracle on the float64 log-probs
    L64 = seq64.clone().requires_grad_(True)
    loss64 = ref.reference_pair_loss(L64, plan.counts, ref_logps.double(), PreferenceLossConfig(beta=0.1))
    loss64.backward()

    x = logits.requires_grad_(True) * 1  # a non-leaf: a leaf is never overwritten (SPEC 6)
    x.retain_grad()
    out = sk.preference_loss(x, labels, cu_seqlens=cu, ref_logps=ref_logps, beta=0.1)
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss) - float(loss64)) <= 1e-3 * abs(float(loss64))
    out.loss.backward()
    assert x.grad.data_ptr() == x.data_ptr(), "the in-place backward must reuse the logits buffer"
    # the in-place backward consumed the logits: regenerate them (packed_batch is deterministic)
    original, _, _ = packed_batch(16, 2048, V, torch.bfloat16, seed=1)
    assert check_gradient_chunked(x.grad, original, plan, L64.grad.float()) <= 2e-2


def test_offsets_past_int32():
    """N * V > 2^31 elements: padded [2, 8704, 128256] bf16 = 2.23e9 elements; completion tokens on the
    rows past element 2^31 (rows >= 16744)."""
    _need_memory(40)
    S, T, V = 2, 8704, 128256
    assert S * T * V > 2**31
    g = torch.Generator(device=DEV).manual_seed(2)
    logits = torch.randn(S, T, V, generator=g, device=DEV, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (S, T), generator=g, device=DEV)
    labels[:, : T // 2] = IGNORE
    logits[1, T - 1, int(labels[1, T - 1])] += 30  # the very last row: peaked
    logits[1, T - 2, V - 1] += 30                  # last vocab lane of the last tile, far past 2^31
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device)
    flat = logits.view(S * T, V)
    assert int(plan.token_idx[-1]) * V > 2**31

    seq, lse, _ = logits_forward(flat, plan, transform=LogitTransform(), options=KernelOptions())
    seq64, lse64 = chunked_reference_forward(flat, plan)
    assert_rel(seq, seq64, 1e-5, "seq_logps")
    assert_rel(lse, lse64, 1e-5, "lse")

    grad_seq = torch.tensor([0.7, -1.3], device=DEV)
    logits_backward(flat, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq,
                    out=flat)  # in place, 4.5 GB buffer
    # reference needs the original logits: regenerate them (same generator, same order)
    g = torch.Generator(device=DEV).manual_seed(2)
    orig = torch.randn(S, T, V, generator=g, device=DEV, dtype=torch.bfloat16)
    labels2 = torch.randint(0, V, (S, T), generator=g, device=DEV)
    assert torch.equal(labels2[:, T // 2:], labels[:, T // 2:])
    orig[1, T - 1, int(labels[1, T - 1])] += 30
    orig[1, T - 2, V - 1] += 30
    err = check_gradient_chunked(flat, orig.view(S * T, V), plan, grad_seq)
    assert err <= 2e-2


def test_more_tokens_than_grid_axis_limit():
    """70000 plan tokens (> 65535) and 70000 rows, small vocab: full float64 reference."""
    N, V = 70000, 1000
    g = torch.Generator(device=DEV).manual_seed(3)
    logits = torch.randn(N, V, generator=g, device=DEV) * 3
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    cu = torch.tensor([0, 30000, 30000, N], dtype=torch.int32, device=DEV)  # an empty middle sequence
    w = torch.tensor([0.5, 2.0, -1.0], device=DEV, dtype=torch.float64)

    x64 = logits.double().requires_grad_(True)
    want = sk.sequence_logprobs(x64, labels, cu_seqlens=cu, backend="reference").logps
    (want * w).sum().backward()

    x = logits.clone().requires_grad_(True)
    got = sk.sequence_logprobs(x, labels, cu_seqlens=cu, backend="triton", inplace_backward=False)
    assert_rel(got.logps, want.detach(), 1e-5, "seq_logps")
    (got.logps * w.float()).sum().backward()
    rel = float((x.grad.double() - x64.grad).norm() / x64.grad.norm())
    assert torch.isfinite(x.grad).all() and rel <= 1e-4


# ---------------------------------------------------------------------------------------------------
# compiled specializations
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transform", [(None, 1.0), (30.0, 1.0), (5.0, 0.7)])
def test_small_shapes_every_dtype_and_transform(dtype, transform):
    softcap, temperature = transform
    S, T, V = 6, 37, 1031  # V prime: the last tile is partial for any power-of-two tile
    g = torch.Generator(device=DEV).manual_seed(4)
    logits = (torch.randn(S, T, V, generator=g, device=DEV, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g, device=DEV)
    labels[:, :5] = IGNORE
    labels[2] = IGNORE
    logits[0, 10, int(labels[0, 10])] += 30
    logits[3, 20] = -60
    w = torch.randn(S, generator=g, device=DEV, dtype=torch.float64)
    x64 = logits.double().requires_grad_(True)
    want = sk.sequence_logprobs(x64, labels, softcap=softcap, temperature=temperature, backend="reference").logps
    (want * w).sum().backward()
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        got = sk.sequence_logprobs(x, labels, softcap=softcap, temperature=temperature, backend="triton",
                                   inplace_backward=inplace)
        assert_rel(got.logps, want.detach(), 1e-7 if dtype == torch.float64 else 1e-5, "seq_logps")
        (got.logps * w.to(got.logps.dtype)).sum().backward()
        rel = float((x.grad.double() - x64.grad).norm() / x64.grad.norm())
        tol = {torch.float64: 1e-7, torch.float32: 1e-4}.get(dtype, 2e-2)
        assert torch.isfinite(x.grad).all() and rel <= tol, rel


def test_column_strided_logits():
    N, V = 300, 517
    g = torch.Generator(device=DEV).manual_seed(5)
    base = torch.randn(V, N, generator=g, device=DEV)
    logits = base.t()  # stride (1, N)
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[::3] = IGNORE
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=DEV)
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    seq, lse, _ = logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    seq64, _ = chunked_reference_forward(logits, plan)
    assert_rel(seq, seq64, 1e-5, "seq_logps")
    grad_seq = torch.tensor([1.0, -0.5], device=DEV)
    out = torch.full_like(logits, float("nan"))
    logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq, out=out)
    assert check_gradient_chunked(out, logits, plan, grad_seq) <= 1e-4


@pytest.mark.parametrize("P", [1, 3, 1500])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_step_compiled(loss_type, P):
    g = torch.Generator(device=DEV).manual_seed(6)
    n = torch.randint(0, 40, (2 * P,), generator=g, device=DEV)
    L = -(0.3 + 3 * torch.rand(2 * P, generator=g, device=DEV)) * n
    R = L + 2 * torch.randn(2 * P, generator=g, device=DEV)
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.2, spo_lambda=1.0, sft_weight=0.1)
    anchor = R[:P] / n[:P].clamp(min=1)
    got = loss_step(L, n, R, cfg, anchor)
    want = preference_loss_step(L, n, R, cfg, anchor)
    assert torch.isfinite(got.loss) and torch.isfinite(got.grad).all()
    assert abs(float(got.loss) - float(want.loss)) <= 1e-5 * abs(float(want.loss)) + 1e-7
    assert float((got.grad - want.grad).norm() / want.grad.norm()) <= 1e-4
    scale = float(L.abs().max())
    for name in METRIC_NAMES:
        a, b = float(got.metrics[name]), float(want.metrics[name])
        assert a == a, name
        s = 0.0 if name in ("rewards/accuracies", "count/empty_completions") else scale
        assert abs(a - b) <= 1e-5 * max(abs(b), s) + 1e-7, (name, a, b)


def _dry_run():
    """Run this file's checks on CPU in the interpreter at small shapes (not collected by pytest):
    ``TRITON_INTERPRET=1 python -c "import sys; sys.path[:0] = ['tests']; import test_gpu_logits as t; t._dry_run()"``."""
    global DEV
    DEV = "cpu"
    test_small_shapes_every_dtype_and_transform(torch.bfloat16, (5.0, 0.7))
    test_small_shapes_every_dtype_and_transform(torch.float32, (None, 1.0))
    test_column_strided_logits()
    test_loss_step_compiled("sigmoid", 3)
    V = 1031
    logits, labels, cu = packed_batch(4, 64, V, torch.bfloat16, seed=0)
    plan = build_plan(labels, V, IGNORE, labels.shape, logits.device, cu)
    seq, lse, _ = logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    seq64, lse64 = chunked_reference_forward(logits, plan, rows_per_chunk=50)
    assert_rel(seq, seq64, 1e-5, "seq_logps")
    grad_seq = torch.randn(4) / 4
    out = torch.full_like(logits, float("nan"))
    logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq, out=out)
    assert check_gradient_chunked(out, logits, plan, grad_seq, rows_per_chunk=50) <= 2e-2
    print("dry run ok")
