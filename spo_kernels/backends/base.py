"""The backend interface, written once: the ops every backend implements on a token plan.

Every backend implements the ops below on a :class:`~spo_kernels.layout.TokenPlan` (only the
completion tokens, compacted). Log-probs and LSEs are fp32 (float64 for float64 inputs); the
per-sequence sums ``seq_logps`` are float64 on every backend (SPEC 7: a DPO loss is a function of
differences of large sums, and fp32 sums of 8k log-probs cost ~5e-4 of it), the loss step computes in
the precision it is given (float64) and the public outputs are fp32.

- ``logits_forward(logits [N,V], plan, softcap, temperature) -> (seq_logps [S], lse [Nc])``
- ``logits_backward(logits [N,V], plan, softcap, temperature, lse [Nc], grad_seq [S], out [N,V])``:
  writes ``grad_seq[s] * (onehot(y) - softmax(z)) * dz/dlogits`` into ``out`` for plan rows and 0
  elsewhere; ``out`` may be ``logits`` itself (in-place backward).
- ``linear_forward(hidden [N,H], weight [V,H], bias [V]|None, plan, softcap, temperature, save_lse)
  -> (seq_logps [S], lse [Nc] or None)``
- ``linear_backward(hidden, weight, bias, plan, softcap, temperature, lse, grad_seq, need_hidden,
  need_weight, need_bias, deterministic=False, grad_filter_eps=0.0) -> LinearGrads`` (``dhidden [N,H]``
  in hidden's dtype, zero on ignored rows; ``dweight``/``dbias`` accumulated in fp32 and returned in the
  parameter's dtype; None when not needed).
- ``loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta) -> LossStep``: the closed-form
  loss of :func:`spo_kernels.losses.preference_loss_step` (loss, ``grad = dloss/dL_s``, metrics).

  ``deterministic=True`` asks for bitwise-identical results across runs; ``grad_filter_eps > 0`` lets a
  backend skip vocabulary tiles whose ``|onehot - softmax|`` is below eps everywhere (approximate,
  opt-in; backends without a filter compute exactly).

A backend whose ops are plain differentiable torch code sets ``autograd = True`` (the ``reference``
backend): the public functions then call its forward ops and its ``loss_step`` on tensors that keep
their autograd graph, and autograd differentiates them; it implements no backward op, its forward ops
may return ``None`` for the LSEs, and its ``loss_step`` returns a differentiable ``loss`` with
``grad=None``. Otherwise (``autograd = False``) the forward ops run inside the autograd Functions of
:mod:`spo_kernels.autograd` and the gradient is the closed form of the backward ops and ``loss_step``.
"""

from __future__ import annotations

from ..kernels.types import LinearGrads  # noqa: F401  (defined in the bottom layer, re-exported here)
from ..losses import preference_loss_step


class Backend:
    """Base class: the loss step is shared; the four log-prob ops are each backend's own."""

    name = "base"
    # True: the ops are differentiable torch code that autograd differentiates (no backward ops, no
    # closed-form gradient); see the module docstring.
    autograd = False

    def loss_step(self, policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None):
        return preference_loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta)

    def logits_forward(self, logits, plan, softcap, temperature):
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def logits_backward(self, logits, plan, softcap, temperature, lse, grad_seq, out):
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def linear_forward(self, hidden, weight, bias, plan, softcap, temperature, save_lse):
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")

    def linear_backward(self, hidden, weight, bias, plan, softcap, temperature, lse, grad_seq,
                        need_hidden, need_weight, need_bias, deterministic=False, grad_filter_eps=0.0,
                        extra=None):
        """``extra``: what this backend's ``linear_forward_for_backward`` returned beside the LSE (None for
        backends that return nothing more, or on a second backward)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")

    def linear_forward_for_backward(self, hidden, weight, bias, plan, softcap, temperature):
        """The forward of a differentiable call: ``(seq_logps, lse, extra)``. ``extra`` is anything else
        this backend's backward can use (None here); the caller's autograd Function owns it and hands
        it to ``linear_backward(..., extra=extra)`` once, so a backend keeps no state between calls."""
        seq, lse = self.linear_forward(hidden, weight, bias, plan, softcap, temperature, save_lse=True)
        return seq, lse, None
