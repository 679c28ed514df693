"""The methods compared, each a ``step()`` doing one full step: policy fwd+bwd (+ reference fwd).

``step()`` returns ``{"loss": scalar, "grads": {name: tensor}}``; the leaves' ``.grad`` are reset
by the caller. Peers are optional imports: a missing package makes the method unavailable, and the
CLI says so instead of failing.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import spo_kernels as sk

BETA = 0.1


class Unavailable(Exception):
    """The method cannot run here (missing package or device)."""


def _dpo_sigmoid(L, R):
    P = L.shape[0] // 2
    D = (L[:P] - R[:P]) - (L[P:] - R[P:])
    return -F.logsigmoid(BETA * D).mean()


# ---- eager PyTorch, as TRL's DPOTrainer computes it ---------------------------------------------

def eager_sequence_logps(logits, labels):
    """TRL's way: fp32 upcast of the whole ``[.., V]`` logits, log_softmax, gather, mask, sum."""
    mask = labels != -100
    logp = logits.float().log_softmax(-1)
    tok = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def _eager_linear_loss(h, W, labels, rh, rW):
    L = eager_sequence_logps(h @ W.t(), labels)
    with torch.no_grad():
        R = eager_sequence_logps(rh @ rW.t(), labels)
    return _dpo_sigmoid(L, R)


def _eager_logits_loss(z, labels, ref_logps, S):
    # Packed [N, V] with equal-length sequences: view as padded [S, T, V] for the per-sequence sum.
    return _dpo_sigmoid(eager_sequence_logps(z.view(S, -1, z.shape[-1]), labels.view(S, -1)), ref_logps)


# ---- builders -----------------------------------------------------------------------------------

def build(method: str, workload: str, inp: dict, device: str) -> Callable[[], Dict]:
    """The method's step; ``step.leaves`` are the tensors it accumulates ``.grad`` into and
    ``step.refresh()`` (if present) restores inputs a step overwrote."""
    if workload == "linear":
        h = inp["hidden"].detach().requires_grad_(True)
        W = inp["weight"].detach().requires_grad_(True)
        step = _build_linear(method, inp, device, h, W)
        step.leaves = [h, W]
    else:
        step = _build_logits(method, inp, device)
    return step


def _build_linear(method, inp, device, h, W):
    labels, rh, rW = inp["labels"], inp["ref_hidden"], inp["ref_weight"]
    grads = lambda: {"hidden": h.grad, "weight": W.grad}  # noqa: E731

    if method in ("eager", "compile"):
        fn = _eager_linear_loss
        if method == "compile":
            fn = torch.compile(_eager_linear_loss)

        def step():
            loss = fn(h, W, labels, rh, rW)
            loss.backward()
            return {"loss": loss.detach(), "grads": grads()}
        return step

    if method.startswith("spo"):
        backend = None if method == "spo" else method.split("_", 1)[1]

        def step():
            out = sk.fused_linear_preference_loss(h, W, labels, ref_hidden=rh, ref_weight=rW, beta=BETA,
                                                  backend=backend)
            out.loss.backward()
            return {"loss": out.loss.detach(), "grads": grads()}
        return step

    if method == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})")
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, loss_type="sigmoid", compiled=device == "cuda",
                                          use_ref_model=True)

        def step():
            loss, _aux = loss_fn(W, h, labels, None, ref_input=rh, ref_weight=rW)
            loss.backward()
            return {"loss": loss.detach(), "grads": grads()}
        return step

    if method in ("cce", "cce_exact"):
        if device != "cuda":
            raise Unavailable("cut-cross-entropy's kernels need CUDA")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise Unavailable(f"cut-cross-entropy not installed ({e})")
        impl = "cce_exact" if method == "cce_exact" else "cce"
        S, T = labels.shape
        mask = labels != -100

        def logps(hh, ww):
            nll = linear_cross_entropy(hh.reshape(S * T, -1), ww, labels.reshape(-1), reduction="none", impl=impl)
            return -(nll.view(S, T) * mask).sum(-1)

        def step():
            L = logps(h, W)
            with torch.no_grad():
                R = logps(rh, rW)
            loss = _dpo_sigmoid(L.float(), R.float())
            loss.backward()
            return {"loss": loss.detach(), "grads": grads()}
        return step

    raise Unavailable(f"unknown method {method!r} for the linear workload")


def _build_logits(method, inp, device):
    pristine = inp["logits"]
    z = pristine.clone().requires_grad_(True)
    leaves = [z]
    labels, cu, ref = inp["labels"], inp["cu_seqlens"], inp["ref_logps"]
    S = cu.shape[0] - 1

    def refresh():
        # The in-place backward leaves the gradient in the logits buffer: restore the logits
        # before the next step (outside the timed region, see worker.py).
        with torch.no_grad():
            z.copy_(pristine)

    if method in ("eager", "compile"):
        fn = _eager_logits_loss if method == "eager" else torch.compile(_eager_logits_loss)

        def step():
            loss = fn(z, labels, ref, S)
            loss.backward()
            return {"loss": loss.detach(), "grads": {"logits": z.grad}}
        step.refresh, step.leaves = refresh, leaves
        return step

    if method.startswith("spo"):
        backend = None if method == "spo" else method.split("_", 1)[1]

        def step():
            out = sk.preference_loss(z, labels, cu_seqlens=cu, ref_logps=ref, beta=BETA, backend=backend)
            out.loss.backward()
            return {"loss": out.loss.detach(), "grads": {"logits": z.grad}}
        step.refresh, step.leaves = refresh, leaves
        return step

    raise Unavailable(f"unknown method {method!r} for the logits workload")
