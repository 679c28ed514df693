"""Public functions: validate (SPEC 7, checks in :mod:`.checks`), build the token plan, dispatch to a backend.

Shapes (SPEC 6): padded ``[S, T, ...]`` with labels ``[S, T]``, or packed ``[N, ...]`` with labels
``[N]`` and ``cu_seqlens [S+1]`` int32. For the preference losses S = 2P: rows ``0..P-1`` are the
chosen sequences, ``P..2P-1`` the rejected ones, pair i = (i, P+i).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .autograd import ClosedFormLoss, LinearSequenceLogprobs, LogitsSequenceLogprobs, autocast_off
from .backends import Backend, get_backend, resolve_backend_name
from .checks import (check_bco_delta, check_devices, check_ignore_index, check_kernel_options, check_linear,
                     check_logits, check_per_seq, check_ref_linear, check_ref_logits, check_transform)
from .config import PreferenceLossConfig, config_type_error
from .kernels.types import KernelOptions, LogitTransform, TokenStats
from .layout import TokenPlan, build_plan
from .output import PreferenceLossOutput, SequenceLogprobs, SequenceStats

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# configuration and anchor
# ---------------------------------------------------------------------------------------------

def _resolve_config(config: Optional[PreferenceLossConfig], options: dict) -> PreferenceLossConfig:
    if config is None:
        return PreferenceLossConfig(**options)
    if not isinstance(config, PreferenceLossConfig):
        raise TypeError(config_type_error(config))
    return config.replace(**options) if options else config


def _resolve_anchor(spo_anchor, cfg: PreferenceLossConfig, P: int, device):
    """Returns (config with the anchor kind, anchor tensor or None when it comes from the reference)."""
    if isinstance(spo_anchor, torch.Tensor):
        check_per_seq("spo_anchor", spo_anchor, P, device)
        return cfg, spo_anchor
    if spo_anchor is not None:
        if spo_anchor not in ("reference", "one_step"):
            raise ValueError(f"spo_anchor must be 'reference', 'one_step' or a [P] tensor, got {spo_anchor!r}")
        cfg = cfg.replace(spo_anchor=spo_anchor)
    if cfg.spo_lambda > 0 and cfg.spo_anchor == "one_step":
        raise ValueError("spo_anchor='one_step' needs the anchor values: pass spo_anchor=<[P] tensor of the chosen "
                         "log-probs after one SFT step> (spo_kernels.integrations.anchor.one_step_anchor computes it)")
    return cfg, None


def _anchor_from_reference(cfg, ref_logps, counts, P):
    if cfg.spo_normalize == "mean":
        return ref_logps[:P] / counts[:P].clamp(min=1).to(ref_logps.dtype)
    return ref_logps[:P]


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------

def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    logit_multiplier: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    shift_labels: bool = False,
    token_weights: Optional[Tensor] = None,
    token_stats: bool = False,
    backend: Optional[str] = None,
    inplace_backward: bool = True,
) -> SequenceLogprobs:
    """Per-sequence summed completion log-probs from logits, differentiable.

    Args:
        logits: ``[S, T, V]`` (padded) or ``[N, V]`` (packed), fp32/bf16/fp16 (float64 for tests).
        labels: ``[S, T]`` or ``[N]`` integer targets aligned to positions; ``ignore_index`` outside
            completions.
        cu_seqlens: ``[S+1]`` int32 for the packed layout.
        logit_multiplier, softcap, temperature: the logit transform of SPEC 2, in this order:
            ``z <- logit_multiplier * z`` (Cohere ``logit_scale``, Granite ``1 / logits_scaling``), then
            ``z <- softcap * tanh(z / softcap)``, then ``z <- z / temperature``.
        shift_labels: Hugging Face labels (SPEC 6): the target of position t is label t+1 of the same
            sequence (per row padded, per ``cu_seqlens`` segment packed), so ``input_ids`` with
            ``ignore_index`` outside the completion can be passed as they are.
        token_weights: optional float weights of the labels' shape (shifted with them): ``L_s = sum_t w_t
            logp_t`` and the gradient carries ``w_t`` (SPEC 8). No gradient flows to the weights.
        token_stats: also return the per-sequence sums of the per-token statistics (SPEC 8: entropy,
            ``log sum p^2``, mean logit, target-is-argmax, on the transformed logits, unweighted) in
            ``stats``, from the same pass.
        inplace_backward: backward writes dlogits into ``logits``'s own buffer (no second ``[N, V]``
            tensor); the logits are then gone. Pass False to allocate the gradient instead. The gradient
            is exact either way (SPEC 6): the buffer's autograd version counter is bumped, so another
            node that saved these logits and runs its backward later raises autograd's "modified by an
            inplace operation" error; and a new buffer is used instead when writing in place could change
            what someone else reads: a leaf tensor (or a view of one), overlapping memory (an expanded,
            stride-0 tensor), a window of a larger buffer, or a storage other live tensors share (another
            view, a tensor an autograd node saved). Pass the tensor that owns its storage (e.g. the
            model's logits output) to keep the saving.

    fp16 logits (SPEC 7): the gradient ``g_s (onehot - softmax) dz/dx`` is formed in fp32 and rounded to
    fp16 once, on every backend. Its entries are often below fp16's range (``g_s p_v`` ~ 1e-8 at V = 32k),
    so train fp16 with a loss scale (``torch.amp.GradScaler``), as any fp16 model: the scale reaches the
    kernels as the upstream gradient and multiplies in fp32 before that rounding, so scaled entries down
    to fp16's normal range (2^-14) keep fp16's precision, with no intermediate that could underflow or
    overflow. bf16 has fp32's range and needs no scale.
    Returns:
        :class:`SequenceLogprobs` with ``logps [S]`` fp32, ``counts [S]`` int64 and ``stats``
        (:class:`SequenceStats`, float64 sums) when ``token_stats`` else None.
    """
    check_devices(logits=logits, labels=labels, cu_seqlens=cu_seqlens, token_weights=token_weights)
    check_logits(logits, cu_seqlens)
    check_ignore_index(ignore_index)
    transform = check_transform(logit_multiplier, softcap, temperature)
    options = check_kernel_options(inplace_backward=inplace_backward, token_stats=token_stats)
    plan = build_plan(labels, logits.shape[-1], ignore_index, logits.shape[:-1], logits.device,
                      cu_seqlens, pairs=False, shift_labels=shift_labels, token_weights=token_weights)
    impl = get_backend(resolve_backend_name(backend, logits.device))
    logps, stats = _logits_logprobs(logits, plan, impl, transform, options)
    return SequenceLogprobs(logps=logps.to(_out_dtype(logits)), counts=plan.counts, stats=stats)


def fused_linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    logit_multiplier: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    shift_labels: bool = False,
    token_weights: Optional[Tensor] = None,
    token_stats: bool = False,
    backend: Optional[str] = None,
    deterministic: bool = False,
    grad_filter_eps: float = 0.0,
) -> SequenceLogprobs:
    """Per-sequence summed completion log-probs of ``logits = hidden @ weight.T + bias``, without
    materializing the logits; differentiable w.r.t. hidden, weight and bias with any upstream gradient.

    Args:
        hidden: ``[S, T, H]`` or packed ``[N, H]``; weight: ``[V, H]`` same dtype; bias: ``[V]`` or None.
            Under ``torch.autocast`` the head product runs in the autocast dtype, as ``nn.Linear`` would
            (hidden, weight and bias are cast to it first; accumulation stays fp32); outside autocast a
            dtype mismatch is a ``TypeError``.
        labels, cu_seqlens, ignore_index, logit_multiplier, softcap, temperature, shift_labels,
            token_weights, token_stats: as in :func:`sequence_logprobs`.
        deterministic: ask for bitwise-identical gradients across runs. Every backend here already is
            (fixed reduction orders, no float atomics); the flag keeps that guarantee explicit.
        grad_filter_eps: opt-in approximate backward: skip vocabulary tiles whose ``|onehot - softmax|``
            is below this everywhere (0 = exact, default).
    Returns:
        :class:`SequenceLogprobs` with ``logps [S]`` fp32, ``counts [S]`` int64, ``stats`` or None.
    """
    check_devices(hidden=hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens,
                  token_weights=token_weights)
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    check_linear(hidden, weight, bias, cu_seqlens)
    check_ignore_index(ignore_index)
    transform = check_transform(logit_multiplier, softcap, temperature)
    options = check_kernel_options(deterministic, grad_filter_eps, token_stats=token_stats)
    plan = build_plan(labels, weight.shape[0], ignore_index, hidden.shape[:-1], hidden.device,
                      cu_seqlens, pairs=False, shift_labels=shift_labels, token_weights=token_weights)
    impl = get_backend(resolve_backend_name(backend, hidden.device))
    logps, stats = _linear_logprobs(hidden, weight, bias, plan, impl, transform, options)
    return SequenceLogprobs(logps=logps.to(_out_dtype(hidden)), counts=plan.counts, stats=stats)


def _logits_logprobs(logits, plan, impl, transform: LogitTransform, options: KernelOptions):
    """``(L [S], SequenceStats or None)`` from the backend's logits ops: inside the autograd Function when a
    gradient is wanted and the backend has a backward of its own, else its forward op alone (an autograd
    backend's graph is kept by autograd)."""
    logits2d = logits.reshape(plan.num_rows, logits.shape[-1])
    with autocast_off(logits.device):
        if impl.autograd or not (torch.is_grad_enabled() and logits.requires_grad):
            result = impl.logits_forward(logits2d, plan, transform, options)
            return result.seq_logps, sequence_stats(result.stats, plan)
        sink = []
        seq = LogitsSequenceLogprobs.apply(logits, plan, impl, transform, options, sink)
    return seq, sequence_stats(sink[0], plan)


def _out_dtype(x: Tensor) -> torch.dtype:
    """Public results are fp32 (float64 only for float64 inputs, the tests' oracle precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _linear_logprobs(hidden, weight, bias, plan, impl, transform: LogitTransform, options: KernelOptions):
    """``(L [S], SequenceStats or None)`` from the backend's fused-linear ops (as :func:`_logits_logprobs`)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    with autocast_off(hidden.device):
        if impl.autograd or not needs_grad:
            result = impl.linear_forward(hidden.reshape(plan.num_rows, hidden.shape[-1]), weight, bias, plan,
                                         transform, options, save_lse=False)
            return result.seq_logps, sequence_stats(result.stats, plan)
        sink = []
        seq = LinearSequenceLogprobs.apply(hidden, weight, bias, plan, impl, transform, options, sink)
    return seq, sequence_stats(sink[0], plan)


def sequence_stats(stats: Optional[TokenStats], plan: TokenPlan) -> Optional[SequenceStats]:
    """Per-sequence float64 sums of the per-token statistics over completion tokens (unweighted:
    token weights apply to ``L`` only), detached."""
    if stats is None:
        return None
    per_token = torch.stack([x.detach() for x in stats], dim=1).to(torch.float64)  # [Nc, 4]: one pass
    sums = torch.zeros(plan.num_seqs, len(stats), dtype=torch.float64, device=per_token.device)
    return SequenceStats(*sums.index_add_(0, plan.seq_id, per_token).unbind(1))


def autocast_operands(hidden, weight, bias):
    """Under ``torch.autocast`` on hidden's device, the head's operands in the autocast dtype, as
    ``nn.Linear`` would run (differentiable casts: gradients return in the caller's dtypes); fp32 /
    bf16 / fp16 tensors only (autocast leaves float64 alone, and other dtypes meet their clear error in
    the checks). Outside autocast, unchanged."""
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)


# ---------------------------------------------------------------------------------------------
# preference losses
# ---------------------------------------------------------------------------------------------

def _finish(policy_logps, plan: TokenPlan, ref_logps, cfg, anchor, bco_delta, impl: Backend,
            out_dtype, seq_stats: Optional[SequenceStats] = None) -> PreferenceLossOutput:
    """The loss step on the per-sequence sums (in the precision the backend summed them in: a DPO loss
    is a function of differences of large sums), then the public fp32 results."""
    P = plan.num_seqs // 2
    counts = plan.counts
    if ref_logps is not None:
        ref_logps = ref_logps.detach()
    if cfg.spo_lambda == 0:
        anchor = None  # SPO off: no penalty, no SPO metrics (SPEC 6)
    elif anchor is None and cfg.spo_anchor == "reference" and ref_logps is not None:
        anchor = _anchor_from_reference(cfg, ref_logps, counts, P)
    if callable(bco_delta):
        # This batch's mean reward (bco_pair's rewards are on summed log-probs), handed to the caller's
        # running statistic, which returns the shift to use.
        with torch.no_grad():
            R = 0.0 if (ref_logps is None or cfg.reference_free) else ref_logps.to(policy_logps.dtype)
            bco_delta = torch.as_tensor(bco_delta((cfg.beta * (policy_logps.detach() - R)).mean()))
    if impl.autograd:  # the loss keeps its graph to policy_logps; autograd differentiates it
        step = impl.loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta, seq_stats=seq_stats)
        loss = step.loss
    else:  # closed form: the step's grad is dloss/dL_s, handed back by the loss node
        step = impl.loss_step(policy_logps.detach(), counts, ref_logps, cfg, anchor, bco_delta, seq_stats=seq_stats)
        loss = ClosedFormLoss.apply(policy_logps, step.loss, step.grad) if policy_logps.requires_grad else step.loss
    metrics = step.metrics
    return PreferenceLossOutput(
        loss=loss.to(out_dtype), metrics={k: v.to(out_dtype) for k, v in metrics.items()},
        policy_logps=policy_logps.detach().to(out_dtype),
        ref_logps=None if ref_logps is None else ref_logps.to(out_dtype), counts=counts)


