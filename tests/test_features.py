"""Kernel features of SPEC 2, 6 and 8 on every backend: the logit multiplier, per-token weights (and
LD-DPO's ``ld_alpha`` weights, as TRL 1.16 builds them), the per-token statistics, ``shift_labels`` and the
autocast policy. Each checks the public functions against a float64 oracle written here from the
definitions (materialized logits, autograd), on fresh random inputs with odd sizes (V = 97, H = 40, ragged
sequences), non-uniform weights and non-uniform upstream gradients."""

import pytest
import torch

import spo_kernels as sk
from spo_kernels.backends.cpu import extension_available
from spo_kernels.kernels import linear_logprobs as LL
from spo_kernels.kernels import logits_logprobs as LG
from spo_kernels.layout import build_plan

BACKENDS = ["reference", "torch", "triton"] + (["cpu"] if extension_available() else [])
LAYOUTS = ["padded", "packed"]
V, H = 97, 40
LENGTHS = [7, 3, 6, 5]  # per sequence; padded rows are 7 long (the last rows padded with ignore_index)
TRANSFORM = dict(logit_multiplier=1.7, softcap=6.0, temperature=0.8)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Several vocabulary tiles with a partial last one (V = 97), several H chunks and split partials,
    and NaN-poisoned buffers: a kernel that reads what nobody wrote shows up."""
    monkeypatch.setattr(LG, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(LL, "POISON_EMPTY", True)
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"block_h": 16, "block_n": 16, "block_v": 32, "num_splits": 2,
                                                 "gemm_m": 16, "gemm_k": 16})


# ---------------------------------------------------------------------------------------------
# inputs and the float64 oracle
# ---------------------------------------------------------------------------------------------

def make_case(layout, seed, *, peaked=False, P=2):
    """Labels with a prompt, holes and padding; logits, hidden states and a head (fp32), token weights;
    ``seg`` the sequence of each flattened row (-1: padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (LENGTHS * P)[: 2 * P]
    S, T = len(lengths), max(lengths)
    rows = S * T if layout == "padded" else sum(lengths)
    labels = torch.randint(0, V, (rows,), generator=g)
    seg = torch.full((rows,), -1)
    start = 0
    for s, n in enumerate(lengths):
        a = s * T if layout == "padded" else start
        seg[a: a + n] = s
        labels[a] = -100  # a prompt token
        if n > 4:
            labels[a + 2] = -100  # a hole inside the completion
        start += n
    labels[seg < 0] = -100
    hidden = torch.randn(rows, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.5
    scale = 8.0 if peaked else 1.5
    logits = torch.randn(rows, V, generator=g) * scale
    if peaked:  # one dominant logit per row, often the target
        logits[torch.arange(rows), labels.clamp(min=0)] += 25.0
    weights = torch.rand(rows, generator=g) * 1.5 + 0.1
    cu = None
    if layout == "padded":
        labels, hidden, logits, weights = (labels.view(S, T), hidden.view(S, T, H), logits.view(S, T, V),
                                           weights.view(S, T))
    else:
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(labels=labels, hidden=hidden, weight=weight, bias=bias, logits=logits, weights=weights, cu=cu,
                seg=seg, S=S)


def transform64(z, logit_multiplier=1.0, softcap=None, temperature=1.0):
    z = logit_multiplier * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def oracle_logps(raw64, case, weights=None, labels=None, **tf):
    """``L_s = sum_t w_t m_t logp_t`` in float64 from raw logits ``[..., V]`` (differentiable)."""
    labels = (case["labels"] if labels is None else labels).reshape(-1)
    z = transform64(raw64.reshape(-1, V), **tf)
    mask = labels != -100
    logp = torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * mask
    if weights is not None:
        logp = logp * weights.reshape(-1).double()
    seg = case["seg"].clamp(min=0)
    return torch.zeros(case["S"], dtype=torch.float64).index_add(0, seg, logp * (case["seg"] >= 0))


def oracle_stats(raw64, case, **tf):
    """Per-sequence sums of (entropy, log sum p^2, mean logit, target is the first argmax), float64."""
    labels = case["labels"].reshape(-1)
    z = transform64(raw64.reshape(-1, V).detach(), **tf)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    per_token = torch.stack([
        -(p * logp).sum(-1), torch.log((p * p).sum(-1)), z.mean(-1),
        (z.argmax(-1) == labels).double()])
    keep = (labels != -100) & (case["seg"] >= 0)
    out = torch.zeros(4, case["S"], dtype=torch.float64)
    return out.index_add(1, case["seg"].clamp(min=0), per_token * keep)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _inputs(case, backend):
    """float64 inputs for the reference backend (oracle precision), fp32 otherwise."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    return {k: case[k].to(dtype) for k in ("logits", "hidden", "weight", "bias")}


# ---------------------------------------------------------------------------------------------
# multiplier and token weights: values and every gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_path_multiplier_and_weights(backend, layout, weighted):
    case = make_case(layout, seed=1 + weighted)
    w = case["weights"] if weighted else None
    x = _inputs(case, backend)["logits"].clone().requires_grad_(True)
    out = sk.sequence_logprobs(x * 1.0, case["labels"], cu_seqlens=case["cu"], token_weights=w, backend=backend,
                               inplace_backward=True, **TRANSFORM)
    g = torch.randn(case["S"], generator=torch.Generator().manual_seed(9))  # non-uniform upstream gradient
    (out.logps * g.to(out.logps.dtype)).sum().backward()
    x64 = case["logits"].double().requires_grad_(True)
    want = oracle_logps(x64, case, w, **TRANSFORM)
    (want * g.double()).sum().backward()
    assert rel(out.logps.detach(), want.detach()) < 1e-5
    assert rel(x.grad, x64.grad) < 1e-4
    real = case["labels"].reshape(-1) != -100
    assert out.counts.tolist() == [int((real & (case["seg"] == s)).sum()) for s in range(case["S"])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_linear_multiplier_and_weights(backend, layout, weighted):
    case = make_case(layout, seed=3 + weighted)
    w = case["weights"] if weighted else None
    t = _inputs(case, backend)
    h, W, b = (t[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    out = sk.fused_linear_sequence_logprobs(h, W, case["labels"], b, cu_seqlens=case["cu"], token_weights=w,
                                            backend=backend, **TRANSFORM)
    g = torch.randn(case["S"], generator=torch.Generator().manual_seed(10))
    (out.logps * g.to(out.logps.dtype)).sum().backward()
    h64, W64, b64 = (case[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    want = oracle_logps(h64.reshape(-1, H) @ W64.t() + b64, case, w, **TRANSFORM)
    (want * g.double()).sum().backward()
    assert rel(out.logps.detach(), want.detach()) < 1e-5
    for got, ref in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
        assert rel(got, ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiplier_is_the_scaled_logits(backend):
    """``logit_multiplier=m`` equals passing ``m * logits`` (softcap and temperature after it), and m = 1
    is the identity: one encoding of 'off'."""
    case = make_case("padded", seed=4)
    x = _inputs(case, backend)["logits"]
    with torch.no_grad():
        a = sk.sequence_logprobs(x, case["labels"], backend=backend, logit_multiplier=2.5, softcap=5.0).logps
        b = sk.sequence_logprobs(2.5 * x, case["labels"], backend=backend, softcap=5.0).logps
        c = sk.sequence_logprobs(x, case["labels"], backend=backend, logit_multiplier=1.0).logps
        d = sk.sequence_logprobs(x, case["labels"], backend=backend).logps
    assert rel(a, b) < 1e-6
    assert torch.equal(c, d)


# ---------------------------------------------------------------------------------------------
# LD-DPO weights, as TRL 1.16's DPOTrainer builds them
# ---------------------------------------------------------------------------------------------

def trl_ld_logps(per_token_logps, completion_mask, ld_alpha):
    """TRL 1.16 ``DPOTrainer._compute_loss`` (and ``compute_ref_log_probs``): shared and tail masks from the
    cumulative completion positions; ``logps = shared + ld_alpha * tail``."""
    comp_pos = completion_mask.cumsum(dim=1)
    comp_lens = completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_ld_alpha_matches_trl_for_policy_and_reference(backend, path):
    case = make_case("padded", seed=5, P=2)
    labels = case["labels"]
    t = _inputs(case, backend)
    ref_logits = t["logits"] * 0.7 + 0.3
    ld_alpha = 0.35
    if path == "logits":
        out = sk.preference_loss(t["logits"], labels, ref_logits=ref_logits, backend=backend, ld_alpha=ld_alpha,
                                 beta=0.2, logit_multiplier=1.3)
        pol_raw, ref_raw = case["logits"].double(), ref_logits.double()
    else:
        ref_hidden = t["hidden"] * 0.9
        out = sk.fused_linear_preference_loss(t["hidden"], t["weight"], labels, t["bias"], ref_hidden=ref_hidden,
                                              backend=backend, ld_alpha=ld_alpha, beta=0.2, logit_multiplier=1.3)
        W64, b64 = case["weight"].double(), case["bias"].double()
        pol_raw, ref_raw = case["hidden"].double() @ W64.t() + b64, ref_hidden.double() @ W64.t() + b64
    mask = (labels != -100).double()

    def per_token(raw):
        z = transform64(raw, logit_multiplier=1.3)
        return torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask

    assert rel(out.policy_logps, trl_ld_logps(per_token(pol_raw), mask, ld_alpha)) < 1e-5
    assert rel(out.ref_logps, trl_ld_logps(per_token(ref_raw), mask, ld_alpha)) < 1e-5
    assert torch.equal(out.counts, (labels != -100).sum(1))  # the public lengths stay the full ones


def test_ld_alpha_weights_times_user_weights_in_the_plan():
    case = make_case("padded", seed=6)
    labels, w = case["labels"], case["weights"]
    plan = build_plan(labels, V, -100, labels.shape, "cpu", token_weights=w, ld_alpha=0.5)
    mask = (labels != -100).double()
    comp_pos = mask.cumsum(1)
    n = mask.sum(1)
    shared = torch.minimum(n[:2], n[2:]).repeat(2)
    ld = torch.where(comp_pos <= shared[:, None], 1.0, 0.5)
    want = (ld * w.double())[labels != -100]
    assert plan.token_weights.dtype == torch.float32
    assert torch.allclose(plan.token_weights.double(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="ld_alpha"):
        build_plan(labels, V, -100, labels.shape, "cpu", pairs=False, ld_alpha=0.5)


# ---------------------------------------------------------------------------------------------
# per-token statistics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("peaked", [False, True])
def test_token_stats_logits_path(backend, layout, peaked):
    case = make_case(layout, seed=7 + peaked, peaked=peaked)
    x = _inputs(case, backend)["logits"].clone().requires_grad_(True)
    out = sk.sequence_logprobs(x, case["labels"], cu_seqlens=case["cu"], token_stats=True, backend=backend,
                               token_weights=case["weights"], **TRANSFORM)
    _check_stats(out.stats, oracle_stats(case["logits"].double(), case, **TRANSFORM))
    # The statistics are detached and leave the log-probs and their gradient as they are.
    plain = sk.sequence_logprobs(x, case["labels"], cu_seqlens=case["cu"], backend=backend,
                                 token_weights=case["weights"], **TRANSFORM)
    assert torch.equal(out.logps.detach(), plain.logps.detach())
    assert all(not s.requires_grad for s in out.stats)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("peaked", [False, True])
def test_token_stats_fused_linear(backend, layout, peaked):
    case = make_case(layout, seed=11 + peaked)
    t = _inputs(case, backend)
    W = t["weight"] * (6.0 if peaked else 1.0)
    with torch.no_grad():
        out = sk.fused_linear_sequence_logprobs(t["hidden"], W, case["labels"], t["bias"], cu_seqlens=case["cu"],
                                                token_stats=True, backend=backend, **TRANSFORM)
    raw = case["hidden"].double().reshape(-1, H) @ W.double().t() + case["bias"].double()
    _check_stats(out.stats, oracle_stats(raw, case, **TRANSFORM))
    assert rel(out.logps, oracle_logps(raw, case, **TRANSFORM)) < 1e-5


def _check_stats(got, want):
    assert got is not None and all(s.dtype == torch.float64 for s in got)
    for name, g, w in zip(("entropy", "log_sum_p2", "mean_logit", "argmax"), got, want):
        assert torch.allclose(g, w, rtol=2e-5, atol=2e-4), (name, g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_flat_rows_and_argmax_ties(backend):
    """Flat rows: entropy log V, ``log sum p^2 = -log V``, and a tie counts for the first maximum only
    (``torch.argmax``, TRL's ``is_top1``): target 0 of a constant row is the argmax, target 5 is not; a
    target tied with a later column is the argmax."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    logits = torch.zeros(4, V, dtype=dtype)
    logits[2, 40] = logits[2, 60] = 3.0
    logits[3, 40] = logits[3, 60] = 3.0
    labels = torch.tensor([0, 5, 40, 60])
    cu = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    st = sk.sequence_logprobs(logits, labels, cu_seqlens=cu, token_stats=True, backend=backend).stats
    log_v = torch.log(torch.tensor(float(V), dtype=torch.float64))
    assert torch.allclose(st.entropy_sum[:2], log_v.expand(2), rtol=1e-6)
    assert torch.allclose(st.log_sum_p2_sum[:2], -log_v.expand(2), rtol=1e-6)
    assert st.argmax_hits.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.allclose(st.mean_logit_sum, torch.tensor([0, 0, 6 / V, 6 / V], dtype=torch.float64), atol=1e-7)


def test_token_stats_reach_the_loss_step(monkeypatch):
    """The preference losses reduce the statistics per sequence and hand them to the loss step
    (``seq_stats=``), when asked for (``token_stats=True``) or when WPO needs them (``use_weighting``)."""
    from spo_kernels.backends import base

    seen = []

    def spy(*args, seq_stats=None):
        seen.append(seq_stats)
        return real(*args)

    real = base.preference_loss_step
    monkeypatch.setattr(base, "preference_loss_step", spy)
    case = make_case("padded", seed=12)
    ref = torch.zeros(case["S"])
    sk.preference_loss(case["logits"], case["labels"], ref_logps=ref, backend="torch", token_stats=True)
    want = oracle_stats(case["logits"].double(), case)
    _check_stats(seen[-1], want)
    sk.fused_linear_preference_loss(case["hidden"], case["weight"], case["labels"], ref_logps=ref, backend="torch")
    assert seen[-1] is None  # off by default: nothing computed


# ---------------------------------------------------------------------------------------------
# shift_labels (Hugging Face labels)
# ---------------------------------------------------------------------------------------------

def _shifted(labels, cu):
    """The aligned labels of Hugging Face labels, written out: target of t is label t+1 of its sequence."""
    out = torch.full_like(labels, -100)
    if cu is None:
        out[:, :-1] = labels[:, 1:]
        return out
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[a: b - 1] = labels[a + 1: b]
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shift_labels_equals_the_pre_shifted_call(backend, layout):
    case = make_case(layout, seed=13)
    hf, cu, w = case["labels"], case["cu"], case["weights"]
    aligned, w_aligned = _shifted(hf, cu), _shifted_weights(w, cu)
    kw = dict(cu_seqlens=cu, backend=backend)
    with torch.no_grad():
        for fn, args in ((sk.sequence_logprobs, (case["logits"],)),
                         (sk.fused_linear_sequence_logprobs, (case["hidden"], case["weight"]))):
            a = fn(*args, hf, shift_labels=True, token_weights=w, **kw)
            b = fn(*args, aligned, token_weights=w_aligned, **kw)
            assert torch.equal(a.logps, b.logps) and torch.equal(a.counts, b.counts)
        ref = torch.randn(case["S"])
        a = sk.preference_loss(case["logits"], hf, shift_labels=True, ref_logps=ref, **kw)
        b = sk.preference_loss(case["logits"], aligned, ref_logps=ref, **kw)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.policy_logps, b.policy_logps)
        a = sk.fused_linear_preference_loss(case["hidden"], case["weight"], hf, shift_labels=True, ref_logps=ref, **kw)
        b = sk.fused_linear_preference_loss(case["hidden"], case["weight"], aligned, ref_logps=ref, **kw)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.policy_logps, b.policy_logps)


def _shifted_weights(w, cu):
    out = torch.zeros_like(w)
    if cu is None:
        out[:, :-1] = w[:, 1:]
        return out
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[a: b - 1] = w[a + 1: b]
    return out


def test_shift_labels_packed_empty_sequences_and_segment_ends():
    """A label never crosses into the next packed sequence, empty segments included."""
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    plan = build_plan(labels, 10, -100, labels.shape, "cpu", cu, pairs=False, shift_labels=True)
    assert plan.token_idx.tolist() == [0, 2, 3]
    assert plan.targets.tolist() == [2, 4, 5]
    assert plan.counts.tolist() == [1, 0, 2, 0]


# ---------------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_head_in_the_autocast_dtype(backend):
    """Under ``torch.autocast`` the head product is the bf16 one nn.Linear would compute (fp32 accumulation):
    equal to casting the operands by hand; gradients return in the caller's fp32. Outside autocast a dtype
    mismatch is a TypeError naming both."""
    case = make_case("padded", seed=14)
    h, W = (case[k].clone().requires_grad_(True) for k in ("hidden", "weight"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sk.fused_linear_sequence_logprobs(h, W, case["labels"], backend=backend).logps
    got.sum().backward()
    assert h.grad.dtype == torch.float32 and W.grad.dtype == torch.float32
    h16, W16 = (case[k].to(torch.bfloat16).requires_grad_(True) for k in ("hidden", "weight"))
    want = sk.fused_linear_sequence_logprobs(h16, W16, case["labels"], backend=backend).logps
    want.sum().backward()
    assert torch.equal(got.detach(), want.detach())
    assert rel(h.grad, h16.grad.float()) < 1e-6 and rel(W.grad, W16.grad.float()) < 1e-6
    # Mixed dtypes are fine under autocast, an error outside it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sk.fused_linear_sequence_logprobs(h16.detach(), W.detach(), case["labels"], backend=backend)
    with pytest.raises(TypeError, match="weight dtype torch.float32 differs from hidden dtype torch.bfloat16"):
        sk.fused_linear_sequence_logprobs(h16.detach(), W.detach(), case["labels"], backend=backend)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,err,match", [
    (dict(logit_multiplier=0.0), ValueError, "logit_multiplier must be > 0"),
    (dict(logit_multiplier=float("nan")), ValueError, "logit_multiplier must be finite"),
    (dict(logit_multiplier="2"), TypeError, "logit_multiplier must be a number"),
    (dict(token_weights=torch.ones(4, 6)), ValueError, "token_weights must have the labels' shape"),
    (dict(token_weights=torch.ones(4, 7, dtype=torch.int64)), TypeError, "token_weights must be a float32"),
    (dict(shift_labels=1), TypeError, "shift_labels must be a bool"),
    (dict(token_stats="yes"), TypeError, "token_stats must be a bool"),
])
def test_bad_feature_arguments_raise_before_any_kernel(kwargs, err, match):
    case = make_case("padded", seed=15)
    with pytest.raises(err, match=match):
        sk.sequence_logprobs(case["logits"], case["labels"], backend="torch", **kwargs)
    with pytest.raises(err, match=match):
        sk.fused_linear_sequence_logprobs(case["hidden"], case["weight"], case["labels"], backend="torch", **kwargs)
