"""Property tests (hypothesis): random batches against the float64 reference backend, SPEC 7 tolerances.

Drawn: P, T, H, V (odd sizes), padded and packed layouts, completion masks (empty completions and, packed,
sequences without rows included), every loss type with random legal options (beta, label smoothing,
reference-free, SFT weight, the loss-specific knobs), SPO off or on (either normalization, the reference
anchor or a tensor), softcap, temperature, bias, fp32 / bf16 inputs, in-place or allocated logits
backward. Each test runs one backend (torch, cpu, triton through the interpreter) on one path (logits,
fused linear); the oracle is ``backend="reference"`` on float64 copies of the same inputs.

Tolerances (SPEC 7): per-sequence log-probs rel 1e-5 (1e-4 for bf16 inputs; log-probs are sums of
non-positive terms, so relative is meaningful); loss rel 1e-5 / 1e-3 (bf16) against the larger of the
loss and its conditioning ``sum_s |dloss/dL_s| |L_s|`` (a loss near 0 is a difference of large terms);
gradients rel (norm) 1e-4 / 2e-2. Near-ties of the discontinuous metrics (accuracies, SPO active
fraction) are not compared.

Budget: ``SPO_PROPERTY_EXAMPLES`` examples per test (default: a CI-sized few, derandomized so CI is
reproducible); set it (e.g. 500) for a long, randomized run: ``SPO_PROPERTY_EXAMPLES=500 pytest
tests/test_properties.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import spo_kernels as sk  # noqa: E402
from spo_kernels import reference as ref_impl  # noqa: E402
from spo_kernels.backends.cpu import extension_available  # noqa: E402
from spo_kernels.config import LOSS_TYPES, PreferenceLossConfig  # noqa: E402

_ENV = os.environ.get("SPO_PROPERTY_EXAMPLES")
LONG = _ENV is not None
# CI: per (backend, path) test; the interpreter runs Triton about 100x slower than the others.
CI_EXAMPLES = {"torch": 80, "cpu": 80, "triton": 40}
BACKENDS = ["torch", "triton"] + (["cpu"] if extension_available() else [])
IGNORE = -100
TOL = {torch.float32: dict(logp=1e-5, loss=1e-5, grad=1e-4),
       torch.bfloat16: dict(logp=1e-4, loss=1e-3, grad=2e-2)}
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo", "cpo")


def _settings(backend):
    n = int(_ENV) if LONG else CI_EXAMPLES[backend]
    return settings(max_examples=n, deadline=None, derandomize=not LONG, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------

@st.composite
def loss_options(draw):
    """A legal config: every loss type, its knobs, SPO on or off, a logit transform."""
    lt = draw(st.sampled_from(LOSS_TYPES))
    opts = dict(loss_type=lt, beta=draw(st.floats(0.01, 2.0)))
    if lt in SMOOTHED and draw(st.booleans()):
        opts["label_smoothing"] = draw(st.floats(0.0, 0.45))
    if draw(st.booleans()):
        opts["reference_free"] = draw(st.booleans())
    if draw(st.booleans()):
        opts["sft_weight"] = draw(st.floats(0.0, 2.0))
    if lt == "simpo":
        opts["simpo_gamma"] = draw(st.floats(-1.0, 2.0))
    if lt == "dpop":
        opts["dpop_lambda"] = draw(st.floats(0.0, 60.0))
    if lt == "rdpo":
        opts["rdpo_alpha"] = draw(st.floats(-0.5, 0.5))
    if lt == "discopop":
        opts["discopop_tau"] = draw(st.floats(0.02, 1.0))
    spo = draw(st.sampled_from(["off", "reference", "tensor"]))
    if spo != "off":
        opts.update(spo_lambda=draw(st.floats(0.1, 2.0)), spo_margin=draw(st.floats(-0.5, 0.5)),
                    spo_normalize=draw(st.sampled_from(["mean", "sum"])))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(1.0, 30.0))
    if draw(st.booleans()):
        opts["temperature"] = draw(st.floats(0.5, 2.0))
    return opts, spo


@st.composite
def batches(draw, path):
    """Shapes, layout, masks, dtype and a seed for the tensor data."""
    P = draw(st.integers(1, 3))
    S = 2 * P
    T = draw(st.integers(1, 12))
    layout = draw(st.sampled_from(["padded", "packed"]))
    # Per sequence: prompt rows, completion rows (0 = empty completion), trailing padding; packed rows are
    # prompt + completion + padding (a sequence may have no rows at all).
    prompt = draw(st.lists(st.integers(0, T), min_size=S, max_size=S))
    completion = [draw(st.integers(0, T - a)) for a in prompt]
    holes = draw(st.booleans())  # ignored tokens inside completions too
    return dict(
        P=P, T=T, layout=layout, prompt=prompt, completion=completion, holes=holes,
        V=draw(st.integers(2, 130)), H=draw(st.integers(1, 48)) if path == "linear" else None,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        bias=path == "linear" and draw(st.booleans()),
        inplace=draw(st.booleans()),
        scale=draw(st.sampled_from([0.3, 1.0, 4.0])),
        ref_spread=draw(st.sampled_from([0.1, 1.0, 5.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _labels_and_layout(b, g):
    """Labels ``[S, T]`` padded or ``[N]`` packed, and cu_seqlens (None padded)."""
    S, T, V = 2 * b["P"], b["T"], b["V"]
    rows, lengths = [], []
    for s in range(S):
        a, c = b["prompt"][s], b["completion"][s]
        lab = torch.full((T,), IGNORE, dtype=torch.int64)
        lab[a:a + c] = torch.randint(0, V, (c,), generator=g)
        if b["holes"] and c > 2:
            lab[a + 1] = IGNORE
        rows.append(lab)
        pad = int(torch.randint(0, T - a - c + 1, (1,), generator=g))
        lengths.append(a + c + pad)
    labels = torch.stack(rows)
    if b["layout"] == "padded":
        return labels, None, None
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat([labels[s, :n] for s, n in enumerate(lengths)]), cu, lengths


# ---------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------

def _rel_norm(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite gradient"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _anchor_for(cfg, spo, L64, counts, R, g):
    """The SPO anchor the API derives (reference) or a tensor near the chosen log-probs (half active)."""
    P = L64.shape[0] // 2
    nc = counts[:P].clamp(min=1).double()
    if spo == "tensor":
        chosen = L64[:P] / nc if cfg.spo_normalize == "mean" else L64[:P]
        return (chosen - cfg.spo_margin + 0.3 * torch.randn(P, generator=g, dtype=torch.float64)).float()
    if spo == "reference":
        return R.double()[:P] / nc if cfg.spo_normalize == "mean" else R.double()[:P]
    return None


EPS32 = torch.finfo(torch.float32).eps


def _token_terms(path, leaves, labels, cu, opts):
    """Per plan token, in float64: its sequence (the plan), ``|z_y| + |lse|`` (the size of the fp32 terms
    whose difference is logp_t), the unit gradient ``(onehot - softmax) dz/dz_raw`` per vocabulary entry,
    its target entry's chain rule, and the hidden rows (fused-linear path)."""
    from spo_kernels.layout import build_plan
    transform = dict(softcap=opts.get("softcap"), temperature=opts.get("temperature", 1.0))
    h_rows = None
    if path == "logits":
        x = leaves["logits"].double()
        V = x.shape[-1]
        raw = x.reshape(-1, V)
    else:
        h, w, bias = (None if v is None else v.double() for v in (leaves["hidden"], leaves["weight"], leaves["bias"]))
        V = w.shape[0]
        raw = h.reshape(-1, h.shape[-1]) @ w.t() + (0 if bias is None else bias)
    plan = build_plan(labels, V, IGNORE, labels.shape, labels.device, cu)
    if path == "linear":
        h_rows = h.reshape(-1, h.shape[-1])[plan.token_idx]
    zr = raw[plan.token_idx].requires_grad_(True)
    z = ref_impl.transform_logits(zr, **transform)
    (chain,) = torch.autograd.grad(z.sum(), zr)  # elementwise transform: its diagonal Jacobian
    z = z.detach()
    lse = torch.logsumexp(z, 1)
    onehot = torch.zeros_like(z).scatter_(1, plan.targets[:, None], 1.0)
    unit = (onehot - torch.exp(z - lse[:, None])) * chain
    zy = z.gather(1, plan.targets[:, None]).squeeze(1)
    return dict(plan=plan, size=zy.abs() + lse.abs(), unit=unit, onehot=onehot,
                chain_y=chain.gather(1, plan.targets[:, None]).squeeze(1).abs(), h_rows=h_rows)


