"""The methods compared, each a ``step()`` doing one full step: policy fwd+bwd (+ reference fwd).

``step()`` returns ``{"loss": scalar, "grads": {name: tensor}}``; the leaves' ``.grad`` are reset
by the caller. Peers are optional imports: a missing package (or device) makes the method
unavailable (``Unavailable`` with a one-line reason), and the CLI says so instead of failing.

Every peer is called the way its users call it (../shared/PEERS.md), on the same inputs, with the
same loss: DPO sigmoid, beta 0.1, on summed completion log-probs. Methods that can run on a CPU do
(the CPU dry-run of the GPU harness goes through these same adapters): eager, compile, liger
(compiled=False), trl (its torch fallback), flce, flce_chunked, spo_*.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import spo_kernels as sk

from .workloads import BETA, dpo_sigmoid


# torch.compile's backend for "compile". The GPU harness's CPU dry runs set "aot_eager" (Dynamo's capture and
# AOT autograd, no code generation): inductor on a CPU builds C++, not the Triton code a GPU run measures (a
# dry run's compile row: 6 s with inductor, 4 s without). Every measuring run, CPU ones included, uses inductor.
COMPILE_BACKEND = os.environ.get("SPO_BENCH_COMPILE_BACKEND", "inductor")

# name -> what it is (the CLI lists these; ``build`` raises Unavailable for anything else).
METHODS = {
    "eager": "PyTorch eager, as TRL's DPOTrainer computed it before 1.x (full fp32 logits)",
    "compile": "torch.compile of eager",
    "liger": "Liger-Kernel LigerFusedLinearDPOLoss (compiled on CUDA, eager on CPU)",
    "cce": "Apple Cut Cross-Entropy, default (gradient filtering: approximate)",
    "cce_exact": "Apple Cut Cross-Entropy, exact gradients",
    "trl": "TRL 1.16 DPOTrainer's fused LM head (ChunkedLogProbFunction, as add_fused_lm_head calls it)",
    "flce": "torch F.linear_cross_entropy, reference path (options=None)",
    "flce_chunked": "torch F.linear_cross_entropy, chunked path (LinearCrossEntropyOptions())",
    "spo": "this package, backend auto-selected",
    "spo_triton": "this package, Triton backend",
    "spo_cpu": "this package, C++ CPU backend",
    "spo_torch": "this package, chunked PyTorch backend",
}


class Unavailable(Exception):
    """The method cannot run here (missing package or device)."""


def unknown_method(method: str, workload: str) -> str:
    """The reason given for a method name that is not in METHODS."""
    return f"unknown method {method!r} for the {workload} workload"


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
    return dpo_sigmoid(L, R)


def _eager_logits_loss(z, labels, ref_logps, S):
    # Packed [N, V] with equal-length sequences: view as padded [S, T, V] for the per-sequence sum.
    return dpo_sigmoid(eager_sequence_logps(z.view(S, -1, z.shape[-1]), labels.view(S, -1)), ref_logps)


# ---- peers' log-prob functions: (hidden [S, T, H], weight [V, H]) -> summed logps [S] -------------

def _liger_loss_fn(device):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed ({e})")
    # Liger's signature (0.8.5): (ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model,
    # average_log_prob, chunk_size, loss_type, ...); forward(lin_weight, _input, target, bias, ref_input,
    # ref_weight, ref_bias) -> (loss, aux). Summed log-probs (average_log_prob=False), one pair per chunk.
    # torch.compile of Liger's chunk function needs a GPU toolchain: eager on CPU.
    return LigerFusedLinearDPOLoss(beta=BETA, loss_type="sigmoid", compiled=device == "cuda", use_ref_model=True,
                                   average_log_prob=False, compute_nll_loss=False)


def _cce_logps(method, device, labels):
    if device != "cuda":
        raise Unavailable("cut-cross-entropy's kernels need CUDA")
    try:
        from cut_cross_entropy import LinearCrossEntropyImpl, linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy not installed ({e})")
    kwargs = {"impl": "cce"}
    if method == "cce_exact":
        # Releases that have the "cce_exact" implementation name it; before (25.1.x on PyPI), exact gradients are
        # impl="cce" with gradient filtering turned off (filter_eps=None).
        if hasattr(LinearCrossEntropyImpl, "CCE_EXACT"):
            kwargs = {"impl": "cce_exact"}
        else:
            kwargs = {"impl": "cce", "filter_eps": None}
    S, T = labels.shape
    mask = labels != -100
    flat = labels.reshape(-1)

    def logps(hh, ww):
        nll = linear_cross_entropy(hh.reshape(S * T, -1), ww, flat, ignore_index=-100, reduction="none", **kwargs)
        return -(nll.float().view(S, T) * mask).sum(-1)
    return logps


def _flce_logps(method, labels):
    from torch.torch_version import TorchVersion
    if TorchVersion(torch.__version__) < (2, 13) or not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"F.linear_cross_entropy needs torch >= 2.13; this is torch {torch.__version__}")
    options = None
    if method == "flce_chunked":
        from torch.nn import LinearCrossEntropyOptions
        # What a user writes to avoid full logits: the zero-argument options. "auto" resolves per (device, dtype):
        # CUDA bf16/fp16 -> acc_policy "compact" (fp32 accumulation, no dW scratch) with chunking "aspect_ratio:2"
        # (each chunk's [rows, V] logits about half the size of the [N, H] input); others -> the same fallback,
        # CPU bf16/fp16 -> "accurate" + "aspect_ratio".
        options = LinearCrossEntropyOptions()
    S, T = labels.shape
    mask = labels != -100
    flat = labels.reshape(-1)

    def logps(hh, ww):
        nll = F.linear_cross_entropy(hh.reshape(S * T, -1), ww, flat, reduction="none", ignore_index=-100,
                                     options=options)
        # Per-token NLL in the input dtype; the per-sequence sum in fp32 (as TRL sums fp32 log-probs).
        return -(nll.float().view(S, T) * mask).sum(-1)
    return logps


def _trl_logps(labels, compact=None):
    """TRL 1.16's fused LM head, called as ``trl.trainer.utils.add_fused_lm_head``'s patched forward calls it for
    ``DPOTrainer._compute_loss`` (policy) and its reference forward. ``compact`` (tests only) forces TRL's
    Triton-device layout (completion positions only) or its CPU layout (every position); None follows TRL."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    except ImportError as e:
        raise Unavailable(f"trl not installed ({e})")
    try:
        # ChunkedLogProbFunction.backward imports trl.trainer.utils (maybe_gather_lm_head_ctx), which imports
        # accelerate, datasets, pandas, ...: without them the forward runs and the backward fails. Check now.
        trl_utils = importlib.import_module("trl.trainer.utils")
    except ImportError as e:
        raise Unavailable(f"trl's fused head backward imports trl.trainer.utils, which needs {e.name or e} "
                          f"(not installed)")
    import trl
    if not trl.__version__.startswith("1.16."):
        raise Unavailable(f"the trl peer mirrors trl 1.16's DPOTrainer; this is trl {trl.__version__}")
    chunk_size = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE  # 32768 vocabulary columns per tile
    # DPOTrainer.__init__ (use_weighting off): the policy's head computes these per-token outputs (entropy, mean
    # logit and top-1 feed its logged metrics); the reference's head is installed with the default, log-probs only.
    policy_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    ref_outputs = ("log_probs",)
    # DPOTrainer passes labels = input_ids with -100 outside the completion; our labels are already aligned to
    # positions (the head's shift `hidden[:, :-1]`, `labels[:, 1:]` is done), and mask = labels != -100.
    mask = labels != -100
    temperature, softcap, logit_scale = 1.0, None, 1.0  # DPOTrainer's defaults; no softcap/scale on Llama heads

    def logps(hh, ww, outputs):
        # On Triton devices (CUDA/XPU) TRL scores only the positions with a label (compact); elsewhere (CPU) every
        # position, prompt included, with clamped labels, and masks afterwards.
        packed = _use_triton(hh.device) if compact is None else compact
        with trl_utils.maybe_gather_lm_head_ctx(ww, None):
            per_token = ChunkedLogProbFunction.apply(
                hh[mask] if packed else hh.reshape(-1, hh.size(-1)),
                ww,
                None,
                labels[mask] if packed else labels.clamp(min=0).reshape(-1),
                temperature,
                chunk_size,
                softcap,
                logit_scale,
                outputs,
            )
        if packed:
            per_token = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token]
        else:
            per_token = [None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in per_token]
        return per_token[0].sum(dim=1)  # DPOTrainer: per_token_logps.sum(dim=1) (ld_alpha None)

    def policy(hh, ww):
        return logps(hh, ww, policy_outputs)

    def reference(hh, ww):
        return logps(hh, ww, ref_outputs)
    return policy, reference


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


