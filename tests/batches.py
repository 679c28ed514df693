"""Fresh random preference batches for tests, in both layouts, with a float64 oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import spo_kernels as sk


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


def packed_lengths(labels: torch.Tensor, ignore_index=-100):
    """Shortest prefix of each row that keeps every completion token (drops trailing padding)."""
    out = []
    for row in labels:
        idx = (row != ignore_index).nonzero()
        out.append(int(idx[-1]) + 1 if len(idx) else 1)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm; NaN anywhere gives inf (NaN never passes)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


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
