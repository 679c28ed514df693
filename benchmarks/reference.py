"""The float64 reference every benchmarked method is checked against, computed on the benchmark's device.

Independent of the package: plain PyTorch autograd in float64 (``log_softmax``, ``gather``), never the
closed-form gradient or any spo_kernels code. Chunked over rows, so neither ``[N, V]`` logits nor a
float64 copy of a ``[N, V]`` input ever exists: at most ``chunk_rows x V`` float64 logits at a time.

Two passes (the loss couples sequences, so the per-sequence gradient is needed before the token ones):
1. without grad: the policy's and reference's summed completion log-probs ``L_s``, ``R_s``;
2. the DPO sigmoid loss on ``L`` with autograd gives ``g_s = dloss/dL_s``; then per chunk,
   ``(g[seq] * logp).sum().backward()`` through float64 autograd gives the exact gradients of the
   chunk's rows (and accumulates dW).

Only sampled rows of each gradient are kept (``sample_rows``): the comparison is a relative error in
norm over the same sampled rows of the method's gradient, prompt rows included (their gradient is 0).
"""

from __future__ import annotations

import time

import torch

from .workloads import Shape, dpo_sigmoid, make_inputs

SAMPLE_ROWS = 512
CHUNK_BYTES = 2 ** 31  # float64 logits (with log-softmax and gradient) per chunk


def sample_rows(n: int, seed: int = 1234, k: int = SAMPLE_ROWS) -> torch.Tensor:
    """The rows of an ``[n, ...]`` gradient that are compared (the same in every process), sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(n, k)].sort().values


def _chunks(n: int, V: int):
    step = max(1, CHUNK_BYTES // (8 * V * 3))  # logits, log-softmax and their gradient in float64
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _token_logps(z64: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return z64.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _seq_sums(rows_fn, idx, seq, targets, S, V, device):
    L = torch.zeros(S, dtype=torch.float64, device=device)
    top = 0
    with torch.no_grad():
        for a, b in _chunks(idx.numel(), V):
            z = rows_fn(idx[a:b])
            L.index_add_(0, seq[a:b], _token_logps(z, targets[a:b]))
            top += int((z.softmax(-1).amax(-1) > 0.9).sum())
    return L, top


def compute(shape: Shape, device) -> dict:
    """The float64 loss, per-sequence log-probs and sampled gradient rows for ``make_inputs(shape)``.

    Returns ``{"loss": float, "L": [S] list, "R": [S] list, "grads": {name: fp32 CPU tensor of the
    sampled rows}, "rows": {name: sampled row indices}, "top_prob_share": share of completion tokens
    whose top probability exceeds 0.9, "seconds": wall time}``.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    inp = make_inputs(shape, device)
    S, V = 2 * shape.P, shape.V
    labels = inp["labels"].reshape(-1)
    idx = (labels != -100).nonzero().squeeze(1)          # completion rows of the flattened [N, ...]
    T = shape.T
    seq = torch.div(idx, T, rounding_mode="floor")       # equal-length sequences in both workloads
    targets = labels[idx]
    out = {"grads": {}, "rows": {}}

    if shape.workload == "linear":
        H = shape.H
        h = inp["hidden"].reshape(-1, H)
        W64 = inp["weight"].double()
        rW64 = inp["ref_weight"].double()
        rh = inp["ref_hidden"].reshape(-1, H)
        L, top = _seq_sums(lambda r: h[r].double() @ W64.t(), idx, seq, targets, S, V, device)
        R, _ = _seq_sums(lambda r: rh[r].double() @ rW64.t(), idx, seq, targets, S, V, device)
        del rW64
        L_leaf = L.clone().requires_grad_(True)
        loss = dpo_sigmoid(L_leaf, R)
        loss.backward()
        g = L_leaf.grad
        W64.requires_grad_(True)
        dh = torch.zeros(h.shape[0], H, dtype=torch.float64, device=device)
        for a, b in _chunks(idx.numel(), V):
            hc = h[idx[a:b]].double().requires_grad_(True)
            (g[seq[a:b]] * _token_logps(hc @ W64.t(), targets[a:b])).sum().backward()
            dh[idx[a:b]] = hc.grad
        rows_h, rows_w = sample_rows(h.shape[0]), sample_rows(V)
        out["grads"] = {"hidden": dh[rows_h.to(device)].float().cpu(), "weight": W64.grad[rows_w.to(device)].float().cpu()}
        out["rows"] = {"hidden": rows_h, "weight": rows_w}
    else:
        z = inp["logits"]
        R = inp["ref_logps"].double()
        L, top = _seq_sums(lambda r: z[r].double(), idx, seq, targets, S, V, device)
        L_leaf = L.clone().requires_grad_(True)
        loss = dpo_sigmoid(L_leaf, R)
        loss.backward()
        g = L_leaf.grad
        rows = sample_rows(z.shape[0])
        row_is_plan = torch.full((z.shape[0],), -1, dtype=torch.int64, device=device)
        row_is_plan[idx] = torch.arange(idx.numel(), device=device)
        dz = torch.zeros(rows.numel(), V, dtype=torch.float64, device=device)
        k = row_is_plan[rows.to(device)]
        sel = (k >= 0).nonzero().squeeze(1)
        if sel.numel():
            zz = z[rows.to(device)[sel]].double().requires_grad_(True)
            (g[seq[k[sel]]] * _token_logps(zz, targets[k[sel]])).sum().backward()
            dz[sel] = zz.grad
        out["grads"] = {"logits": dz.float().cpu()}
        out["rows"] = {"logits": rows}
    out.update(loss=float(loss), L=L.tolist(), R=R.tolist(), top_prob_share=top / max(idx.numel(), 1),
               seconds=time.perf_counter() - t0)
    return out


def compare(result_loss: float, grads: dict, ref: dict) -> dict:
    """Relative errors of a method against the reference: ``|loss - ref| / |ref|`` and, per gradient,
    ``||g - ref|| / ||ref||`` over the sampled rows (inf when anything is not finite: NaN never passes)."""
    errors = {"loss": abs(result_loss - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
              if result_loss == result_loss else float("inf")}
    for name, r in ref["grads"].items():
        g = grads.get(name)
        if g is None:
            errors[name] = float("inf")
            continue
        g = g.detach().reshape(-1, g.shape[-1])  # padded [S, T, H] gradients as the flattened rows
        g = g[ref["rows"][name].to(g.device)].double().cpu()
        if not torch.isfinite(g).all():
            errors[name] = float("inf")
            continue
        r = r.double()
        errors[name] = float((g - r).norm() / r.norm().clamp_min(1e-300))
    return errors
