"""Model side of the trainer: build or load a causal LM, get its final hidden states and LM head, and
the per-sequence log-probs and SPO one-step anchor through the fused path (logits are never built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch.func import functional_call

from spo_kernels import fused_linear_preference_loss, fused_linear_sequence_logprobs

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------

@dataclass
class BuiltinModelSize:
    """The built-in small Llama (tied embeddings, no dropout), sized for a CPU."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 128


def build_builtin_model(tokenizer, size: BuiltinModelSize, seed: int, attn_implementation: str = "eager"):
    """A freshly initialized ``LlamaForCausalLM`` from a config (nothing downloaded).

    The initialization uses its own seeded generator state so that the same seed always gives the
    same weights, whatever ran before.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model


def load_model(path: str, dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None):
    """A causal LM saved at a local path (``save_pretrained`` layout); nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# ---------------------------------------------------------------------------------------------
# hidden states and head
# ---------------------------------------------------------------------------------------------

@dataclass
class Head:
    """The LM head as the fused loss takes it: ``weight [V, H]``, ``bias [V]`` or None, and the
    model's final-logit softcap (Gemma 2's ``final_logit_softcapping``) or None."""

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]


# Model config fields that scale the logits (Cohere, Granite, and others).
LOGIT_MULTIPLIER_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def lm_head(model) -> Head:
    """The output embedding. With tied embeddings this *is* the input embedding Parameter, so the
    head's gradient and the embedding's gradient accumulate into the same tensor, as they should."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    for name in LOGIT_MULTIPLIER_FIELDS:  # never silently ignored (SPEC 6)
        value = getattr(model.config, name, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(f"{type(model).__name__}: config.{name}={value} scales the logits, which the reference "
                             f"trainer does not pass to the fused loss; this model is not supported here")
    return Head(weight=head.weight, bias=bias, softcap=float(softcap) if softcap else None)


def final_hidden(model, input_ids: Tensor, attention_mask: Optional[Tensor],
                 position_ids: Optional[Tensor] = None) -> Tensor:
    """``[B, T] -> [B, T, H]``: the backbone's last hidden state (after its final norm), no LM head.

    Packed rows: ``attention_mask=None`` and ``position_ids`` restarting at 0 at each sequence start;
    Hugging Face models then attend within each sequence only (flash-attn's varlen kernel, or a
    block-diagonal causal mask for SDPA / eager attention)."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model.get_decoder()(**kwargs)
    return out.last_hidden_state


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                      backend: Optional[str] = None):
    """Summed completion log-probs per row via the fused path: ``SequenceLogprobs(logps [B], counts [B])``.
    Differentiable when grad is enabled."""
    head = lm_head(model)
    hidden = final_hidden(model, input_ids, attention_mask)
    return fused_linear_sequence_logprobs(hidden, head.weight.to(hidden.dtype), labels,
                                          None if head.bias is None else head.bias.to(hidden.dtype),
                                          softcap=head.softcap, backend=backend)


# ---------------------------------------------------------------------------------------------
# the loss inside a module's forward (what DDP / FSDP2 wrap)
# ---------------------------------------------------------------------------------------------

class PolicyWithLoss(torch.nn.Module):
    """A causal LM whose forward returns the fused loss, not logits.

    Distributed wrappers (DDP, FSDP2) act in their module's forward: DDP's hooks, FSDP2's all-gather of
    the sharded weights (the LM head included) and their reshard. Computing the loss inside this forward
    means the head the fused loss reads is the whole, unsharded weight, and the gradients it produces
    are reduced by the wrapper like any other.

    ``forward(input_ids, labels, attention_mask=None, position_ids=None, cu_seqlens=None, ...)``:
        padded: ``input_ids``/``attention_mask``/``labels`` ``[2P, T]``; packed: ``input_ids``/``position_ids``
        ``[1, N]``, ``labels [N]``, ``cu_seqlens [2P+1]`` int32. Objective "preference" returns the
        :class:`~spo_kernels.PreferenceLossOutput` of :func:`~spo_kernels.fused_linear_preference_loss`
        (``ref_logps [2P]`` and ``spo_anchor [P]`` passed through); objective "sft" returns
        ``(loss, SequenceLogprobs)`` of the chosen rows given, with the loss normalized by
        ``token_count`` (the whole step's completion tokens, so micro-batches add up to the batch's
        token-mean NLL).
    """

    def __init__(self, model, loss_config=None, backend: Optional[str] = None, objective: str = "preference"):
        super().__init__()
        self.model = model
        self.loss_config = loss_config
        self.backend = backend
        self.objective = objective

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                ref_logps: Optional[Tensor] = None, spo_anchor: Optional[Tensor] = None,
                token_count=None):
        head = lm_head(self.model)
        hidden = final_hidden(self.model, input_ids, attention_mask, position_ids)
        weight, bias = head.weight, head.bias
        if hidden.dtype != weight.dtype:  # under autocast the backbone returns its own dtype; the head follows
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        if cu_seqlens is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.objective == "sft":
            seq = fused_linear_sequence_logprobs(hidden, weight, labels, bias, cu_seqlens=cu_seqlens,
                                                 softcap=head.softcap, backend=self.backend)
            count = seq.counts.sum().clamp(min=1) if token_count is None else token_count
            return -seq.logps.sum() / count, seq
        ref_kwargs = {} if ref_logps is None else {"ref_logps": ref_logps}
        return fused_linear_preference_loss(hidden, weight, labels, bias, cu_seqlens=cu_seqlens,
                                            config=self.loss_config, spo_anchor=spo_anchor, backend=self.backend,
                                            **ref_kwargs)