def _prepare(cfg, plan, device, ref_logps, has_ref_inputs, spo_anchor, bco_delta):
    P = plan.num_seqs // 2
    cfg, anchor = _resolve_anchor(spo_anchor, cfg, P, device)
    if ref_logps is not None:
        if has_ref_inputs:
            raise ValueError("pass either ref_logps or the reference model's inputs, not both")
        check_per_seq("ref_logps", ref_logps, plan.num_seqs, device)
    needs_ref = not cfg.base_reference_free
    if needs_ref and ref_logps is None and not has_ref_inputs:
        raise ValueError(f"loss_type={cfg.loss_type!r} needs reference log-probs: pass ref_logps [2P] or the "
                         f"reference model's inputs (or set reference_free=True)")
    if cfg.spo_lambda > 0 and anchor is None and ref_logps is None and not has_ref_inputs:
        raise ValueError("spo_anchor='reference' needs reference log-probs (ref_logps or the reference model's "
                         "inputs), even with reference_free=True or a reference-free loss; or pass spo_anchor as "
                         "a [P] tensor")
    check_bco_delta(bco_delta, device)
    return cfg, anchor


def preference_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    spo_anchor: Union[str, Tensor, None] = None,
    config: Optional[PreferenceLossConfig] = None,
    backend: Optional[str] = None,
    inplace_backward: bool = True,
    bco_delta: Optional[Tensor] = None,
    shift_labels: bool = False,
    token_weights: Optional[Tensor] = None,
    token_stats: bool = False,
    **options,
) -> PreferenceLossOutput:
    """DPO-family / SPO loss from logits the caller already has (SPEC 1, logits path).

    Args:
        logits: ``[2P, T, V]`` padded or ``[N, V]`` packed (with ``cu_seqlens [2P+1]`` int32); chosen
            sequences first. bf16/fp16/fp32.
        labels: ``[2P, T]`` / ``[N]`` targets aligned to positions, ``ignore_index`` outside completions.
        ref_logps: ``[2P]`` precomputed summed reference log-probs; or ``ref_logits`` (same shape as
            ``logits``, read forward-only).
        spo_anchor: "reference", "one_step" or a ``[P]`` tensor (SPEC 4); default from the config.
        config / **options: :class:`PreferenceLossConfig` fields (``beta=0.1, loss_type="sigmoid", ...``).
        inplace_backward: write dlogits into the logits buffer during backward (default; no extra
            ``[N, V]`` tensor, the logits are overwritten), when that cannot change what anyone else reads;
            else a new buffer (the rule is in :func:`sequence_logprobs`). Never a wrong gradient.
        bco_delta: opt-in reward shift for ``bco_pair``: a scalar tensor, or a callable taking this batch's
            mean reward and returning the shift (how the modules keep a running mean with
            ``bco_running_mean=True``); default None: no shift, TRL 1.16's ``bco_pair``.
        shift_labels, token_weights: as in :func:`sequence_logprobs`; the weights (times the config's
            ``ld_alpha`` weights, LD-DPO) apply to the policy and to the reference computed here.
        token_stats: compute the per-token statistics of the policy (SPEC 8) and hand their per-sequence
            sums to the loss step (the ``entropy``, ``logits/*``, ``mean_token_accuracy`` metrics); also on
            whenever ``use_weighting`` (WPO) needs them. The logit transform is the config's
            (``logit_multiplier``, ``softcap``, ``temperature``).
    Returns:
        :class:`PreferenceLossOutput`: ``loss`` plus the TRL-named metrics.
    """
    check_devices(logits=logits, labels=labels, cu_seqlens=cu_seqlens, ref_logps=ref_logps, ref_logits=ref_logits,
                  spo_anchor=spo_anchor, bco_delta=bco_delta, token_weights=token_weights)
    cfg = _resolve_config(config, options)
    check_logits(logits, cu_seqlens)
    transform, options, ref_options = _loss_kernel_args(cfg, token_stats, inplace_backward=inplace_backward)
    plan = build_plan(labels, logits.shape[-1], cfg.ignore_index, logits.shape[:-1], logits.device, cu_seqlens,
                      shift_labels=shift_labels, token_weights=token_weights, ld_alpha=cfg.ld_alpha)
    if ref_logits is not None:
        check_ref_logits(ref_logits, logits, cu_seqlens)
    cfg, anchor = _prepare(cfg, plan, logits.device, ref_logps, ref_logits is not None, spo_anchor, bco_delta)
    impl = get_backend(resolve_backend_name(backend, logits.device))
    if ref_logits is not None:
        with torch.no_grad():
            ref_logps, _ = _logits_logprobs(ref_logits, plan, impl, transform, ref_options)
    policy, seq_stats = _logits_logprobs(logits, plan, impl, transform, options)
    return _finish(policy, plan, ref_logps, cfg, anchor, bco_delta, impl, _out_dtype(logits), seq_stats)


