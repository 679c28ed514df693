"""Model side of the trainer: build or load a causal LM, get its final hidden states and LM head, and
the per-sequence log-probs and SPO one-step anchor through the fused path (logits are never built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spo_kernels import fused_linear_preference_loss, fused_linear_sequence_logprobs
from spo_kernels.integrations.hf import head_transform

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


def lm_head(model) -> Head:
    """The output embedding. With tied embeddings this *is* the input embedding Parameter, so the
    head's gradient and the embedding's gradient accumulate into the same tensor, as they should.

    The head's logit transform is read as the integration reads it (``head_transform``): a softcap is
    passed on; a model whose config scales or otherwise transforms its logits is refused (never silently
    ignored, SPEC 6)."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    transform = head_transform(model.config)  # raises for transforms spo_kernels does not reproduce
    if transform.multiplier != 1.0:
        raise ValueError(f"{type(model).__name__}: its config (logit_scale, logits_scaling, output_multiplier or "
                         f"lm_head_multiplier) scales the logits by {transform.multiplier}, which the "
                         f"reference trainer does not pass to the fused loss; this model is not supported here")
    return Head(weight=head.weight, bias=bias, softcap=transform.softcap)


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