class SequenceLogps(torch.nn.Module):
    """A frozen model whose forward returns the summed completion log-probs ``[S]`` fp32 of its rows
    (padded ``[S, T]`` or packed with ``cu_seqlens``), forward only: the reference model, wrappable by
    FSDP2 like the policy (its head is read inside its own forward)."""

    def __init__(self, model, backend: Optional[str] = None):
        super().__init__()
        self.model = model
        self.backend = backend

    @torch.no_grad()
    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        head = lm_head(self.model)
        hidden = final_hidden(self.model, input_ids, attention_mask, position_ids)
        if cu_seqlens is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        seq = fused_linear_sequence_logprobs(hidden, head.weight.to(hidden.dtype), labels,
                                             None if head.bias is None else head.bias.to(hidden.dtype),
                                             cu_seqlens=cu_seqlens, softcap=head.softcap, backend=self.backend)
        return seq.logps.float()


# ---------------------------------------------------------------------------------------------
# SPO one-step anchor
# ---------------------------------------------------------------------------------------------

def _module_prefix(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name + "." if name else ""
    raise ValueError("the decoder is not a submodule of the model")


def _param_name(model, tensor) -> Optional[str]:
    for name, param in model.named_parameters():
        if param is tensor:
            return name
    return None


def one_step_anchor(model, batch, alpha: float, normalize: str = "mean",
                    backend: Optional[str] = None) -> Tensor:
    """SPO's ``"one_step"`` anchor (SPEC 4): the chosen responses' log-probs after one virtual SFT step.

    ``theta' = theta - alpha * grad F(theta)`` where ``F`` is the chosen completions' token-mean NLL over
    the batch (the usual SFT loss: summed NLL of all chosen tokens / number of chosen tokens), a plain
    gradient step on every trainable parameter. The chosen log-probs are then evaluated at ``theta'``
    with ``torch.func.functional_call``; the model's weights are never changed and no gradient flows
    out of the result.

    Args:
        model: a causal LM (its backbone and head are read as in :func:`final_hidden` / :func:`lm_head`).
        batch: a preference batch with ``input_ids``, ``attention_mask``, ``labels`` of shape ``[2P, T]``
            (chosen rows first; attributes or mapping keys); only the chosen rows are used.
        alpha: step size of the virtual SFT step.
        normalize: ``"mean"`` -> per-token mean log-prob ``L_w / n_w`` (matches ``spo_normalize="mean"``),
            ``"sum"`` -> summed ``L_w``.
    Returns:
        ``[P]`` fp32 tensor, detached; pass it as ``spo_anchor=`` to the fused preference loss.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    get = (lambda k: batch[k]) if isinstance(batch, dict) else (lambda k: getattr(batch, k))
    input_ids, attention_mask, labels = get("input_ids"), get("attention_mask"), get("labels")
    P = input_ids.shape[0] // 2
    input_ids, attention_mask, labels = input_ids[:P], attention_mask[:P], labels[:P]

    trainable: Dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        seq = sequence_logprobs(model, input_ids, attention_mask, labels, backend=backend)
        sft_loss = -seq.logps.sum() / seq.counts.sum().clamp(min=1)
        grads = torch.autograd.grad(sft_loss, list(trainable.values()), allow_unused=True)
    stepped = {name: (p.detach() if g is None else p.detach() - alpha * g)
               for (name, p), g in zip(trainable.items(), grads)}

    decoder = model.get_decoder()
    prefix = _module_prefix(model, decoder)
    decoder_params = {n[len(prefix):]: t for n, t in stepped.items() if n.startswith(prefix)}
    head = lm_head(model)
    # Tied heads are found under the embedding's name, so the stepped copy stays tied.
    weight = stepped.get(_param_name(model, head.weight), head.weight)
    bias = None if head.bias is None else stepped.get(_param_name(model, head.bias), head.bias)
    with torch.no_grad():
        out = functional_call(decoder, decoder_params, args=(),
                              kwargs=dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
        hidden = out.last_hidden_state
        after = fused_linear_sequence_logprobs(hidden, weight.to(hidden.dtype), labels,
                                               None if bias is None else bias.to(hidden.dtype),
                                               softcap=head.softcap, backend=backend)
    logps = after.logps.float()
    if normalize == "mean":
        logps = logps / after.counts.clamp(min=1).to(logps.dtype)
    return logps.detach()