def _loss_kernel_args(cfg: PreferenceLossConfig, token_stats, **option_kwargs):
    """``(transform, policy options, reference options)`` of a preference loss: the config's transform;
    statistics for the policy when asked for or when WPO (``use_weighting``) needs them, never for the
    reference."""
    transform = check_transform(cfg.logit_multiplier, cfg.softcap, cfg.temperature)
    options = check_kernel_options(token_stats=token_stats, **option_kwargs)
    if cfg.use_weighting:
        options = dataclasses.replace(options, token_stats=True)
    return transform, options, dataclasses.replace(options, token_stats=False, inplace_backward=False)


def fused_linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    spo_anchor: Union[str, Tensor, None] = None,
    config: Optional[PreferenceLossConfig] = None,
    backend: Optional[str] = None,
    bco_delta: Optional[Tensor] = None,
    deterministic: bool = False,
    grad_filter_eps: float = 0.0,
    shift_labels: bool = False,
    token_weights: Optional[Tensor] = None,
    token_stats: bool = False,
    **options,
) -> PreferenceLossOutput:
    """DPO-family / SPO loss from hidden states and the LM head; logits are never materialized
    (SPEC 1, fused-linear path).

    Args:
        hidden: ``[2P, T, H]`` padded or ``[N, H]`` packed (with ``cu_seqlens [2P+1]`` int32), chosen first.
        weight: the LM head ``[V, H]`` (same dtype as hidden); bias: ``[V]`` or None.
        labels: ``[2P, T]`` / ``[N]`` targets aligned to positions, ``ignore_index`` outside completions.
        ref_logps: ``[2P]`` precomputed summed reference log-probs, or
        ref_hidden / ref_weight / ref_bias: the reference model's final hidden states (same shape as
            hidden) and head, computed forward-only; ``ref_weight`` defaults to ``weight`` and
            ``ref_bias`` to ``bias`` (a frozen shared head, as with LoRA).
        spo_anchor, config, **options, bco_delta: as in :func:`preference_loss`.
        deterministic, grad_filter_eps: as in :func:`fused_linear_sequence_logprobs` (autocast too).
        shift_labels, token_weights, token_stats: as in :func:`preference_loss`.
    Returns:
        :class:`PreferenceLossOutput`.
    """
    check_devices(hidden=hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
                  ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, spo_anchor=spo_anchor,
                  bco_delta=bco_delta, token_weights=token_weights)
    cfg = _resolve_config(config, options)
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = autocast_operands(ref_hidden, ref_weight, ref_bias)
    check_linear(hidden, weight, bias, cu_seqlens)
    transform, options, ref_options = _loss_kernel_args(cfg, token_stats, deterministic=deterministic,
                                                        grad_filter_eps=grad_filter_eps)
    plan = build_plan(labels, weight.shape[0], cfg.ignore_index, hidden.shape[:-1], hidden.device, cu_seqlens,
                      shift_labels=shift_labels, token_weights=token_weights, ld_alpha=cfg.ld_alpha)
    has_ref_inputs = ref_hidden is not None
    if not has_ref_inputs and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias need ref_hidden")
    if has_ref_inputs:
        ref_weight = weight if ref_weight is None else ref_weight
        ref_bias = bias if (ref_bias is None and ref_weight is weight) else ref_bias
        check_ref_linear(ref_hidden, ref_weight, ref_bias, hidden, weight, cu_seqlens)
    cfg, anchor = _prepare(cfg, plan, hidden.device, ref_logps, has_ref_inputs, spo_anchor, bco_delta)
    impl = get_backend(resolve_backend_name(backend, hidden.device))
    if has_ref_inputs:
        with torch.no_grad():
            ref_logps, _ = _linear_logprobs(ref_hidden, ref_weight, ref_bias, plan, impl, transform, ref_options)
    policy, seq_stats = _linear_logprobs(hidden, weight, bias, plan, impl, transform, options)
    return _finish(policy, plan, ref_logps, cfg, anchor, bco_delta, impl, _out_dtype(hidden), seq_stats)