def _gradient_floors(path, b, cfg, g64, terms, leaves):
    """Absolute error bounds of each gradient (norm), added to SPEC 7's relative tolerance. With ``g_t``
    the oracle's dloss/dL of token t's sequence, dz = g_t * unit is allowed per entry:
    - ``2 eps_in (|g_t| + eps_g) |unit|``: rounding dz (or the result) to the input dtype, and fp32 sums;
    - ``eps_g |unit|``: the loss step's own fp32 precision, ``eps_g = 4 eps32 (beta + sft + lambda + 1) / P``
      (a g that cancels to ~0 is then not compared to the oracle's float64 noise);
    - at the target, ``4 eps32 |g_t| (|z_y| + |lse|) |chain|``: ``1 - p_y = -expm1(logp_t)`` inherits the
      absolute precision of the fp32 difference ``z_y - lse`` (a confident target, p_y -> 1).
    The entry bound E [Nc, V] is then carried through the absolute-value products of each gradient."""
    plan, unit = terms["plan"], terms["unit"]
    eps_in = torch.finfo(b["dtype"]).eps
    eps_g = 4 * EPS32 * (cfg.beta + cfg.sft_weight + cfg.spo_lambda + 1.0) / b["P"]
    g_tok = g64.abs()[plan.seq_id][:, None]
    E = (2 * eps_in * (g_tok + eps_g) + eps_g) * unit.abs()
    E = E + (4 * EPS32 * g_tok[:, 0] * terms["size"] * terms["chain_y"])[:, None] * terms["onehot"]
    if path == "logits":
        return {"logits": float(E.norm())}
    w = leaves["weight"].double().abs()
    return {"hidden": float((E @ w).norm()), "weight": float((E.t() @ terms["h_rows"].abs()).norm()),
            "bias": float(E.sum(0).norm())}


