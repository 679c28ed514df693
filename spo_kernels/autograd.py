"""The autograd Functions: one per path, plus the closed-form loss node.

A preference step is ``seq_logps = <path Function>(...)`` followed by
``loss = ClosedFormLoss(seq_logps, step)``: the loss node's backward hands ``g_s = dloss/dL_s`` (computed
in forward, closed form) to the path's backward, which forms ``g_s * (onehot - softmax)`` per token.
No autograd graph over the vocabulary exists.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

from .backends import Backend
from .kernels.types import KernelOptions, LogitTransform
from .layout import TokenPlan


def autocast_off(device: torch.device):
    """A context with autocast off on ``device``'s type when it is on (else a no-op): the backends choose
    their own precisions (fp32 accumulation, fp32 GEMMs for 16-bit heads on CPU), which autocast would
    lower; the API casts the head's operands to the autocast dtype beforehand (SPEC 6)."""
    device_type = device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _storage_use_count(t: torch.Tensor) -> Optional[int]:
    """How many tensors (TensorImpls) hold ``t``'s storage, or None where torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None

    def refs(x):
        storage = x.untyped_storage()  # held while counting: its Python object may add a reference
        return count(storage._cdata)

    global _PROBE_REFS
    if _PROBE_REFS is None:  # what counting adds beyond the tensors, measured on a tensor of one
        probe = torch.empty(1)
        _PROBE_REFS = refs(probe) - 1
    return refs(t) - _PROBE_REFS


_PROBE_REFS: Optional[int] = None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def inplace_hazard(logits2d: torch.Tensor, source: Optional[torch.Tensor]) -> Optional[str]:
    """Why writing the gradient into ``logits2d`` could change a value someone else still reads (None:
    it cannot). ``source`` is the caller's tensor that ``logits2d`` was reshaped from, if still alive.

    The rule (SPEC 6): the buffer must be all of its storage (not a window of a larger buffer), without
    overlapping elements (an expanded, stride-0 tensor), not a leaf or a view of one (a parameter's
    values), and no tensor other than ``logits2d``, its view base and the caller's own tensor may hold
    that storage: another view of it, or a tensor an autograd node saved as its own output
    (``torch.exp(z)`` saves the result, as a separate tensor). The count of tensors on a storage is
    ``torch._C._storage_Use_Count`` (torch 2.x); without it only the structural checks apply.
    """
    if torch._debug_has_internal_overlap(logits2d) != 0:  # 1: overlap, 2: too hard to tell
        return "its elements overlap in memory (an expanded or stride-0 tensor)"
    if logits2d.storage_offset() != 0 or (
            logits2d.untyped_storage().nbytes() != logits2d.numel() * logits2d.element_size()):
        return "it is a window of a larger buffer that other tensors may still read"
    holders = []
    for t in (logits2d, logits2d._base, source, None if source is None else source._base):
        if t is not None and _same_storage(t, logits2d) and not any(t is h for h in holders):
            holders.append(t)
    if any(t.is_leaf and t.requires_grad for t in holders[1:]):
        return "it is (a view of) a leaf tensor: the caller's own values"
    users = _storage_use_count(logits2d)
    if users is not None and users > len(holders):
        return f"{users - len(holders)} other tensor(s) share its storage"
    return None


class LogitsSequenceLogprobs(torch.autograd.Function):
    """``logits [N, V] -> L [S]``. Backward writes dlogits into the logits buffer when ``inplace`` and that
    is safe (:func:`inplace_hazard`; a leaf is never overwritten), else into a new buffer.

    Either way the gradient is exact. An in-place write bumps the buffer's autograd version counter, so a
    node that saved those logits (``y ** 2`` on the same tensor) and runs its backward afterwards raises
    autograd's usual "modified by an inplace operation" error instead of reading the gradient as logits;
    logits changed in place between this forward and its backward are reported the same way.
    """

    @staticmethod
    def forward(ctx, logits, plan: TokenPlan, backend: Backend, transform: LogitTransform, options: KernelOptions,
                stats_sink: Optional[list] = None):
        """``stats_sink``: a list that receives the forward's :class:`TokenStats` (or None): the statistics are
        detached, so they leave beside the Function's one differentiable output."""
        logits2d = logits.reshape(plan.num_rows, logits.shape[-1])
        result = backend.logits_forward(logits2d, plan, transform, options)
        if stats_sink is not None:
            stats_sink.append(result.stats)
        # Held as attributes, not saved tensors: the in-place backward overwrites this buffer.
        ctx.logits2d, ctx.lse, ctx.plan = logits2d, result.lse, plan
        ctx.backend, ctx.transform = backend, transform
        # A leaf is the caller's own parameter: never overwritten. The rest is decided at backward time,
        # when it is known which tensors still share the buffer.
        ctx.inplace = options.inplace_backward and not logits.is_leaf
        ctx.source = weakref.ref(logits)
        ctx.version = logits2d._version
        ctx.shape = logits.shape
        return result.seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        logits2d = ctx.logits2d
        if logits2d is None:
            raise RuntimeError("the in-place logits backward ran already; its buffer now holds the gradient "
                               "(use inplace_backward=False to backpropagate twice)")
        if logits2d._version != ctx.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation: the logits given to the spo_kernels loss changed after its "
                               "forward (its backward reads them)")
        inplace = ctx.inplace and inplace_hazard(logits2d, ctx.source()) is None
        out = logits2d if inplace else torch.empty_like(logits2d)
        with autocast_off(logits2d.device):
            ctx.backend.logits_backward(logits2d, ctx.plan, ctx.transform, ctx.lse, grad_seq.contiguous(), out)
        if inplace:
            torch.autograd.graph.increment_version(logits2d)  # the buffer now holds the gradient
            ctx.logits2d = None
        return out.view(ctx.shape), None, None, None, None, None


class LinearSequenceLogprobs(torch.autograd.Function):
    """``hidden [N, H], weight [V, H], bias [V] -> L [S]``; backward recomputes logits per tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, backend: Backend, transform: LogitTransform,
                options: KernelOptions, stats_sink: Optional[list] = None):
        """``stats_sink``: as in :class:`LogitsSequenceLogprobs`."""
        hidden2d = hidden.reshape(plan.num_rows, hidden.shape[-1])
        result, extra = backend.linear_forward_for_backward(hidden2d, weight, bias, plan, transform, options)
        if stats_sink is not None:
            stats_sink.append(result.stats)
        ctx.save_for_backward(hidden2d, weight, bias, result.lse)
        ctx.extra = extra  # the backend's own extra for the first backward (it keeps no state itself)
        ctx.plan, ctx.backend, ctx.transform, ctx.options = plan, backend, transform, options
        ctx.shape = hidden.shape
        return result.seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        hidden2d, weight, bias, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        extra, ctx.extra = ctx.extra, None  # used once: a second backward (retain_graph) recomputes
        with autocast_off(hidden2d.device):
            grads = ctx.backend.linear_backward(
                hidden2d, weight, bias, ctx.plan, ctx.transform, ctx.options, lse, grad_seq.contiguous(),
                need_hidden=need_h, need_weight=need_w, need_bias=need_b and bias is not None, extra=extra)
        dh = grads.hidden.view(ctx.shape) if grads.hidden is not None else None
        return dh, grads.weight, grads.bias, None, None, None, None, None


class ClosedFormLoss(torch.autograd.Function):
    """``loss`` as a function of ``L [S]`` whose gradient ``g_s`` was computed in closed form."""

    @staticmethod
    def forward(ctx, seq_logps, loss, grad):
        ctx.save_for_backward(grad)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None
