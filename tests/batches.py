"""The tests' shared helpers: batch builder, packing, SPEC 7 tolerances, one run-step through the public
API, the comparison against the float64 reference, and allocation poisoning.

Everything here goes through the public functions (``spo_kernels.preference_loss``,
``fused_linear_preference_loss``, ``sequence_logprobs``, ``fused_linear_sequence_logprobs``, with
``backend=``), so the backend interface can change under it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import spo_kernels as sk
from spo_kernels import PreferenceLossOutput
from spo_kernels.reference import reference_pair_loss

IGNORE = -100
# SPEC 7, per input dtype: per-sequence log-probs (rel, per sequence), loss (rel to its conditioning),
# gradients (rel, in norm). Log-probs are computed in fp32 from the exact 16-bit inputs, so they are held
# to 1e-4 there, tighter than the SPEC's 1e-3 for the loss.
TOL = {
    torch.float32: dict(logp=1e-5, loss=1e-5, grad=1e-4),
    torch.bfloat16: dict(logp=1e-4, loss=1e-3, grad=2e-2),
    torch.float16: dict(logp=1e-4, loss=1e-3, grad=2e-2),
}


@dataclass
class Batch:
    hidden: torch.Tensor      # [2P, T, H]
    weight: torch.Tensor      # [V, H]
    bias: Optional[torch.Tensor]
    labels: torch.Tensor      # [2P, T]
    ref_hidden: torch.Tensor  # [2P, T, H]
    ref_weight: torch.Tensor  # [V, H]

    @property
    def P(self) -> int:
        return self.hidden.shape[0] // 2


def make_batch(P=2, T=11, H=40, V=97, *, bias=True, seed=0, empty=(), peaked=False, scale=1.0,
               dtype=torch.float32) -> Batch:
    """Random batch: prompts of random length then completions; ``empty`` lists sequences with no
    completion; ``peaked`` puts one logit far above the rest for some tokens (the target or not)."""
    g = torch.Generator().manual_seed(seed)
    S = 2 * P
    hidden = torch.randn(S, T, H, generator=g) * scale
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (S, T), generator=g)
    prompt = torch.randint(1, max(2, T // 2), (S,), generator=g)
    tail_pad = torch.randint(0, 3, (S,), generator=g)
    for s in range(S):
        labels[s, : prompt[s]] = -100
        if tail_pad[s]:
            labels[s, T - tail_pad[s]:] = -100
        if s in empty:
            labels[s] = -100
    if peaked:
        # A direction in H that makes vocab row 0 dominate: logit gap of ~30.
        hidden[:, ::2] += 30.0 * weight[0] / weight[0].norm() ** 2
    ref_hidden = hidden + 0.3 * torch.randn(S, T, H, generator=g)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=g) / H ** 0.5
    return Batch(hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), labels,
                 ref_hidden.to(dtype), ref_weight.to(dtype))


def pack(x: torch.Tensor, labels: torch.Tensor, lengths):
    """Padded [S, T, ...] + per-sequence kept lengths -> packed [N, ...], labels [N], cu_seqlens int32."""
    xs = [x[s, :n] for s, n in enumerate(lengths)]
    ls = [labels[s, :n] for s, n in enumerate(lengths)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat(xs), torch.cat(ls), cu


def packed_lengths(labels: torch.Tensor, ignore_index=-100, empty_length=1):
    """Shortest prefix of each row that keeps every completion token (drops trailing padding); a row
    without completion tokens keeps ``empty_length`` rows (0: a packed sequence with no rows at all)."""
    out = []
    for row in labels:
        idx = (row != ignore_index).nonzero()
        out.append(int(idx[-1]) + 1 if len(idx) else empty_length)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm; NaN anywhere gives inf (NaN never passes)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_grad_close(name: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor], dtype: torch.dtype,
                      tol: float) -> None:
    """A gradient is None exactly when expected, else in ``dtype`` and within ``tol`` relative in norm."""
    if want is None:
        assert got is None, f"d{name}: expected no gradient"
        return
    assert got is not None, f"d{name} missing"
    assert got.dtype == dtype, f"d{name} dtype {got.dtype}, expected {dtype}"
    err = rel_err(got, want)
    assert err <= tol, f"d{name}: rel-norm error {err:.3e} > {tol}"


def assert_close_scalar(a, b, rel, name="", scale=0.0):
    """|a - b| <= rel * max(|b|, scale): ``scale`` is the size of the terms a difference was taken of
    (a reward margin is a small difference of large log-probs)."""
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    if b != b:  # oracle NaN (e.g. SPO metric without anchor): ours must be NaN too
        assert a != a, f"{name}: expected NaN, got {a}"
        return
    assert a == a, f"{name}: got NaN, expected {b}"
    assert abs(a - b) <= rel * max(abs(b), scale, 1e-6) + 1e-7, f"{name}: {a} vs {b} (rel {rel})"


def assert_metrics_close(metrics, ref_metrics, rel, beta):
    """Every named metric; reward/logp metrics are judged against the log-probs' own scale."""
    assert set(metrics) == set(ref_metrics)
    scale = max(abs(float(ref_metrics["logps/chosen"])), abs(float(ref_metrics["logps/rejected"])))
    for k in ref_metrics:
        s = scale * (beta if k.startswith("rewards/") else 1.0) if k != "rewards/accuracies" else 0.0
        assert_close_scalar(metrics[k], ref_metrics[k], rel, k, scale=s)