def _logps_step(policy, reference, h, W, rh, rW):
    """Policy log-probs with grad, reference under no_grad, the DPO sigmoid loss, backward."""
    def step():
        L = policy(h, W)
        with torch.no_grad():
            R = reference(rh, rW)
        loss = dpo_sigmoid(L.float(), R.float())
        loss.backward()
        return {"loss": loss.detach(), "grads": {"hidden": h.grad, "weight": W.grad}}
    return step


def _build_linear(method, inp, device, h, W):
    labels, rh, rW = inp["labels"], inp["ref_hidden"], inp["ref_weight"]
    grads = lambda: {"hidden": h.grad, "weight": W.grad}  # noqa: E731

    if method in ("eager", "compile"):
        fn = _eager_linear_loss
        if method == "compile":
            fn = torch.compile(_eager_linear_loss, backend=COMPILE_BACKEND)

        def step():
            loss = fn(h, W, labels, rh, rW)
            loss.backward()
            return {"loss": loss.detach(), "grads": grads()}
        return step

    if method == "spo" or method.startswith("spo_"):
        backend = None if method == "spo" else method.split("_", 1)[1]

        def step():
            out = sk.fused_linear_preference_loss(h, W, labels, ref_hidden=rh, ref_weight=rW, beta=BETA,
                                                  backend=backend)
            out.loss.backward()
            return {"loss": out.loss.detach(), "grads": grads()}
        return step

    if method == "liger":
        loss_fn = _liger_loss_fn(device)

        def step():
            loss, _aux = loss_fn(W, h, labels, None, ref_input=rh, ref_weight=rW)
            loss.backward()
            return {"loss": loss.detach(), "grads": grads()}
        return step

    if method in ("cce", "cce_exact"):
        logps = _cce_logps(method, device, labels)
        return _logps_step(logps, logps, h, W, rh, rW)

    if method in ("flce", "flce_chunked"):
        logps = _flce_logps(method, labels)
        return _logps_step(logps, logps, h, W, rh, rW)

    if method == "trl":
        policy, reference = _trl_logps(labels)
        return _logps_step(policy, reference, h, W, rh, rW)

    raise Unavailable(unknown_method(method, "linear"))