def _compare(path, b, opts, spo, out, out64, grads, grads64, anchor, R, counts, terms, leaves):
    """SPEC 7 tolerances, with the fp32 floor: ``logp_t = z_y - lse`` is a difference of fp32 values of
    size ``|z_y| + |lse|``, so a confident target (p_y -> 1, logp_t -> 0) is known to about
    ``eps32 (|z_y| + |lse|)`` absolute; that bounds the log-probs and the loss's conditioning, and
    :func:`_gradient_floors` the gradients."""
    tol = TOL[b["dtype"]]
    P = b["P"]
    cfg = PreferenceLossConfig(**opts)
    L64 = out64.policy_logps
    plan = terms["plan"]
    S = 2 * P
    size_s = torch.zeros(S, dtype=torch.float64).index_add_(0, plan.seq_id, terms["size"])
    # per-sequence log-probs: sums of non-positive terms (0 for an empty completion)
    assert torch.equal(out.counts.cpu(), counts)
    err = (out.policy_logps.double() - L64).abs()
    assert bool((err <= tol["logp"] * L64.abs() + 4 * EPS32 * size_s + 1e-7).all()), (out.policy_logps, L64)
    # the loss, against its conditioning: dloss/dL_s from the oracle's own loss function
    Lg = L64.clone().requires_grad_(True)
    a64 = None if anchor is None or cfg.spo_lambda == 0 else anchor.double()
    loss_again = ref_impl.reference_pair_loss(Lg, counts, R.double(), cfg, a64)
    (g64,) = torch.autograd.grad(loss_again, Lg)
    cond = float((g64.abs() * (L64.abs() + size_s)).sum())
    loss, loss64 = float(out.loss.detach()), float(out64.loss.detach())
    assert loss == loss, "NaN loss"
    assert abs(loss - loss64) <= tol["loss"] * max(abs(loss64), cond) + 1e-7, (loss, loss64, cond)
    # metrics: the same names (SPO ones only with SPO on), values judged against their terms' size
    assert set(out.metrics) == set(out64.metrics)
    assert ("spo/penalty" in out.metrics) == (cfg.spo_lambda > 0)
    # rewards and logps are on the summed log-probs for every loss type (TRL 1.16), R = 0 only if reference_free
    basis = L64
    size = float(basis.abs().max()) + float(R.double().abs().max())
    Rb = torch.zeros_like(basis) if cfg.reference_free else R.double()
    margins = cfg.beta * ((basis[:P] - Rb[:P]) - (basis[P:] - Rb[P:]))
    for name, want in out64.metrics.items():
        got = float(out.metrics[name])
        want = float(want)
        if name == "rewards/accuracies":
            if bool((margins.abs() < 1e-4 * max(cfg.beta * size, 1e-6)).any()):
                continue  # a near-tie may flip
            scale = 0.0
        elif name == "spo/active_fraction":
            continue  # discontinuous at the relu's kink; the penalty itself is compared
        elif name == "count/empty_completions":
            assert got == want, name
            continue
        elif name.startswith("rewards/"):
            scale = cfg.beta * size
        else:
            scale = size
        assert abs(got - want) <= 10 * tol["loss"] * max(abs(want), scale, 1e-6) + 1e-6, (name, got, want)
    # gradients: relative tolerance plus the absolute floors
    floors = _gradient_floors(path, b, cfg, g64, terms, leaves)
    for k, g in grads64.items():
        if g is None:
            assert grads[k] is None, k
            continue
        diff = float((grads[k].double() - g).norm())
        assert torch.isfinite(grads[k]).all(), f"non-finite gradient {k}"
        assert diff <= tol["grad"] * float(g.norm()) + floors[k], (
            k, _rel_norm(grads[k], g), floors[k] / max(float(g.norm()), 1e-30))


