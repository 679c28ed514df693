"""Issue 10, "Reliability": each case found with random and adversarial inputs, one test per case.

Cases 1-3: the in-place logits backward never gives a wrong gradient (SPEC 6). 4: the config is frozen
and validated on every change. 5: per-sequence sums in float64 (SPEC 7). 6: stable apo / exo forms.
7-11: input validation (SPEC 7). Then: SPO metrics only with SPO on (SPEC 6), and the packed token plan's
host synchronizations. Logits-path cases run on every backend (triton through the interpreter on CPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spo_kernels as sk
from spo_kernels import layout as layout_mod
from spo_kernels.backends import Backend
from spo_kernels.backends.cpu import extension_available
from spo_kernels.config import PreferenceLossConfig
from spo_kernels.layout import build_plan, check_same_device
from spo_kernels.kernels.types import KernelOptions, LogitTransform
from batches import make_batch, rel_err

BACKENDS = ["torch", "triton"] + (["cpu"] if extension_available() else [])
S, T, V = 4, 7, 23


def _labels(seed=0, S=S, T=T):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return labels


REF_LOGPS = torch.tensor([-40.0, -42.0, -41.0, -45.0])


def _reference_grad(make_input, labels, cu=None, **opts):
    """d loss / d leaf from the float64 reference backend, for the same construction of the logits."""
    leaf, logits = make_input(torch.float64)
    out = sk.preference_loss(logits, labels, cu_seqlens=cu, ref_logps=REF_LOGPS.double(), backend="reference",
                             **opts)
    out.loss.backward()
    return leaf.grad


# ---------------------------------------------------------------------------------------------------
# 1-3: the in-place backward never gives a wrong gradient
# ---------------------------------------------------------------------------------------------------

def _seeded(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_case1_expanded_logits_get_the_exact_gradient(backend, layout):
    """Stride-0 (expanded) logits with the default in-place backward: 4-6x wrong gradients on cpu and
    triton, an obscure RuntimeError on torch. Overlapping memory takes the out-of-place backward."""
    labels = _labels(1)
    cu = None
    if layout == "packed":
        labels = labels.reshape(-1)
        cu = torch.tensor([0, 7, 14, 21, 28], dtype=torch.int32)

    def make(dtype):
        if layout == "padded":  # [1, T, V] -> [S, T, V]: the reshape to [N, V] copies
            leaf = _seeded((1, T, V), dtype).requires_grad_(True)
            return leaf, leaf.expand(S, T, V)
        leaf = _seeded((1, V), dtype).requires_grad_(True)  # one row -> [N, V] with row stride 0
        return leaf, leaf.expand(S * T, V)

    want = _reference_grad(make, labels, cu)
    leaf, logits = make(torch.float32)
    before = leaf.detach().clone()
    out = sk.preference_loss(logits, labels, cu_seqlens=cu, ref_logps=REF_LOGPS, backend=backend)
    out.loss.backward()
    assert rel_err(leaf.grad, want) <= 1e-4
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_case2_logits_saved_by_another_node_never_give_a_wrong_gradient(backend):
    """``y = x * 1; extra = (y ** 2).sum()`` (PowBackward saves y) and the loss on y: the in-place write
    did not bump y's version counter, so the later PowBackward read the gradient as logits (~28% off on
    cpu and triton). Now autograd raises its usual error; with the other node's backward first, or the
    out-of-place backward, the gradient is exact."""
    labels = _labels(2)

    def run(inplace, extra_first, dtype=torch.float32, be=backend):
        x = _seeded((S, T, V), dtype, seed=2).requires_grad_(True)
        y = x * 1
        if extra_first:  # created before the loss: its backward runs after ours
            extra = (y ** 2).sum() * 1e-3
        out = sk.preference_loss(y, labels, ref_logps=REF_LOGPS.to(dtype), backend=be, inplace_backward=inplace)
        if not extra_first:
            extra = (y ** 2).sum() * 1e-3
        (out.loss + extra).backward()
        return x.grad

    want = run(False, True, torch.float64, "reference")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run(True, True)
    assert rel_err(run(True, False), want) <= 1e-4
    assert rel_err(run(False, True), want) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_case3_leaf_logits_keep_their_values(backend):
    """A leaf passed as logits had its values overwritten by its gradient. Leaves (and views of them)
    take the out-of-place backward; a non-leaf buffer is still overwritten (the memory saving)."""
    labels = _labels(3)
    x = _seeded((S, T, V), torch.float32, seed=3).requires_grad_(True)
    before = x.detach().clone()
    sk.preference_loss(x, labels, ref_logps=REF_LOGPS, backend=backend).loss.backward()
    assert torch.equal(x.detach(), before)
    view = _seeded((S, T, V), torch.float32, seed=3).requires_grad_(True)
    sk.preference_loss(view.view(S * T, V).view(S, T, V), labels, ref_logps=REF_LOGPS,
                       backend=backend).loss.backward()
    assert torch.equal(view.detach(), before)
    torch.testing.assert_close(view.grad, x.grad, rtol=0, atol=0)
    # the usual case, a non-leaf the caller holds: overwritten in place, with the same gradient
    leaf = before.clone().requires_grad_(True)
    buf = leaf * 1
    sk.preference_loss(buf, labels, ref_logps=REF_LOGPS, backend=backend).loss.backward()
    assert torch.equal(buf.detach(), x.grad) and torch.equal(leaf.grad, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_case3_shared_storage_is_never_overwritten(backend):
    """A window of a larger buffer, or a storage another live view shares, is not written in place: the
    other tensor keeps its values and the gradient is exact."""
    labels = _labels(4)
    lab = labels.reshape(-1)
    cu = torch.tensor([0, 7, 14, 21, 28], dtype=torch.int32)
    x = _seeded((S * (T + 1), V), torch.float32, seed=4)

    def grad(make):
        leaf = x.clone().requires_grad_(True)
        buf, witness = make(leaf)
        before = witness.detach().clone()
        sk.preference_loss(buf, lab, cu_seqlens=cu, ref_logps=REF_LOGPS, backend=backend).loss.backward()
        assert torch.equal(witness.detach(), before)
        return leaf.grad

    def head(leaf):  # the first S*T rows of a larger buffer: contiguous, a window of its storage
        big = leaf * 1
        return big[: S * T], big

    def aliased(leaf):  # the whole buffer, but another view of it is alive
        buf = leaf[: S * T] * 1
        return buf, buf.view(S, T, V)

    def window(leaf):  # padded [S, T, V] window of [S, T+1, V]: not contiguous, so the reshape copies
        big = (leaf * 1).view(S, T + 1, V)
        return big[:, :T], big

    want = _reference_grad(lambda dt: (lambda l: (l, l[: S * T]))(x.to(dt).requires_grad_(True)), lab, cu)
    assert rel_err(grad(head), want) <= 1e-4
    assert rel_err(grad(aliased), want) <= 1e-4
    leaf = x.clone().requires_grad_(True)
    buf, big = window(leaf)
    before = big.detach().clone()
    sk.preference_loss(buf, labels, ref_logps=REF_LOGPS, backend=backend).loss.backward()
    assert torch.equal(big.detach(), before)
    want = _reference_grad(lambda dt: (lambda l: (l, l.view(S, T + 1, V)[:, :T]))(x.to(dt).requires_grad_(True)),
                           labels)
    assert rel_err(leaf.grad, want) <= 1e-4


def test_case3_logits_changed_between_forward_and_backward_raise():
    labels = _labels(5)
    buf = _seeded((S, T, V), torch.float32, seed=5).requires_grad_(True) * 1
    out = sk.preference_loss(buf, labels, ref_logps=REF_LOGPS, backend="torch")
    with torch.no_grad():
        buf.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


# ---------------------------------------------------------------------------------------------------
# 4: frozen config, validated on every construction and change
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("beta", -1.0), ("label_smoothing", 0.5), ("loss_type", "bogus")])
def test_case4_config_is_frozen_and_every_change_is_validated(field, value):
    """Assigning a field skipped validation: beta=-1 used silently, label_smoothing=0.5 with robust gave
    -inf, a bogus loss_type a KeyError. Now assignment is an error and a change is a validated copy."""
    cfg = PreferenceLossConfig(loss_type="robust")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.replace(**{field: value})
    module = sk.PreferenceLoss(loss_type="robust")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(module.config, field, value)
    assert dataclasses.replace(cfg, beta=0.3).beta == 0.3 and cfg.beta == 0.1


# ---------------------------------------------------------------------------------------------------
# 5: per-sequence sums in float64 (SPEC 7: the loss tolerance at 8k-token completions)
# ---------------------------------------------------------------------------------------------------

def _long_batch(P=2, T=8192, V=64, seed=11):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * P, T, V, generator=g, dtype=torch.float64) * 3).float()
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :3] = -100
    return logits, labels


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + ["reference"])
def test_case5_long_completions_meet_the_loss_tolerance(backend):
    """cpu and triton rounded the per-sequence sums to fp32 before the loss step: two 8192-token pairs,
    beta 0.5, fp32 logits: loss rel. error 5e-4 (SPEC 7 allows 1e-5, or the fp32 floor beyond 1k
    tokens). Sums are float64 now: each is within 4 standard deviations of the fp32 floor (float64 sums
    of the exact per-token log-probs rounded to fp32), and so is the loss. Triton: the same kernels are checked below (the
    interpreter is too slow for 32k tokens end to end)."""
    from spo_kernels import reference as ref_impl
    from spo_kernels.config import PreferenceLossConfig as Cfg
    logits, labels = _long_batch()
    tok64 = ref_impl.reference_token_logprobs(logits.double(), labels, -100)
    L64 = tok64.sum(-1)
    n = (labels != -100).sum(-1)
    ref = (L64 + torch.tensor([3.0, -1.0, -2.0, 0.5], dtype=torch.float64)).float()
    cfg = Cfg(beta=0.5)
    L64g = L64.clone().requires_grad_(True)
    loss64 = ref_impl.reference_pair_loss(L64g, n, ref.double(), cfg)
    (g64,) = torch.autograd.grad(loss64, L64g)
    loss64 = float(loss64.detach())
    floor_sd = (tok64.float().double() - tok64).pow(2).sum(-1).sqrt()  # spread of the fp32 floor's sum
    # SPEC 7 beyond 1k tokens: no worse than the fp32 floor (here 4 standard deviations of it, carried
    # to the loss by dloss/dL), and 1e-5 wherever that is looser. Rounding the sums to fp32 gave 2e-4.
    tol = max(1e-5 * abs(loss64), 4 * float((g64 * floor_sd).norm()))
    out = sk.preference_loss(logits, labels, ref_logps=ref, beta=0.5, backend=backend)
    assert abs(float(out.loss) - loss64) <= tol, (float(out.loss), loss64, tol)
    if backend != "reference":
        from spo_kernels.backends import get_backend
        from spo_kernels.layout import build_plan as plan_of
        plan = plan_of(labels, logits.shape[-1], -100, labels.shape, labels.device)
        seq, _, _ = get_backend(backend).logits_forward(logits.reshape(-1, logits.shape[-1]), plan,
                                                        transform=LogitTransform(), options=KernelOptions())
        assert seq.dtype == torch.float64
        assert bool(((seq - L64).abs() <= 4 * floor_sd).all()), ((seq - L64).tolist(), floor_sd.tolist())
        b = make_batch(P=2, T=600, H=16, V=64, seed=11)
        hplan = plan_of(b.labels, 64, -100, b.labels.shape, b.labels.device)
        hseq, _, _ = get_backend(backend).linear_forward(b.hidden.reshape(-1, 16), b.weight, b.bias, hplan,
                                                         transform=LogitTransform(), options=KernelOptions(),
                                                         save_lse=False)
        assert hseq.dtype == torch.float64


class _FakeLaunch:
    """Stands in for a Triton kernel launch: ``kernel[grid](*args)`` calls ``fill(args)``."""

    def __init__(self, fill):
        self.fill = fill

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fill(args)


def test_case5_triton_segment_sums_are_float64(monkeypatch):
    """The Triton per-sequence sum kernels (logits path ``_segment_sum_kernel``, fused-linear
    ``_merge_segments_kernel``) summed in fp32 and returned fp32. Fed known fp32 per-token log-probs
    (the per-token kernels replaced by a fill), their sums must be the float64 sums of those values."""
    from spo_kernels.kernels import linear_logprobs as LL
    from spo_kernels.kernels import logits_logprobs as LG
    g = torch.Generator().manual_seed(12)
    lengths = [8192, 5000, 0, 8191]
    N = sum(lengths)
    labels = torch.randint(0, 16, (N,), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    plan = build_plan(labels, 16, -100, labels.shape, labels.device, cu, pairs=False)
    logp = -(torch.rand(N, generator=g) * 10).float()  # the per-token values, fp32
    want = torch.stack([logp[a:b].double().sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    def fill_logits(args):
        args[3].zero_()           # lse
        args[4].copy_(logp)       # token_logp

    monkeypatch.setattr(LG, "_token_logprob_kernel", _FakeLaunch(fill_logits))
    seq, _, _ = LG.logits_forward(torch.zeros(N, 16), plan, transform=LogitTransform(), options=KernelOptions())
    assert seq.dtype == torch.float64
    torch.testing.assert_close(seq, want, rtol=1e-13, atol=0)

    def fill_partials(args):
        part_max, part_sum, part_tgt = args[5], args[6], args[7]
        part_max.zero_()
        part_sum.zero_()
        part_sum[0] = 1.0         # lse = 0 + log(1) = 0 exactly
        part_tgt.zero_()
        part_tgt[0] = logp        # logp = target logit - lse

    parts = {}
    real_empty = LL._empty

    def spy_empty(shape, dtype, device):
        t = real_empty(shape, dtype, device)
        if len(shape) == 3:  # the [3, splits, Nc] partials
            parts["p"] = t
        return t

    monkeypatch.setattr(LL, "_empty", spy_empty)
    monkeypatch.setattr(LL, "_forward_partials_kernel", _FakeLaunch(fill_partials))
    seq, _, _ = LL.linear_forward(torch.zeros(N, 8), torch.zeros(16, 8), None, plan, transform=LogitTransform(),
                                  options=KernelOptions(), save_lse=False)
    assert parts["p"].shape[1] >= 1
    assert seq.dtype == torch.float64
    torch.testing.assert_close(seq, want, rtol=1e-13, atol=0)
    assert float(seq[2]) == 0.0  # the sequence without tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_case5_fp16_logits_gradient_is_rounded_once_and_takes_a_loss_scale(backend):
    """SPEC 7, fp16 dlogits: the gradient is formed in fp32 and rounded to fp16 once. Its true size is
    often below fp16's range (g_s p_v ~ 1e-8 for V = 32k); the remedy is the usual fp16 loss scale
    (torch.amp.GradScaler): it arrives as the upstream gradient, is applied in fp32 before the rounding
    (no intermediate product can underflow or overflow), and unscaling gives the fp32 gradient."""
    labels = _labels(13)
    z = _seeded((S, T, V), torch.float32, seed=13) * 3
    z[0, 3] += torch.linspace(0, 40, V)  # a peaked row: probabilities down to e^-40
    want_leaf = z.half().double().requires_grad_(True)  # the same (fp16) inputs
    sk.preference_loss(want_leaf * 1, labels, ref_logps=REF_LOGPS.double(), beta=0.01,
                       backend="reference").loss.backward()
    want = want_leaf.grad
    scale = 2.0 ** 16
    leaf = z.half().requires_grad_(True)
    out = sk.preference_loss(leaf * 1, labels, ref_logps=REF_LOGPS, beta=0.01, backend=backend)
    (out.loss * scale).backward()
    got = leaf.grad.double() / scale
    assert rel_err(got, want) <= 2e-2
    # every entry whose scaled size is in fp16's normal range survived, to fp16's precision
    big = (want.abs() * scale) >= 2.0 ** -14
    assert bool(((got - want).abs()[big] <= 2 ** -10 * want.abs()[big] + 2.0 ** -24 / scale).all())

# ---------------------------------------------------------------------------------------------------
# 6: apo_zero / apo_down / exo_pair near their optimum
# ---------------------------------------------------------------------------------------------------

def _near_optimum_pairs(loss_type, e):
    """One pair per x = b D on a dyadic grid (exact in fp32, beta = 1) where the loss is in [1e-4, 0.1]:
    (L [2], R [2]) fp32 with the chosen reward far below 0 for apo_down (its optimum)."""
    import math
    if loss_type == "exo_pair":
        e = e or 1e-3  # EXO's default epsilon
        x_star = math.log1p(-e) - math.log(e)
        xs = [x_star + k / 64 for k in range(-128, 129)]
    else:
        xs = [k / 16 for k in range(-40, 200)]
    out = []
    for x in xs:
        x = float(torch.tensor(x).float())
        if loss_type == "apo_zero":  # 1 - sig(u_w) + sig(u_l), u_w = x, u_l = -x
            L, R = [x - 40.0, -x - 40.0], [-40.0, -40.0]
        elif loss_type == "apo_down":  # sig(u_w) + 1 - sig(b D), u_w = -x, D = x
            L, R = [-x - 40.0, -2 * x - 40.0], [-40.0, -40.0]
        else:
            L, R = [x - 40.0, -40.0], [-40.0, -40.0]
        out.append((torch.tensor(L), torch.tensor(R)))
    return out


@pytest.mark.parametrize("loss_type,e", [("apo_down", 0.0), ("apo_zero", 0.0), ("exo_pair", 0.0),
                                         ("exo_pair", 0.1), ("exo_pair", 0.4)])
def test_case6_apo_and_exo_are_accurate_near_their_optimum(loss_type, e):
    """apo_down and exo_pair lost ~1e-7 absolute near their optimum in fp32 (rel. 2e-5 to 4e-4 at losses
    of 1e-3 .. 1e-4): ``1 - sig(x)`` and EXO's cancelling KL terms. Now sig(-x) and EXO's Bregman form:
    fp32 loss step (torch and Triton) within 1e-5 of the float64 oracle on exact inputs."""
    from spo_kernels import reference as ref_impl
    from spo_kernels.kernels.loss_step import loss_step as triton_step
    from spo_kernels.losses import preference_loss_step
    cfg = PreferenceLossConfig(loss_type=loss_type, beta=1.0, label_smoothing=e)
    n = torch.tensor([10, 10])
    checked = 0
    for k, (L, R) in enumerate(_near_optimum_pairs(loss_type, e)):
        L64 = L.double().requires_grad_(True)
        want = ref_impl.reference_pair_loss(L64, n, R.double(), cfg)
        (want_grad,) = torch.autograd.grad(want, L64)
        want = float(want.detach())
        if not 1e-4 <= want <= 0.1:
            continue
        steps = [preference_loss_step(L, n, R, cfg)]
        if k % 4 == 0:  # the interpreter is slow: every 4th point
            steps.append(triton_step(L, n, R, cfg))
        for step in steps:
            assert abs(float(step.loss) - want) <= 1e-5 * want, (L.tolist(), float(step.loss), want)
            assert rel_err(step.grad, want_grad) <= 1e-5
        checked += 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------------
# 7: flags are bools
# ---------------------------------------------------------------------------------------------------

def test_case7_flags_must_be_bools():
    """``reference_free="no"`` was taken as True."""
    for value in ("no", 0, 1, None):
        with pytest.raises(TypeError, match="reference_free"):
            PreferenceLossConfig(reference_free=value)
    z = torch.randn(S, T, V)
    with pytest.raises(TypeError, match="reference_free"):
        sk.preference_loss(z, _labels(), ref_logps=REF_LOGPS, reference_free="no", backend="torch")
    with pytest.raises(TypeError, match="inplace_backward"):
        sk.preference_loss(z, _labels(), ref_logps=REF_LOGPS, inplace_backward="no", backend="torch")
    with pytest.raises(TypeError, match="inplace_backward"):
        sk.sequence_logprobs(z, _labels(), inplace_backward=1, backend="torch")
    b = make_batch(P=2, T=T, H=8, V=V)
    with pytest.raises(TypeError, match="deterministic"):
        sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, ref_logps=REF_LOGPS, deterministic=1,
                                        backend="torch")


# ---------------------------------------------------------------------------------------------------
# 8: V = 0, fp8, meta tensors, device mismatch: a clear error naming the argument, before any kernel
# ---------------------------------------------------------------------------------------------------

class _Exploding(Backend):
    name = "exploding"

    def _boom(self, *a, **k):
        raise AssertionError("a kernel ran before validation rejected the input")

    loss_step = logits_forward = logits_backward = linear_forward = linear_backward = _boom


@pytest.fixture
def no_kernels(monkeypatch):
    import spo_kernels.api as api
    monkeypatch.setattr(api, "get_backend", lambda name: _Exploding())


def test_case8_bad_tensors_are_named_before_any_kernel(no_kernels):
    labels = _labels()
    b = make_batch(P=2, T=T, H=8, V=V)
    ref = REF_LOGPS

    def logits_call(**kw):
        args = dict(logits=torch.randn(S, T, V), labels=labels, ref_logps=ref, backend="torch")
        args.update(kw)
        return sk.preference_loss(**args)

    def linear_call(**kw):
        args = dict(hidden=b.hidden, weight=b.weight, labels=b.labels, bias=b.bias, ref_logps=ref, backend="torch")
        args.update(kw)
        return sk.fused_linear_preference_loss(**args)

    # V = 0: ZeroDivisionError (torch) / IndexError (reference) before
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=r"logits.*V = 0"):
            logits_call(logits=torch.randn(S, T, 0), labels=torch.full((S, T), -100), backend=backend)
        with pytest.raises(ValueError, match=r"weight.*V = 0"):
            linear_call(weight=b.weight[:0], bias=None, labels=torch.full((S, T), -100), backend=backend)
        with pytest.raises(ValueError, match=r"logits.*V = 0"):
            sk.sequence_logprobs(torch.randn(S, T, 0), torch.full((S, T), -100), backend=backend)
    # fp8 passed the is_floating_point check and failed deep inside
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None:
        with pytest.raises(TypeError, match="logits"):
            logits_call(logits=torch.randn(S, T, V).to(fp8))
        with pytest.raises(TypeError, match="hidden"):
            linear_call(hidden=b.hidden.to(fp8), weight=b.weight.to(fp8), bias=None)
        with pytest.raises(TypeError, match="ref_logps"):
            logits_call(ref_logps=ref.to(fp8))
    with pytest.raises(TypeError, match="logits"):
        logits_call(logits=torch.randn(S, T, V, dtype=torch.complex64))
    # meta tensors failed in .item()
    with pytest.raises(ValueError, match="labels.*meta"):
        logits_call(labels=labels.to("meta"))
    for name in ("hidden", "weight", "bias", "labels"):
        arg = {"hidden": b.hidden, "weight": b.weight, "bias": b.bias, "labels": b.labels}[name]
        with pytest.raises(ValueError, match=f"{name} is a meta tensor"):
            linear_call(**{name: arg.to("meta")})
    with pytest.raises(ValueError, match="logits is a meta tensor"):
        sk.sequence_logprobs(torch.randn(S, T, V, device="meta"), labels, backend="torch")


def test_case8_device_mismatch_names_the_odd_argument():
    """The odd argument is named, not whichever was compared second (hidden on another device blamed
    weight). Checked here with the meta device standing in for a second device; on CUDA end to end."""
    cpu = torch.zeros(2)
    other = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"^hidden is not on cpu") as info:
        check_same_device({"hidden": other, "weight": cpu, "labels": cpu, "bias": None})
    assert "weight on cpu" in str(info.value) and "hidden on meta" in str(info.value)
    with pytest.raises(ValueError, match=r"^weight is not on cpu"):
        check_same_device({"hidden": cpu, "weight": other})  # a tie: the first argument's device wins
    check_same_device({"hidden": cpu, "weight": cpu, "bias": None})


@pytest.mark.gpu
def test_case8_device_mismatch_on_cuda(no_kernels):
    b = make_batch(P=2, T=T, H=8, V=V)
    with pytest.raises(ValueError, match="^hidden is not on cuda"):
        sk.fused_linear_preference_loss(b.hidden, b.weight.cuda(), b.labels.cuda(), b.bias.cuda(),
                                        ref_logps=REF_LOGPS.cuda())
    with pytest.raises(ValueError, match="^labels is not on cuda"):
        sk.preference_loss(torch.randn(S, T, V, device="cuda"), _labels(), ref_logps=REF_LOGPS.cuda())
    with pytest.raises(ValueError, match="^ref_logps is not on cuda"):
        sk.preference_loss(torch.randn(S, T, V, device="cuda"), _labels().cuda(), ref_logps=REF_LOGPS)


# ---------------------------------------------------------------------------------------------------
# 9: modules check their config at construction
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [sk.PreferenceLoss, sk.FusedLinearPreferenceLoss])
def test_case9_modules_reject_a_bad_config_at_construction(module):
    """A str config gave an obscure error, a dict failed on the first call. Both are a TypeError at
    construction (a dict is not converted: the message says how to build a validated config from it)."""
    with pytest.raises(TypeError, match="config must be a PreferenceLossConfig, got str"):
        module(config="sigmoid")
    with pytest.raises(TypeError, match=r"config must be a PreferenceLossConfig, got dict.*PreferenceLossConfig\(\*\*"):
        module(config={"beta": 0.2})
    with pytest.raises(ValueError, match="beta"):
        module(beta=-1.0)
    with pytest.raises(TypeError, match="backend"):
        module(backend=3)
    assert module(config=PreferenceLossConfig(beta=0.2), spo_lambda=1.0).config.spo_lambda == 1.0


# ---------------------------------------------------------------------------------------------------
# 10: every integer label dtype, on every backend
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.int32])
def test_case10_every_integer_label_dtype(backend, dtype):
    """int16/uint8 labels crashed inside gather (reference backend)."""
    ignore = 255 if dtype == torch.uint8 else -100
    labels = _labels(6)
    labels[labels == -100] = ignore
    logits = _seeded((S, T, V), torch.float32, seed=6)
    want = sk.preference_loss(logits, labels, ref_logps=REF_LOGPS, ignore_index=ignore, backend=backend)
    got = sk.preference_loss(logits, labels.to(dtype), ref_logps=REF_LOGPS, ignore_index=ignore, backend=backend)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    b = make_batch(P=2, T=T, H=8, V=V, seed=6)
    lab = b.labels.clone()
    lab[lab == -100] = ignore
    want = sk.fused_linear_sequence_logprobs(b.hidden, b.weight, lab, b.bias, ignore_index=ignore, backend=backend)
    got = sk.fused_linear_sequence_logprobs(b.hidden, b.weight, lab.to(dtype), b.bias, ignore_index=ignore,
                                            backend=backend)
    torch.testing.assert_close(got.logps, want.logps, rtol=0, atol=0)
    with pytest.raises(TypeError, match="labels"):
        sk.sequence_logprobs(logits, labels.bool(), backend=backend)


# ---------------------------------------------------------------------------------------------------
# 11: bias dtype follows the same rule as the weight
# ---------------------------------------------------------------------------------------------------

def test_case11_bias_dtype_must_match_the_weight(no_kernels):
    """A bias of another dtype was accepted while a weight mismatch was an error (SPEC 6: outside
    autocast one dtype, else an error naming both and the cast to make)."""
    b = make_batch(P=2, T=T, H=8, V=V)
    with pytest.raises(TypeError, match=r"bias dtype torch.float64 differs from weight dtype torch.float32.*"
                                        r"bias.to\(torch.float32\)"):
        sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias.double(), ref_logps=REF_LOGPS,
                                        backend="torch")
    with pytest.raises(TypeError, match=r"ref_bias dtype torch.bfloat16 differs from ref_weight dtype"):
        sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias, ref_hidden=b.ref_hidden,
                                        ref_weight=b.ref_weight, ref_bias=b.bias.bfloat16(), backend="torch")
    with pytest.raises(TypeError, match=r"weight dtype torch.float64 differs from hidden dtype torch.float32.*"
                                        r"hidden.to\(torch.float64\) or weight.to\(torch.float32\)"):
        sk.fused_linear_sequence_logprobs(b.hidden, b.weight.double(), b.labels, backend="torch")


# ---------------------------------------------------------------------------------------------------
# SPO metrics only when spo_lambda > 0
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_spo_metrics_only_when_spo_is_on(backend):
    """spo/penalty (and the trainer's spo_on) showed with SPO off, whenever reference log-probs gave an
    anchor. SPEC 6: only when spo_lambda > 0, on every backend and path."""
    labels = _labels(7)
    logits = _seeded((S, T, V), torch.float32, seed=7)
    off = sk.preference_loss(logits, labels, ref_logps=REF_LOGPS, backend=backend)
    on = sk.preference_loss(logits, labels, ref_logps=REF_LOGPS, spo_lambda=0.5, backend=backend)
    spo = {"spo/penalty", "spo/active_fraction"}
    assert not spo & set(off.metrics) and spo <= set(on.metrics)
    assert set(off.metrics) | spo == set(on.metrics) == set(sk.METRIC_NAMES)
    b = make_batch(P=2, T=T, H=8, V=V, seed=7)
    off = sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias, ref_logps=REF_LOGPS, backend=backend)
    assert not spo & set(off.metrics)
    off = sk.fused_linear_preference_loss(b.hidden, b.weight, b.labels, b.bias, ref_logps=REF_LOGPS,
                                          spo_anchor=torch.zeros(2), backend=backend)
    assert not spo & set(off.metrics)


# ---------------------------------------------------------------------------------------------------
# the packed token plan: host synchronizations
# ---------------------------------------------------------------------------------------------------

class _SyncCounter:
    """Counts the calls that read device data on the host (each a sync on CUDA): Tensor -> Python
    conversions, and the ops whose output size depends on the data (nonzero; repeat_interleave without
    output_size; bincount; unique; masked_select)."""

    def __init__(self, monkeypatch):
        self.calls = []
        T_ = torch.Tensor
        # (reductions such as .any() stay on the device: reading their result is what syncs)
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
                     "bincount", "unique", "masked_select"):
            self._wrap(monkeypatch, T_, name)
        for name in ("nonzero", "bincount", "unique", "masked_select", "argwhere"):
            self._wrap(monkeypatch, torch, name)

        real_ri = torch.repeat_interleave

        def repeat_interleave(*args, **kwargs):
            if kwargs.get("output_size") is None:
                self.calls.append("repeat_interleave")
            return real_ri(*args, **kwargs)
        monkeypatch.setattr(torch, "repeat_interleave", repeat_interleave)

    def _wrap(self, monkeypatch, owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_token_plan_has_two_host_syncs(monkeypatch, layout):
    """Packed, the plan synced 6 times (int(cu[0]), int(cu[-1]), two .any() checks, repeat_interleave
    without output_size, nonzero) plus bincount's output size. Now: one combined validation read and
    the nonzero that sizes the plan, both through layout.host_read / nonzero."""
    labels = _labels(8).reshape(-1) if layout == "packed" else _labels(8)
    cu = torch.tensor([0, 5, 7, 7, 28], dtype=torch.int32) if layout == "packed" else None
    lead = labels.shape
    want = build_plan(labels, V, -100, lead, labels.device, cu)
    counter = _SyncCounter(monkeypatch)
    plan = build_plan(labels, V, -100, lead, labels.device, cu)
    assert sorted(counter.calls) == ["__bool__", "nonzero"], counter.calls
    for f in ("token_idx", "targets", "seq_id", "seq_offsets", "counts"):
        assert torch.equal(getattr(plan, f), getattr(want, f)), f
    if layout == "packed":  # an empty sequence (cu 7..7) owns no token
        assert plan.counts.tolist()[2] == 0


def test_token_plan_matches_a_direct_construction():
    """seq_id / seq_offsets from searchsorted against the obvious per-row construction, with empty
    sequences, empty completions and a sequence with no rows."""
    g = torch.Generator().manual_seed(9)
    for trial in range(20):
        S_ = 2 * int(torch.randint(1, 5, (1,), generator=g))
        lengths = torch.randint(0, 6, (S_,), generator=g)
        N = int(lengths.sum())
        labels = torch.randint(-3, V, (N,), generator=g)
        labels[labels < 0] = -100
        cu = torch.zeros(S_ + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        plan = build_plan(labels, V, -100, labels.shape, labels.device, cu)
        seq_of_row = torch.repeat_interleave(torch.arange(S_), lengths)
        idx = (labels != -100).nonzero().squeeze(1)
        assert torch.equal(plan.token_idx, idx)
        assert torch.equal(plan.seq_id, seq_of_row[idx])
        assert torch.equal(plan.counts, torch.bincount(seq_of_row[idx], minlength=S_))
        assert plan.seq_offsets.tolist() == [0] + torch.cumsum(plan.counts, 0).tolist()


def test_token_plan_errors_keep_their_messages():
    lab = _labels(10).reshape(-1)
    for cu, msg in (([1, 7, 14, 21, 28], "start at 0"), ([0, 7, 14, 21, 27], "cover every row"),
                    ([0, 9, 7, 21, 28], "monotone")):
        with pytest.raises(ValueError, match=msg):
            build_plan(lab, V, -100, lab.shape, lab.device, torch.tensor(cu, dtype=torch.int32))
    bad = lab.clone()
    bad[9] = V
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found {V} at flattened position 9"):
        build_plan(bad, V, -100, bad.shape, bad.device, torch.tensor([0, 7, 14, 21, 28], dtype=torch.int32))
    assert layout_mod.host_read(torch.tensor(True)) is True
