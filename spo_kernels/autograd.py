"""The autograd Functions: one per path, plus the closed-form loss node.

A preference step is ``seq_logps = <path Function>(...)`` followed by
``loss = ClosedFormLoss(seq_logps, step)``: the loss node's backward hands ``g_s = dloss/dL_s`` (computed
in forward, closed form) to the path's backward, which forms ``g_s * (onehot - softmax)`` per token.
No autograd graph over the vocabulary exists.
"""

from __future__ import annotations

import torch

from .backends import Backend
from .layout import TokenPlan


class LogitsSequenceLogprobs(torch.autograd.Function):
    """``logits [N, V] -> L [S]``. Backward writes dlogits into the logits buffer when ``inplace``."""

    @staticmethod
    def forward(ctx, logits, plan: TokenPlan, backend: Backend, softcap, temperature, inplace: bool):
        logits2d = logits.reshape(plan.num_rows, logits.shape[-1])
        seq, lse = backend.logits_forward(logits2d, plan, softcap, temperature)
        # Held as attributes, not saved tensors: the in-place backward overwrites this buffer.
        ctx.logits2d, ctx.lse, ctx.plan = logits2d, lse, plan
        ctx.backend, ctx.softcap, ctx.temperature, ctx.inplace = backend, softcap, temperature, inplace
        ctx.shape = logits.shape
        return seq

    @staticmethod
    def backward(ctx, grad_seq):
        logits2d = ctx.logits2d
        if logits2d is None:
            raise RuntimeError("the in-place logits backward ran already; its buffer now holds the gradient "
                               "(use inplace_backward=False to backpropagate twice)")
        out = logits2d if ctx.inplace else torch.empty_like(logits2d)
        ctx.backend.logits_backward(logits2d, ctx.plan, ctx.softcap, ctx.temperature, ctx.lse,
                                    grad_seq.contiguous(), out)
        if ctx.inplace:
            ctx.logits2d = None
        return out.view(ctx.shape), None, None, None, None, None


class LinearSequenceLogprobs(torch.autograd.Function):
    """``hidden [N, H], weight [V, H], bias [V] -> L [S]``; backward recomputes logits per tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TokenPlan, backend: Backend, softcap, temperature,
                deterministic: bool = False, grad_filter_eps: float = 0.0):
        hidden2d = hidden.reshape(plan.num_rows, hidden.shape[-1])
        seq, lse = backend.linear_forward(hidden2d, weight, bias, plan, softcap, temperature, save_lse=True)
        ctx.save_for_backward(hidden2d, weight, bias, lse)
        ctx.plan, ctx.backend, ctx.softcap, ctx.temperature = plan, backend, softcap, temperature
        ctx.deterministic, ctx.grad_filter_eps = deterministic, grad_filter_eps
        ctx.shape = hidden.shape
        return seq

    @staticmethod
    def backward(ctx, grad_seq):
        hidden2d, weight, bias, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = ctx.backend.linear_backward(
            hidden2d, weight, bias, ctx.plan, ctx.softcap, ctx.temperature, lse, grad_seq.contiguous(),
            need_hidden=need_h, need_weight=need_w, need_bias=need_b and bias is not None,
            deterministic=ctx.deterministic, grad_filter_eps=ctx.grad_filter_eps)
        dh = grads.hidden.view(ctx.shape) if grads.hidden is not None else None
        return dh, grads.weight, grads.bias, None, None, None, None, None, None


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
