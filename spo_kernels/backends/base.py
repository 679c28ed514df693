"""The backend interface, written once: the ops every backend implements on a token plan.

Every backend implements the ops below on a :class:`~spo_kernels.layout.TokenPlan` (only the
completion tokens, compacted; ``plan.token_weights [Nc]`` fp32 or None). Two parameter objects travel
with every call (``spo_kernels.kernels.types``): ``transform`` a :class:`LogitTransform` (multiplier,
softcap, temperature: SPEC 2) and ``options`` a :class:`KernelOptions` (in-place backward, determinism,
gradient filter, per-token statistics). Log-probs and LSEs are fp32 (float64 for float64 inputs); the
per-sequence sums ``seq_logps`` are float64 on every backend (SPEC 7: a DPO loss is a function of
differences of large sums, and fp32 sums of 8k log-probs cost ~5e-4 of it), the loss step computes in
the precision it is given (float64) and the public outputs are fp32.

- ``logits_forward(logits [N,V], plan, transform, options) -> LogprobResult`` (``seq_logps [S]`` float64
  ``= sum_t w_t logp_t``, ``lse [Nc]``, ``stats``: :class:`TokenStats` ``[Nc]`` when
  ``options.token_stats`` else None).
- ``logits_backward(logits [N,V], plan, transform, lse [Nc], grad_seq [S], out [N,V])``: writes
  ``grad_seq[s] * w_t * (onehot(y) - softmax(z)) * dz/dlogits`` into ``out`` for plan rows and 0
  elsewhere; ``out`` may be ``logits`` itself (in-place backward).
- ``linear_forward(hidden [N,H], weight [V,H], bias [V]|None, plan, transform, options, save_lse)
  -> LogprobResult`` (``lse`` None unless ``save_lse``).
- ``linear_forward_for_backward(hidden, weight, bias, plan, transform, options) -> (LogprobResult, extra)``:
  the forward of a differentiable call (``lse`` saved); ``extra`` is anything else this backend's backward
  can use (None by default), owned by the caller's autograd Function and handed back once.
- ``linear_backward(hidden, weight, bias, plan, transform, options, lse, grad_seq, need_hidden, need_weight,
  need_bias, extra=None) -> LinearGrads`` (``dhidden [N,H]`` in hidden's dtype, zero on ignored rows;
  ``dweight``/``dbias`` accumulated in fp32 and returned in the parameter's dtype; None when not needed).
  ``options.deterministic`` asks for bitwise-identical results across runs; ``options.grad_filter_eps > 0``
  lets a backend skip vocabulary tiles whose ``|onehot - softmax|`` is below eps everywhere (approximate,
  opt-in; backends without a filter compute exactly).
- ``loss_step(policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None, seq_stats=None) -> LossStep``:
  the closed-form loss of :func:`spo_kernels.losses.preference_loss_step` (loss, ``grad = dloss/dL_s``,
  metrics); ``seq_stats`` a :class:`spo_kernels.output.SequenceStats` (per-sequence sums of the token
  statistics, float64) or None.

A backend whose ops are plain differentiable torch code sets ``autograd = True`` (the ``reference``
backend): the public functions then call its forward ops and its ``loss_step`` on tensors that keep
their autograd graph, and autograd differentiates them; it implements no backward op, its forward ops
may return ``None`` for the LSEs, and its ``loss_step`` returns a differentiable ``loss`` with
``grad=None``. Otherwise (``autograd = False``) the forward ops run inside the autograd Functions of
:mod:`spo_kernels.autograd` and the gradient is the closed form of the backward ops and ``loss_step``.
"""

from __future__ import annotations


from ..kernels.types import (KernelOptions, LinearGrads,  # noqa: F401  (re-exported)
                             LogitTransform, LogprobResult, TokenStats)
from ..losses import preference_loss_step


class Backend:
    """Base class: the loss step is shared; the log-prob ops are each backend's own."""

    name = "base"
    # True: the ops are differentiable torch code that autograd differentiates (no backward ops, no
    # closed-form gradient); see the module docstring.
    autograd = False

    def loss_step(self, policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None, seq_stats=None):
        return preference_loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta, seq_stats=seq_stats)

    def logits_forward(self, logits, plan, transform: LogitTransform, options: KernelOptions) -> LogprobResult:
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def logits_backward(self, logits, plan, transform: LogitTransform, lse, grad_seq, out) -> None:
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def linear_forward(self, hidden, weight, bias, plan, transform: LogitTransform, options: KernelOptions,
                       save_lse: bool) -> LogprobResult:
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")

    def linear_backward(self, hidden, weight, bias, plan, transform: LogitTransform, options: KernelOptions,
                        lse, grad_seq, need_hidden, need_weight, need_bias, extra=None) -> LinearGrads:
        """``extra``: what this backend's ``linear_forward_for_backward`` returned beside the result (None
        for backends that return nothing more, or on a second backward)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")

    def linear_forward_for_backward(self, hidden, weight, bias, plan, transform: LogitTransform,
                                    options: KernelOptions):
        """The forward of a differentiable call: ``(LogprobResult with lse, extra)``. ``extra`` is anything
        else this backend's backward can use (None here); the caller's autograd Function owns it and hands
        it to ``linear_backward(..., extra=extra)`` once, so a backend keeps no state between calls."""
        return self.linear_forward(hidden, weight, bias, plan, transform, options, save_lse=True), None