def _logits_source(buf):
    """``produce()`` returns ``buf`` as the non-leaf output of an autograd node, as a model's LM head
    returns its logits (a leaf would take the out-of-place backward: SPEC 6), and ``sink["logits"]``
    receives the gradient that reaches it (the logits buffer itself after an in-place backward)."""
    sink = {}
    anchor = torch.zeros((), device=buf.device, requires_grad=True)

    class _Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return buf

        @staticmethod
        def backward(ctx, grad):
            sink["logits"] = grad
            return torch.zeros((), device=grad.device)

    return (lambda: _Head.apply(anchor)), sink, anchor


def _build_logits(method, inp, device):
    buf = inp["logits"]
    produce, sink, anchor = _logits_source(buf)
    labels, cu, ref = inp["labels"], inp["cu_seqlens"], inp["ref_logps"]
    S = cu.shape[0] - 1

    def finish(loss, step):
        loss.backward()
        g = sink.pop("logits")
        # after an in-place backward the logits are gone: the worker draws them again (untimed)
        step.inplace = g.data_ptr() == buf.data_ptr()
        return {"loss": loss.detach(), "grads": {"logits": g}}

    if method in ("eager", "compile"):
        fn = _eager_logits_loss if method == "eager" else torch.compile(_eager_logits_loss, backend=COMPILE_BACKEND)

        def step():
            return finish(fn(produce(), labels, ref, S), step)
        step.leaves, step.logits, step.inplace = [anchor], buf, False
        return step

    if method == "spo" or method.startswith("spo_"):
        backend = None if method == "spo" else method.split("_", 1)[1]

        def step():
            out = sk.preference_loss(produce(), labels, cu_seqlens=cu, ref_logps=ref, beta=BETA, backend=backend)
            return finish(out.loss, step)
        step.leaves, step.logits, step.inplace = [anchor], buf, False
        return step

    if method in METHODS:
        raise Unavailable(f"{method} has no logits-path form (it takes hidden states and the head)")
    raise Unavailable(unknown_method(method, "logits"))
