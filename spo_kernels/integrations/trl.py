"""TRL 1.16: ``SPOConfig`` / ``SPOTrainer``, drop-in replacements for ``DPOConfig`` / ``DPOTrainer``.

Switching is two imports::

    from spo_kernels.integrations.trl import SPOConfig as DPOConfig, SPOTrainer as DPOTrainer

Everything else of a TRL script stays: datasets, collator, ``ref_model`` (or none: a copy, or with PEFT
the adapter-disabled model), ``precompute_ref_log_probs``, PEFT, DDP / FSDP2 through accelerate,
evaluation, TRL's metric names gathered across ranks as TRL gathers them. The loss and every log-prob
come from spo_kernels' fused head, run inside the model's own forward
(:mod:`spo_kernels.integrations.hf`). ``spo_lambda=0`` (the default) is TRL's loss; the SPO options
``spo_lambda``, ``spo_margin``, ``spo_normalize``, ``spo_anchor`` ("reference" or "one_step", with
``spo_alpha``) add the stability term of SPEC 4. A ``DPOConfig`` option this package cannot honour
raises when the config is built, never a silently different loss.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..config import PreferenceLossConfig
from .anchor import one_step_anchor
from .hf import enable_fused_head, ld_token_weights, shift_labels

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass
class SPOConfig(DPOConfig):
    """``DPOConfig`` plus the SPO stability term (SPEC 4) and the spo_kernels backend.

    spo_lambda: penalty weight (0 = plain TRL loss; 1.0 is the usual SPO setting).
    spo_margin: delta in ``relu(a - Lbar_w + delta)``.
    spo_normalize: "mean" (per-token log-probs) or "sum".
    spo_anchor: "reference" (the reference model's chosen log-probs) or "one_step" (after one virtual
        SFT step of size ``spo_alpha`` on the batch's chosen responses).
    spo_alpha: the one-step anchor's step size (default: ``learning_rate``).
    spo_backend: spo_kernels backend ("triton", "cpu", "torch"; default: chosen by device).
    """

    spo_lambda: float = field(default=0.0, metadata={"help": "SPO penalty weight; 0 turns SPO off."})
    spo_margin: float = field(default=0.0, metadata={"help": "SPO margin delta."})
    spo_normalize: str = field(default="mean", metadata={"help": "'mean' (per token) or 'sum'."})
    spo_anchor: str = field(default="reference", metadata={"help": "'reference' or 'one_step'."})
    spo_alpha: Optional[float] = field(default=None, metadata={"help": "one-step anchor step size "
                                                                          "(default: learning_rate)."})
    spo_backend: Optional[str] = field(default=None, metadata={"help": "spo_kernels backend."})

    def __post_init__(self):
        super().__post_init__()
        spo_loss_config(self)  # every unsupported option raises here, before any model is loaded


def spo_loss_config(args) -> PreferenceLossConfig:
    """The :class:`PreferenceLossConfig` a ``DPOConfig`` / ``SPOConfig`` maps to; raises for an option
    this package does not support (``NotImplementedError``) or a bad value (``ValueError``)."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    weights = args.loss_weights
    options = dict(beta=args.beta, label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
                   spo_lambda=getattr(args, "spo_lambda", 0.0), spo_margin=getattr(args, "spo_margin", 0.0),
                   spo_normalize=getattr(args, "spo_normalize", "mean"),
                   spo_anchor=getattr(args, "spo_anchor", "reference"))
    options["loss_type"] = loss_types
    options["loss_weights"] = None if weights is None else list(weights)
    if "sigmoid" in loss_types and args.label_smoothing != 0:
        raise ValueError(f"label_smoothing={args.label_smoothing} with loss_type 'sigmoid': TRL 1.16's sigmoid loss "
                         f"ignores label_smoothing, spo_kernels' applies cDPO smoothing; set label_smoothing=0.0 "
                         f"(TRL's numbers) or use loss_type='robust'")
    if args.f_divergence_type != "reverse_kl":
        options["f_divergence_type"] = args.f_divergence_type
        options["f_alpha_divergence_coef"] = args.f_alpha_divergence_coef
    if args.use_weighting:
        options["use_weighting"] = True
    if args.ld_alpha is not None:
        options["ld_alpha"] = args.ld_alpha
    alpha = getattr(args, "spo_alpha", None)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"spo_alpha must be a finite number >= 0 or None, got {alpha!r}")
    try:
        return PreferenceLossConfig(**options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"SPOConfig: {exc}") from exc