def _run(path, backend, b, opts_spo):
    opts, spo = opts_spo
    g = torch.Generator().manual_seed(b["seed"])
    labels, cu, _ = _labels_and_layout(b, g)
    dtype, V = b["dtype"], b["V"]
    lead = tuple(labels.shape)
    if path == "logits":
        x = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * b["scale"]).to(dtype)
        leaves = {"logits": x}
    else:
        H = b["H"]
        h = (torch.randn(*lead, H, generator=g, dtype=torch.float64) * b["scale"]).to(dtype)
        w = (torch.randn(V, H, generator=g, dtype=torch.float64) / max(H, 1) ** 0.5).to(dtype)
        bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if b["bias"] else None
        leaves = {"hidden": h, "weight": w, "bias": bias}
    transform = {k: opts[k] for k in ("softcap", "temperature") if k in opts}

    # the oracle's per-sequence log-probs first: the reference log-probs are drawn around them
    with torch.no_grad():
        if path == "logits":
            seq = sk.sequence_logprobs(x.double(), labels, cu_seqlens=cu, backend="reference", **transform)
        else:
            seq = sk.fused_linear_sequence_logprobs(
                h.double(), w.double(), labels, None if bias is None else bias.double(), cu_seqlens=cu,
                backend="reference", **transform)
    L64, counts = seq.logps, seq.counts
    R = (L64 + b["ref_spread"] * torch.randn(L64.shape, generator=g, dtype=torch.float64)).float()
    cfg = PreferenceLossConfig(**opts)
    anchor = _anchor_for(cfg, spo, L64, counts, R, g)
    extra = dict(ref_logps=R, cu_seqlens=cu, **opts)
    if spo == "tensor":
        extra["spo_anchor"] = anchor

    def run(backend_name, as64):
        params = {k: None if v is None else (v.double() if as64 else v).clone().requires_grad_(True)
                  for k, v in leaves.items()}
        kw = dict(extra)
        if as64:
            kw["ref_logps"] = R.double()
            if spo == "tensor":
                kw["spo_anchor"] = anchor.double()
        if path == "logits":
            buf = params["logits"] * 1 if b["inplace"] else params["logits"]
            out = sk.preference_loss(buf, labels, backend=backend_name, inplace_backward=b["inplace"], **kw)
        else:
            out = sk.fused_linear_preference_loss(params["hidden"], params["weight"], labels, params["bias"],
                                                  backend=backend_name, **kw)
        out.loss.backward()
        return out, {k: None if v is None else v.grad for k, v in params.items()}

    out64, grads64 = run("reference", True)
    out, grads = run(backend, False)
    if spo == "reference" and cfg.spo_lambda > 0:
        anchor = _anchor_for(cfg, "reference", L64, counts, R, g)
    terms = _token_terms(path, leaves, labels, cu, opts)
    _compare(path, b, opts, spo, out, out64, grads, grads64, anchor if cfg.spo_lambda > 0 else None, R, counts,
             terms, leaves)


def _make_test(path, backend):
    @pytest.mark.slow if LONG else (lambda f: f)
    @_settings(backend)
    @given(b=batches(path), opts=loss_options())
    def test(b, opts):
        _run(path, backend, b, opts)
    test.__name__ = f"test_{path}_{backend}_matches_reference"
    return test


for _path in ("logits", "linear"):
    for _backend in BACKENDS:
        _t = _make_test(_path, _backend)
        globals()[_t.__name__] = _t
del _t, _path, _backend