def run_fused(batch: Batch, backend: str, dtype=None, ref_mode="hidden", cu=None, **opts):
    """fused_linear_preference_loss with grads; returns (out, {'hidden','weight','bias'} grads)."""
    dtype = dtype or batch.hidden.dtype
    h = batch.hidden.to(dtype).detach().requires_grad_(True)
    w = batch.weight.to(dtype).detach().requires_grad_(True)
    b = None if batch.bias is None else batch.bias.to(dtype).detach().requires_grad_(True)
    kwargs = dict(opts)
    if ref_mode == "hidden":
        kwargs.update(ref_hidden=batch.ref_hidden.to(dtype), ref_weight=batch.ref_weight.to(dtype))
        if b is not None:
            kwargs["ref_bias"] = b.detach()
    elif ref_mode is not None:
        kwargs["ref_logps"] = ref_mode
    out = sk.fused_linear_preference_loss(h, w, batch.labels, b, backend=backend, **kwargs)
    out.loss.backward()
    return out, {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def need_gpu_memory(gib: float) -> None:
    """Skip unless a CUDA device with about ``gib`` GiB of memory is present."""
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gib:
        pytest.skip(f"needs about {gib:.0f} GiB of GPU memory, the device has {total:.0f}")


# ---------------------------------------------------------------------------------------------
# poisoning, one step through the public API, the comparison against the float64 reference
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned_allocations():
    """Every float tensor made by ``torch.empty`` / ``empty_like`` / ``empty_strided`` (the Python-side
    allocations of every backend, gradient buffers included) starts as NaN: an entry a kernel never writes
    shows up as NaN in the results instead of as yesterday's memory."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoning(alloc):
        def wrapped(*args, **kwargs):
            t = alloc(*args, **kwargs)
            if t.is_floating_point() and t.numel():
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t
        return wrapped

    for name, alloc in originals.items():
        setattr(torch, name, poisoning(alloc))
    try:
        yield
    finally:
        for name, alloc in originals.items():
            setattr(torch, name, alloc)


def run_step(path: str, backend: str, inputs: Dict[str, Optional[torch.Tensor]], *, upcast: bool = False,
             inplace: bool = True, frozen: bool = False, poison: bool = False, device=None, **options):
    """One preference-loss step through the public API, then ``loss.backward()``.

    Args:
        path: ``"logits"`` (:func:`spo_kernels.preference_loss`) or ``"fused_linear"``
            (:func:`spo_kernels.fused_linear_preference_loss`).
        inputs: ``labels`` and ``cu_seqlens`` (None: padded); logits path ``logits`` ``[2P, T, V]`` /
            ``[N, V]`` and ``ref_logits`` (or None); fused-linear path ``hidden``, ``weight``, ``bias`` (or
            None), ``ref_hidden`` and ``ref_weight`` (or None); ``ref_logps [2P]`` (or None) on either path.
        upcast: run on float64 copies (the oracle, with ``backend="reference"``).
        inplace: the logits path's ``inplace_backward`` (the logits handed over are a non-leaf buffer the
            backward may overwrite; the gradient is read from the leaf they were made from).
        frozen: the head (weight, bias) takes no gradient.
        poison: run under :func:`poisoned_allocations`.
        device: run on this device (default: where the inputs are); the results come back on the CPU.
        options: further keyword arguments (loss options, ``spo_anchor``), float tensors upcast with the rest.
    Returns:
        ``(PreferenceLossOutput, grads)`` on the CPU: grads ``{"logits"}`` or ``{"hidden", "weight", "bias"}``,
        each the leaf's ``.grad`` (None where no gradient was asked).
    """
    def cast(t):
        if t is None:
            return None
        t = t if device is None else t.to(device)
        return t.double() if (upcast and t.is_floating_point()) else t

    out, grads = _step(path, backend, inputs, cast, inplace, frozen, poison, options)
    cpu = {k: None if v is None else v.cpu() for k, v in grads.items()}
    return PreferenceLossOutput(
        loss=out.loss.detach().cpu(), metrics={k: v.cpu() for k, v in out.metrics.items()},
        policy_logps=out.policy_logps.cpu(), ref_logps=None if out.ref_logps is None else out.ref_logps.cpu(),
        counts=out.counts.cpu()), cpu


def _step(path, backend, inputs, cast, inplace, frozen, poison, options):

    kw = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    kw.update(cu_seqlens=cast(inputs.get("cu_seqlens")), backend=backend)
    if inputs.get("ref_logps") is not None:
        kw["ref_logps"] = cast(inputs["ref_logps"])
    with poisoned_allocations() if poison else contextlib.nullcontext():
        if path == "logits":
            leaf = cast(inputs["logits"]).detach().clone().requires_grad_(True)
            logits = leaf * 1 if inplace else leaf  # a non-leaf buffer: in-place backward may overwrite it
            if inputs.get("ref_logits") is not None:
                kw["ref_logits"] = cast(inputs["ref_logits"])
            out = sk.preference_loss(logits, cast(inputs["labels"]), inplace_backward=inplace, **kw)
            out.loss.backward()
            return out, {"logits": leaf.grad}
        if path != "fused_linear":
            raise ValueError(f"path must be 'logits' or 'fused_linear', got {path!r}")
        h = cast(inputs["hidden"]).detach().clone().requires_grad_(True)
        w = cast(inputs["weight"]).detach().clone().requires_grad_(not frozen)
        b = inputs.get("bias")
        b = None if b is None else cast(b).detach().clone().requires_grad_(not frozen)
        if inputs.get("ref_hidden") is not None:
            kw.update(ref_hidden=cast(inputs["ref_hidden"]), ref_weight=cast(inputs["ref_weight"]),
                      ref_bias=None if b is None else b.detach())
        out = sk.fused_linear_preference_loss(h, w, cast(inputs["labels"]), b, **kw)
        out.loss.backward()
        return out, {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def loss_conditioning(want, cfg, anchor=None) -> float:
    """``sum_s |dloss/dL_s| |L_s|`` at the oracle's log-probs: how much a relative error of the per-sequence
    log-probs moves the loss (a loss near 0 is a difference of large terms)."""
    L = want.policy_logps.double().clone().requires_grad_(True)
    R = None if want.ref_logps is None else want.ref_logps.double()
    a = None
    if cfg.spo_lambda > 0:
        P = L.shape[0] // 2
        if anchor is not None:
            a = anchor.double()
        elif cfg.spo_normalize == "mean":
            a = R[:P] / want.counts[:P].clamp(min=1).double()
        else:
            a = R[:P]
    (g,) = torch.autograd.grad(reference_pair_loss(L, want.counts, R, cfg, a), L)
    return float((g.abs() * want.policy_logps.double().abs()).sum())


def assert_matches_reference(out, grads, want, want_grads, *, dtype, cfg, anchor=None, zero_rows=None):
    """SPEC 7: a backend's step (``run_step``) against the float64 oracle on the same inputs.

    Checks the loss (rel to the larger of the loss and :func:`loss_conditioning`), every metric (the same
    names, SPO ones only with SPO on; values against the size of the log-probs they are made of; the
    discontinuous ones exactly unless the oracle is at a tie), the counts, the per-sequence policy and
    reference log-probs, every gradient (dtype, presence, rel in norm), and that rows in ``zero_rows``
    (a bool mask over the gradient's leading rows: prompt, padding) get exactly 0. NaN never passes."""
    tol = TOL[dtype]
    loss, loss64 = float(out.loss.detach()), float(want.loss.detach())
    assert out.loss.dtype == torch.float32, f"loss dtype {out.loss.dtype}"
    assert loss == loss, "loss is NaN"
    cond = loss_conditioning(want, cfg, anchor)
    assert abs(loss - loss64) <= tol["loss"] * max(abs(loss64), cond) + 1e-7, f"loss {loss} vs {loss64} (cond {cond:.3g})"
    assert torch.equal(out.counts.cpu(), want.counts.cpu()), "counts"
    for name in ("policy_logps", "ref_logps"):
        got, exp = getattr(out, name), getattr(want, name)
        if exp is None:
            continue
        assert got is not None and torch.isfinite(got).all(), f"{name}: {got}"
        err = (got.double() - exp.double()).abs()
        assert bool((err <= tol["logp"] * exp.double().abs() + 1e-6).all()), f"{name}: {got} vs {exp}"
    _assert_metrics(out, want, cfg, anchor, tol["loss"])
    for name, exp in want_grads.items():
        got = grads[name]
        assert_grad_close(name, got, exp, dtype, tol["grad"])
        if exp is None:
            continue
        if zero_rows is not None and name in ("logits", "hidden"):
            rows = got.reshape(-1, got.shape[-1])[zero_rows.reshape(-1)]
            assert bool((rows == 0).all()), f"d{name} is not exactly 0 outside the completions"


def _assert_metrics(out, want, cfg, anchor, rel):
    assert set(out.metrics) == set(want.metrics), f"metric names {sorted(out.metrics)} vs {sorted(want.metrics)}"
    assert ("spo/penalty" in out.metrics) == (cfg.spo_lambda > 0), "SPO metrics exactly when SPO is on"
    L, n = want.policy_logps.double(), want.counts.clamp(min=1).double()
    R = torch.zeros_like(L) if want.ref_logps is None else want.ref_logps.double()
    P = L.shape[0] // 2
    # rewards are b (L - R) on summed log-probs for every loss type (TRL 1.16), R = 0 when reference_free
    size = float(L.abs().max() + R.abs().max())
    Rr = torch.zeros_like(R) if cfg.reference_free else R
    margins = cfg.beta * ((L[:P] - Rr[:P]) - (L[P:] - Rr[P:]))
    tie = bool((margins.abs() < 1e-4 * max(cfg.beta * size, 1e-6)).any())
    # the size of the log-probs each metric is made of: its error is a relative error of those
    scales = {"logps/chosen": float(L.abs().max()), "logps/rejected": float(L.abs().max()),
              "nll": float((L / n).abs().max())}
    if cfg.spo_lambda > 0:
        chosen = L[:P] / n[:P] if cfg.spo_normalize == "mean" else L[:P]
        a = anchor.double() if anchor is not None else (R[:P] / n[:P] if cfg.spo_normalize == "mean" else R[:P])
        scales["spo/penalty"] = float(chosen.abs().max() + a.abs().max())
        kink = bool(((a - chosen + cfg.spo_margin).abs() < 1e-4 * max(scales["spo/penalty"], 1e-6)).any())
    for name, exp in want.metrics.items():
        got, exp = float(out.metrics[name]), float(exp)
        assert got == got or exp != exp, f"{name}: NaN, expected {exp}"
        if name == "count/empty_completions" or (name == "rewards/accuracies" and not tie) or (
                name == "spo/active_fraction" and not kink):
            assert got == exp, f"{name}: {got} vs {exp}"
            continue
        if name in ("rewards/accuracies", "spo/active_fraction"):
            continue  # the oracle sits at a tie / the relu's kink: either side is right
        scale = cfg.beta * size if name.startswith("rewards/") else scales.get(name, size)
        assert abs(got - exp) <= 2 * rel * max(abs(exp), scale) + 1e-7, f"{name}: {got} vs {exp}"