class SPOTrainer(DPOTrainer):
    """TRL 1.16's ``DPOTrainer`` with the loss and log-probs from spo_kernels' fused head.

    Same constructor as ``DPOTrainer``. ``args`` may be an :class:`SPOConfig` or a plain ``DPOConfig``
    (then SPO is off). Logged metrics: TRL's (``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``,
    ``mean_token_accuracy``, ``num_tokens``), gathered across ranks as TRL does, plus ``spo/penalty``
    and ``spo/active_fraction`` when ``spo_lambda > 0``.
    """

    _tag_names = ["trl", "dpo", "spo-kernels"]
    _name = "SPO"

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, *more, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SPOConfig(f"{str(name).split('/')[-1]}-SPO")
        # Before the parent's constructor, which may already compute reference log-probs through us.
        self._spo_config = spo_loss_config(args)
        self._spo_backend = getattr(args, "spo_backend", None)
        super().__init__(model, ref_model, args, *more, **kwargs)
        if self._is_vision_dataset:
            raise NotImplementedError("SPOTrainer does not support vision-language datasets")
        if self.aux_loss_enabled:
            raise NotImplementedError("SPOTrainer does not compute MoE router auxiliary losses: set "
                                      "router_aux_loss_coef=0.0")
        self._spo_patch(self.model)
        if self.ref_model is not None:
            self._spo_patch(self.ref_model)

    # -- models ---------------------------------------------------------------------------------
    def _spo_patch(self, model):
        """Install the fused head on the causal LM inside ``model`` (idempotent)."""
        inner = self.accelerator.unwrap_model(model)
        peft_cfg = getattr(inner, "peft_config", None)
        if peft_cfg and any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values()):
            raise NotImplementedError("prompt-learning PEFT methods (virtual tokens) are not supported by SPOTrainer")
        enable_fused_head(inner, backend=self._spo_backend)

    def _ld_weights(self, labels):
        cfg = self._spo_config
        if cfg.ld_alpha is None:
            return None
        return ld_token_weights(shift_labels(labels), cfg.ld_alpha)

    def _reference_logps(self, model, model_kwargs, labels):
        """``[2P]`` reference log-probs: ``ref_model``, or the PEFT model with its adapter disabled (or its
        "ref" adapter), as TRL; no gradient."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            model = self.model
        else:
            model = model if self.ref_model is None else self.ref_model
        self._spo_patch(model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter:
            # With the policy's kernel options (statistics on), so that a reference equal to the policy gives
            # the same bits and zero rewards, as TRL's one fused head does.
            out = model(**model_kwargs, labels=labels, spo_logps=True, spo_token_weights=self._ld_weights(labels),
                        spo_token_stats=True)
        return out.logps.detach()

    @staticmethod
    def _split_inputs(inputs):
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model_kwargs, labels

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (``precompute_ref_log_probs``): ``(chosen [P], rejected [P])``."""
        model_kwargs, labels = self._split_inputs(inputs)
        with self.accelerator.autocast():
            ref = self._reference_logps(model, model_kwargs, labels)
        return ref.chunk(2, dim=0)

    # -- loss -----------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        cfg = self._spo_config
        model_kwargs, labels = self._split_inputs(inputs)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            ref_logps = self._reference_logps(model, model_kwargs, labels)
        anchor = None
        if cfg.spo_lambda > 0 and cfg.spo_anchor == "one_step":
            alpha = self.args.spo_alpha if getattr(self.args, "spo_alpha", None) is not None else self.args.learning_rate
            batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "labels": labels}
            anchor = one_step_anchor(self.accelerator.unwrap_model(model), batch, alpha, cfg.spo_normalize,
                                     self._spo_backend, shift_labels=True)
        # TRL 1.16's bco_pair has no reward shift: neither has the package's, by default.
        out = model(**model_kwargs, labels=labels, spo_loss=cfg, spo_ref_logps=ref_logps, spo_anchor=anchor,
                    spo_token_stats=True)
        self._log_metrics(mode, inputs, out, ref_logps)
        if return_outputs:
            warnings.warn("return_outputs=True recomputes the full logits with an extra forward pass (for "
                          "compute_metrics), as TRL does", stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return out.loss, outputs
        return out.loss

    def _log_metrics(self, mode, inputs, out, ref_logps):
        """TRL 1.16's metrics, with its cross-rank gathering (sums and counts, or per-sample values)."""
        acc, metrics = self.accelerator, self._metrics[mode]
        stats = out.token_stat_sums

        def ratio(num, den):
            num, den = acc.gather_for_metrics(num).sum(), acc.gather_for_metrics(den).sum()
            return (num / den).item() if den > 0 else 0.0

        metrics["entropy"].append(ratio(stats["entropy"], stats["tokens"]))
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(ratio(stats["logits/chosen"], stats["tokens/chosen"]))
        metrics["logits/rejected"].append(ratio(stats["logits/rejected"], stats["tokens/rejected"]))
        metrics["mean_token_accuracy"].append(ratio(stats["mean_token_accuracy"], stats["tokens/chosen"]))

        logps = out.logps.detach().float()
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.to(logps.device).float().chunk(2)
        chosen_rewards = self.beta * (chosen - ref_chosen)
        rejected_rewards = self.beta * (rejected - ref_rejected)
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected).mean().item())
        for name in ("spo/penalty", "spo/active_fraction"):
            if name in (out.metrics or {}):
                metrics[name].append(acc.gather(out.metrics[name].detach().float().reshape(1)).mean().item())
