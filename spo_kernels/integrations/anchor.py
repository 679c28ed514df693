"""SPO's ``"one_step"`` anchor (SPEC 4) for a Hugging Face causal LM: the chosen responses' log-probs
after one virtual SFT step, computed with the fused kernels (no logits)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.func import functional_call

from ..api import fused_linear_sequence_logprobs
from .hf import _causal_lm, _dtensor_type, _head_leaves, head_transform
from .hf import shift_labels as _shift

Tensor = torch.Tensor


def _module_prefix(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name + "." if name else ""
    raise ValueError("the decoder is not a submodule of the model")


def _chosen_logps(decoder, params, head_weight, head_bias, transform, input_ids, attention_mask, targets, backend):
    out = functional_call(decoder, params, args=(),
                          kwargs=dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    hidden = out.last_hidden_state
    weight = head_weight.to(hidden.dtype)
    bias = None if head_bias is None else head_bias.to(hidden.dtype)
    return fused_linear_sequence_logprobs(hidden, weight, targets, bias, logit_multiplier=transform.multiplier,
                                          softcap=transform.softcap, backend=backend)


def _data_parallel_world(all_reduce: Optional[bool]) -> int:
    """The number of data-parallel processes whose batches form the SFT step (1: this batch alone)."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if all_reduce is None:
        all_reduce = active
    if all_reduce and not active:
        raise ValueError("all_reduce=True needs an initialized torch.distributed process group")
    return dist.get_world_size() if all_reduce else 1


def one_step_anchor(model, batch, alpha: float, normalize: str = "mean", backend: Optional[str] = None,
                    shift_labels: bool = False, all_reduce: Optional[bool] = None) -> Tensor:
    """SPO's ``"one_step"`` anchor: the chosen responses' log-probs after one virtual SFT step.

    ``theta' = theta - alpha * grad F(theta)`` where ``F`` is the chosen completions' token-mean NLL over
    the batch (summed NLL of all chosen tokens / number of chosen tokens), a plain gradient step on every
    trainable parameter (with PEFT: the adapter's). The chosen log-probs are then evaluated at ``theta'``
    with ``torch.func.functional_call``; the model's weights are never changed and no gradient flows out
    of the result. The head's logit transform (softcap, multiplier) is read from the config.

    Args:
        model: a Hugging Face causal LM or a PEFT model wrapping one, unwrapped from DDP (the virtual
            step is local to this process's batch). FSDP-sharded (DTensor) parameters are not supported.
        batch: ``input_ids``, ``attention_mask``, ``labels`` of shape ``[2P, T]`` (chosen rows first;
            attributes or mapping keys); only the chosen rows are used.
        alpha: step size of the virtual SFT step.
        normalize: ``"mean"`` -> per-token mean log-prob ``L_w / n_w`` (``spo_normalize="mean"``),
            ``"sum"`` -> summed ``L_w``.
        shift_labels: False: ``labels`` are position-aligned targets; True: Hugging Face labels
            (unshifted, ``-100`` outside the completion).
        all_reduce: under data parallelism (DDP: every process holds the same parameters), take the SFT
            step on the global batch: the summed NLL gradients and token counts are all-reduced, so each
            process's anchors equal one process's on the whole batch. Default: when a process group of
            more than one process is initialized.
    Returns:
        ``[P]`` fp32 tensor, detached; pass it as ``spo_anchor=`` to the fused preference loss.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha == alpha or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    get = (lambda k: batch[k]) if isinstance(batch, dict) else (lambda k: getattr(batch, k))
    input_ids, attention_mask, labels = get("input_ids"), get("attention_mask"), get("labels")
    if input_ids.shape[0] % 2:
        raise ValueError(f"the batch must hold 2P rows (chosen first), got {input_ids.shape[0]}")
    P = input_ids.shape[0] // 2
    input_ids, labels = input_ids[:P], labels[:P]
    attention_mask = None if attention_mask is None else attention_mask[:P]
    targets = _shift(labels) if shift_labels else labels

    dtensor = _dtensor_type()
    trainable: Dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if dtensor is not None and any(isinstance(p, dtensor) for p in trainable.values()):
        raise NotImplementedError("one_step_anchor does not support sharded (FSDP2 / DTensor) parameters")
    causal_lm = _causal_lm(model)
    transform = head_transform(causal_lm.config)
    head = causal_lm.get_output_embeddings()
    leaves = _head_leaves(head)
    # The head that runs now: PEFT's modules_to_save copy when its adapter is active, else the original.
    active = leaves[0] if len(leaves) == 1 else (head.modules_to_save[head.active_adapters[0]]
                                                  if not head.disable_adapters and head.active_adapters
                                                  and head.active_adapters[0] in head.modules_to_save
                                                  else head.original_module)
    decoder = causal_lm.get_decoder()
    prefix = _module_prefix(model, decoder)
    current = {n[len(prefix):]: p for n, p in trainable.items() if n.startswith(prefix)}
    world = _data_parallel_world(all_reduce)
    with torch.enable_grad():
        seq = _chosen_logps(decoder, current, active.weight, active.bias, transform, input_ids, attention_mask,
                            targets, backend)
        tokens = seq.counts.sum().to(torch.float64)
        if world > 1:  # F = global summed NLL / global token count
            import torch.distributed as dist
            dist.all_reduce(tokens)
        sft_loss = -seq.logps.sum() / tokens.clamp(min=1).to(seq.logps.dtype)
        params = list(trainable.values())
        grads = torch.autograd.grad(sft_loss, params, allow_unused=True)
    if world > 1:
        import torch.distributed as dist
        grads = [torch.zeros_like(p) if g is None else g.contiguous() for p, g in zip(params, grads)]
        for g in grads:
            dist.all_reduce(g)
    stepped = {name: (p.detach() if g is None else p.detach() - alpha * g)
               for (name, p), g in zip(trainable.items(), grads)}
    decoder_params = {n[len(prefix):]: t for n, t in stepped.items() if n.startswith(prefix)}
    # Tied heads are found under the embedding's name, so the stepped copy stays tied.
    # (A frozen head is not in ``trainable``: it keeps its own tensors.)
    names = {id(p): n for n, p in trainable.items()}
    weight = stepped.get(names.get(id(active.weight)), active.weight)
    bias = None if active.bias is None else stepped.get(names.get(id(active.bias)), active.bias)
    with torch.no_grad():
        after = _chosen_logps(decoder, decoder_params, weight, bias, transform, input_ids, attention_mask, targets,
                              backend)
    logps = after.logps.float()
    if normalize == "mean":
        logps = logps / after.counts.clamp(min=1).to(logps.dtype)
    return logps.detach()
