"""Hugging Face causal LMs: per-sequence log-probs and the preference loss without logits, computed
inside the model's own forward.

Why inside the forward: a wrapper (DDP, FSDP2, PEFT, accelerate) acts through the hooks of the modules
it wraps. Calling the decoder directly skips DDP's forward (its gradient reduction is never prepared, so
ranks silently drift apart), and an FSDP2 LM head that is its own unit is only gathered inside its own
forward. So :func:`enable_fused_head` patches the model instance: with one of the ``spo_*`` keywords,
``model(...)`` (through every wrapper's ``__call__``) runs the backbone, then calls the LM head *module*
on the final hidden states with its plain ``nn.Linear`` forward temporarily replaced by the fused
kernels. Every hook of the root and of the head fires, and the head's weight is the gathered tensor.
Without those keywords the model's forward is the original one (generation, eval logits unchanged).

Labels are Hugging Face style: ``input_ids`` with ``-100`` outside the completion, unshifted; the
target of position t is label t+1 (they are shifted here).

    from spo_kernels.integrations.hf import enable_fused_head
    enable_fused_head(model)
    out = model(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True)   # out.logps [B]
    out = model(input_ids=ids, attention_mask=am, labels=labels, spo_loss=cfg, spo_ref_logps=ref)
    out.loss.backward()                                                              # out.metrics

The head's logit transform is read from the config (:func:`head_transform`): Gemma 2's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling`` (logits divided by
it), ``output_multiplier`` / ``lm_head_multiplier``. A head the kernels cannot reproduce (a PEFT adapter
on the head, a quantized or custom head, a DTensor weight inside the forward) raises, never a wrong number.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .. import api
from ..config import PreferenceLossConfig

Tensor = torch.Tensor

_PATCHED = "_spo_fused_head"
# Config fields of heads whose transform the kernels do not reproduce (MiniCPM scales the hidden states
# by hidden_size / dim_model_base before the head): an error, never a silently different logit.
_UNSUPPORTED_FIELDS = ("dim_model_base",)


# ---------------------------------------------------------------------------------------------
# the head's logit transform
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTransform:
    """``z <- multiplier * (h W^T + b)``, then ``z <- softcap * tanh(z / softcap)`` (SPEC 2)."""

    multiplier: float = 1.0
    softcap: Optional[float] = None


def head_transform(config) -> HeadTransform:
    """The logit transform of a Hugging Face causal LM, from its config (or a model's config).

    Cohere ``logit_scale``, ``output_multiplier`` and ``lm_head_multiplier`` multiply the logits;
    Granite's ``logits_scaling`` divides them (HyperCLOVA X multiplies); Gemma 2's
    ``final_logit_softcapping`` caps them after the multiplier.
    """
    config = getattr(config, "config", config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNSUPPORTED_FIELDS:
        if getattr(text, name, None) is not None:
            raise NotImplementedError(
                f"{type(text).__name__} has {name}={getattr(text, name)!r}: this model transforms the hidden "
                f"states or logits in a way spo_kernels does not reproduce; its log-probs would be wrong")
    multiplier = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            multiplier = float(value)
            break
    scaling = getattr(text, "logits_scaling", None)
    if multiplier is None and scaling is not None:
        scaling = float(scaling)
        multiplier = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / scaling
    softcap = getattr(text, "final_logit_softcapping", None)
    return HeadTransform(multiplier=1.0 if multiplier is None else multiplier,
                         softcap=float(softcap) if softcap else None)


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------

def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``[B, T]`` Hugging Face labels -> position-aligned targets: ``out[:, t] = labels[:, t + 1]``,
    the last position ``ignore_index``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a [B, T] tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def ld_token_weights(targets: Tensor, ld_alpha: float, ignore_index: int = -100) -> Tensor:
    """LD-DPO's per-token weights (TRL 1.16): ``[2P, T]`` fp32, 1 on a completion's first
    ``min(n_chosen, n_rejected)`` tokens, ``ld_alpha`` past them (``targets`` position-aligned)."""
    mask = (targets != ignore_index).to(torch.int64)
    pos = mask.cumsum(dim=1)
    lens = mask.sum(dim=1)
    chosen, rejected = lens.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
    w = torch.where(pos > shared, torch.full_like(pos, 0, dtype=torch.float32) + ld_alpha,
                    torch.ones_like(pos, dtype=torch.float32))
    return w * mask


# ---------------------------------------------------------------------------------------------
# calling the LM head module with the fused kernels as its forward
# ---------------------------------------------------------------------------------------------

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed, or before the public path
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _head_leaves(head: nn.Module):
    """The ``nn.Linear`` modules whose weight the head's forward may use: the head itself, or a PEFT
    ``modules_to_save`` wrapper's original and trained copies. Anything else raises."""
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError("a PEFT adapter on the LM head is not supported (the fused kernels read the head's "
                         "weight directly, so the adapter would be ignored): remove the head from "
                         "target_modules, or list it in modules_to_save to train it fully")
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        leaves = [head.original_module, *head.modules_to_save.values()]
    else:
        leaves = [head]
    for leaf in leaves:
        # A subclass that overrides forward (a quantized Linear4bit, a custom head) computes something else
        # from its weight; FSDP2's dynamic FSDPLinear subclass keeps nn.Linear's forward.
        if not isinstance(leaf, nn.Linear) or type(leaf).forward is not nn.Linear.forward:
            raise TypeError(f"unsupported LM head {type(leaf).__name__}: the fused path needs a plain nn.Linear "
                            f"(weight [V, H], optional bias) as the model's output embedding")
    return leaves


def _call_head(head: nn.Module, hidden: Tensor, fn: Callable[[Tensor, Tensor, Optional[Tensor]], Dict[str, Any]]):
    """``head(hidden)`` with each leaf's forward replaced by ``fn(hidden, weight, bias)``, so the head's
    hooks (FSDP2 gather and reshard, PEFT adapter selection) run around the fused kernels."""
    leaves = _head_leaves(head)
    dtensor = _dtensor_type()

    def fused_forward_of(leaf):
        def forward(x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"the fused LM head takes only the hidden states, got extra arguments "
                                f"{list(kwargs) or len(args)}")
            weight, bias = leaf.weight, leaf.bias
            if dtensor is not None and any(isinstance(t, dtensor) for t in (weight, bias)):
                raise TypeError("the LM head's weight is a DTensor inside the head's forward (tensor-parallel or "
                                "an unsupported sharding): the fused kernels need the full [V, H] weight")
            return fn(x, weight, bias)
        return forward

    saved = [(leaf, leaf.__dict__.get("forward")) for leaf in leaves]
    try:
        for leaf in leaves:
            leaf.forward = fused_forward_of(leaf)
        return head(hidden)
    finally:
        for leaf, previous in saved:
            if previous is None:
                del leaf.forward
            else:
                leaf.forward = previous


# ---------------------------------------------------------------------------------------------
# per-token statistics (metrics)
# ---------------------------------------------------------------------------------------------

def _batch_stat_sums(per_seq: Dict[str, Tensor], counts: Tensor) -> Dict[str, Tensor]:
    """Batch-level sums that TRL gathers across ranks: entropy over all completion tokens, mean logit of
    chosen / rejected tokens, argmax hits of chosen tokens; with their token counts."""
    P = counts.shape[0] // 2
    return {"entropy": per_seq["entropy"].sum(), "logits/chosen": per_seq["mean_logit"][:P].sum(),
            "logits/rejected": per_seq["mean_logit"][P:].sum(), "mean_token_accuracy": per_seq["argmax"][:P].sum(),
            "tokens": counts.sum().double(), "tokens/chosen": counts[:P].sum().double(),
            "tokens/rejected": counts[P:].sum().double()}


def _batch_stat_sums_from_metrics(metrics: Dict[str, Tensor], counts: Tensor) -> Dict[str, Tensor]:
    """The same sums from the core's batch means (``mean * tokens``)."""
    P = counts.shape[0] // 2
    n, nc, nr = counts.sum().double(), counts[:P].sum().double(), counts[P:].sum().double()
    return {"entropy": metrics["entropy"].double() * n, "logits/chosen": metrics["logits/chosen"].double() * nc,
            "logits/rejected": metrics["logits/rejected"].double() * nr,
            "mean_token_accuracy": metrics["mean_token_accuracy"].double() * nc,
            "tokens": n, "tokens/chosen": nc, "tokens/rejected": nr}


# ---------------------------------------------------------------------------------------------
# the fused computations run as the head's forward
# ---------------------------------------------------------------------------------------------

def _logps_fn(targets, transform, backend, token_weights, token_stats, ignore_index):
    def run(hidden, weight, bias):
        out = api.fused_linear_sequence_logprobs(
            hidden, weight, targets, bias, ignore_index=ignore_index, logit_multiplier=transform.multiplier,
            softcap=transform.softcap, backend=backend, token_weights=token_weights, token_stats=token_stats)
        result = {"logps": out.logps, "counts": out.counts}
        if token_stats:
            stats = out.stats
            per_seq = {"entropy": stats.entropy_sum, "mean_logit": stats.mean_logit_sum, "argmax": stats.argmax_hits}
            result["token_stat_sums"] = _batch_stat_sums(per_seq, out.counts)
        return result
    return run


def _loss_fn(targets, backend, cfg: PreferenceLossConfig, ref_logps, anchor, token_weights, token_stats,
             bco_delta=None):
    def run(hidden, weight, bias):
        out = api.fused_linear_preference_loss(hidden, weight, targets, bias, ref_logps=ref_logps, spo_anchor=anchor,
                                               config=cfg, backend=backend, bco_delta=bco_delta,
                                               token_weights=token_weights, token_stats=token_stats)
        result = {"loss": out.loss, "logps": out.policy_logps, "counts": out.counts, "metrics": dict(out.metrics)}
        if out.ref_logps is not None:
            result["ref_logps"] = out.ref_logps
        if token_stats:
            result["token_stat_sums"] = _batch_stat_sums_from_metrics(out.metrics, out.counts)
        return result
    return run


def _loss_config(cfg: PreferenceLossConfig, transform: HeadTransform) -> PreferenceLossConfig:
    """The user's config with the model's transform; a conflicting explicit value is an error."""
    if not isinstance(cfg, PreferenceLossConfig):
        raise TypeError(f"spo_loss must be a PreferenceLossConfig, got {type(cfg).__name__}")
    if cfg.softcap is not None and cfg.softcap != transform.softcap:
        raise ValueError(f"spo_loss.softcap={cfg.softcap} but the model's final softcap is {transform.softcap}")
    if cfg.logit_multiplier != 1.0 and cfg.logit_multiplier != transform.multiplier:
        raise ValueError(f"spo_loss.logit_multiplier={cfg.logit_multiplier} but the model's is {transform.multiplier}")
    if cfg.temperature != 1.0:
        raise ValueError("spo_loss.temperature must be 1.0 for a Hugging Face model (its logits are not tempered)")
    return cfg.replace(softcap=transform.softcap, logit_multiplier=transform.multiplier)


# ---------------------------------------------------------------------------------------------
# the patched model forward
# ---------------------------------------------------------------------------------------------

def _output_class():
    """``FusedHeadOutput``: a transformers ``ModelOutput`` (a registered pytree, so FSDP2 and DDP find
    its tensors and hook their backward)."""
    from transformers.utils import ModelOutput

    @dataclass
    class FusedHeadOutput(ModelOutput):
        """loss: scalar (``spo_loss`` only); logps ``[B]`` summed completion log-probs (differentiable
        with ``spo_logps``, detached with ``spo_loss``); counts ``[B]``; ref_logps ``[B]`` or None;
        metrics: the loss's detached metrics (TRL names); token_stat_sums: batch sums of the per-token
        statistics (``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``) and
        their token counts (``tokens``, ``tokens/chosen``, ``tokens/rejected``), for cross-rank means."""

        loss: Optional[Tensor] = None
        logps: Optional[Tensor] = None
        counts: Optional[Tensor] = None
        ref_logps: Optional[Tensor] = None
        metrics: Optional[Dict[str, Tensor]] = None
        token_stat_sums: Optional[Dict[str, Tensor]] = None

    return FusedHeadOutput


_OUTPUT = None


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _causal_lm(model):
    """The ``*ForCausalLM`` module whose forward is patched (under a PEFT wrapper: its base model)."""
    return model.get_base_model() if _is_peft(model) else model


def enable_fused_head(model, backend: Optional[str] = None):
    """Patch ``model`` (a transformers causal LM, or a PEFT model wrapping one) in place; returns it.

    Afterwards ``model(..., labels=labels, spo_logps=True)`` returns ``logps [B]`` / ``counts [B]``, and
    ``model(..., labels=labels, spo_loss=PreferenceLossConfig(...), spo_ref_logps=ref [B],
    spo_anchor=None | "reference" | tensor [P], spo_bco_delta=None | scalar | callable)`` returns ``loss``
    and ``metrics`` (rows
    ``0..P-1`` chosen, ``P..2P-1`` rejected). ``spo_token_stats=True`` adds ``token_stat_sums``.
    ``labels`` are unshifted Hugging Face labels (``-100`` outside the completion). Any other call runs
    the original forward. Idempotent; patch before wrapping in DDP / FSDP2 or after, either works (the
    patch is on the instance, which the wrappers call). ``backend`` picks the spo_kernels backend.
    """
    global _OUTPUT
    target = _causal_lm(model)
    if getattr(target, _PATCHED, False):
        return model
    transform = head_transform(target.config)
    _head_leaves(target.get_output_embeddings())  # an unsupported head fails here, not mid-training
    backbone = getattr(target, "base_model", None)
    if backbone is None or backbone is target:
        raise TypeError(f"{type(target).__name__} has no separate backbone (base_model): not a causal LM "
                        f"with an LM head that spo_kernels can fuse")
    if _OUTPUT is None:
        _OUTPUT = _output_class()
    original = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, labels=None, spo_logps: bool = False, spo_loss: Optional[PreferenceLossConfig] = None,
                spo_ref_logps: Optional[Tensor] = None, spo_anchor=None, spo_token_stats: bool = False,
                spo_token_weights: Optional[Tensor] = None, spo_bco_delta=None, **kwargs):
        if not spo_logps and spo_loss is None:
            if labels is not None:
                kwargs["labels"] = labels
            return original(*args, **kwargs)
        if spo_logps and spo_loss is not None:
            raise ValueError("pass either spo_logps=True or spo_loss=<config>, not both")
        if labels is None:
            raise ValueError("the fused head needs labels [B, T] (Hugging Face style, -100 outside completions)")
        if kwargs.get("output_router_logits"):
            raise NotImplementedError("MoE router auxiliary losses are not computed by the fused head")
        cfg = None if spo_loss is None else _loss_config(spo_loss, transform)  # validated before any compute
        for name in ("logits_to_keep", "num_items_in_batch", "return_dict"):
            kwargs.pop(name, None)
        kwargs["use_cache"] = False
        hidden = backbone(*args, **kwargs).last_hidden_state
        ignore_index = -100 if cfg is None else cfg.ignore_index
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states {tuple(hidden.shape[:2])} "
                             f"(prompt-learning PEFT adds virtual tokens: not supported)")
        targets = shift_labels(labels.to(hidden.device), ignore_index)
        head = target.get_output_embeddings()
        token_weights = spo_token_weights
        if cfg is not None:
            if cfg.ld_alpha is not None:
                if token_weights is not None:
                    raise ValueError("pass ld_alpha or spo_token_weights, not both")
                token_weights = ld_token_weights(targets, cfg.ld_alpha, ignore_index)
                cfg = cfg.replace(ld_alpha=None)
            fn = _loss_fn(targets, backend, cfg, spo_ref_logps, spo_anchor, token_weights, spo_token_stats, spo_bco_delta)
        else:
            fn = _logps_fn(targets, transform, backend, token_weights, spo_token_stats, ignore_index)
        return _OUTPUT(**_call_head(head, hidden, fn))

    target._spo_previous_forward = target.__dict__.get("forward")
    target.forward = types.MethodType(forward, target)
    setattr(target, _PATCHED, True)
    return model


def disable_fused_head(model):
    """Undo :func:`enable_fused_head` (the forward the model had before it); returns the model."""
    target = _causal_lm(model)
    if getattr(target, _PATCHED, False):
        previous = target.__dict__.pop("_spo_previous_forward", None)
        if previous is None:
            del target.forward
        else:
            target.forward = previous
        delattr(target, _PATCHED)
    return model


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor, **kwargs):
    """``model(...)`` through the fused head: ``FusedHeadOutput`` with ``logps [B]`` (differentiable when
    grad is enabled) and ``counts [B]``. ``model`` may be wrapped (DDP, FSDP2, PEFT); the causal LM inside
    must have been passed to :func:`enable_fused_head`."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, spo_logps=True, **kwargs)
