"""The trainer's configuration: one flat dataclass, one field per command-line flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from spo_kernels import PreferenceLossConfig

OBJECTIVES = ("preference", "sft")
REFERENCE_MODES = ("precompute", "model")
LR_SCHEDULES = ("constant", "linear", "cosine")

# Fields that may differ between a run and its --resume without changing what is computed.
RESUME_FREE_FIELDS = ("progress", "save_every", "plot")


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Data and model:
        data: JSONL file of ``{"prompt", "chosen", "rejected"}`` rows (TRL's format).
        model: local path of a Hugging Face causal LM (``save_pretrained`` layout); None builds the
            built-in small Llama from ``builtin_*`` with the character tokenizer.
        tokenizer: local tokenizer path; defaults to ``model``.
        out_dir: where metrics, checkpoints, the final model and plots go.
        objective: "preference" (the fused preference loss) or "sft" (token-mean NLL of the chosen
            completions, for building the starting checkpoint).
    Loss (see :class:`spo_kernels.PreferenceLossConfig`; the softcap comes from the model's config):
        loss_type, beta, label_smoothing, reference_free, sft_weight, simpo_gamma (SimPO's target margin),
        spo_lambda (0 = plain DPO-family loss), spo_margin, spo_normalize,
        spo_anchor: "reference" (per-token reference log-prob) or "one_step" (computed each batch by
            :func:`training.one_step_anchor` with step size ``spo_alpha``).
        reference: "precompute" (default: one forward pass over the data before training, cached on
            disk at ``ref_cache`` or ``<out_dir>/ref_logps.pt`` and reused) or "model" (a frozen copy of
            the starting model runs forward-only on every batch).
    Optimization: AdamW with ``lr``, ``weight_decay``, ``warmup_steps`` and ``lr_schedule``; ``batch_size``
        pairs per step for ``max_steps`` steps; gradient-norm clipping at ``max_grad_norm`` (0 = off).
    Bookkeeping: ``save_every`` steps a checkpoint (and on SIGINT/SIGTERM); ``--resume`` continues from it.
    """

    data: str = ""
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    out_dir: str = "runs/train"
    objective: str = "preference"

    builtin_hidden_size: int = 128
    builtin_layers: int = 4
    builtin_heads: int = 4

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_weight: float = 0.0
    simpo_gamma: float = 0.5
    spo_lambda: float = 0.0
    spo_margin: float = 0.0
    spo_normalize: str = "mean"
    spo_anchor: str = "reference"
    spo_alpha: float = 0.1
    reference: str = "precompute"
    ref_cache: Optional[str] = None
    backend: Optional[str] = None

    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None

    max_steps: int = 100
    batch_size: int = 8
    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    seed: int = 0
    num_threads: int = 0

    save_every: int = 100
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {list(REFERENCE_MODES)}, got {self.reference!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("max_steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.objective == "preference":
            self.loss_config()  # validates the loss fields early, with the library's messages

    def loss_config(self, softcap: Optional[float] = None) -> PreferenceLossConfig:
        return PreferenceLossConfig(
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            reference_free=bool(self.reference_free), sft_weight=self.sft_weight,
            simpo_gamma=self.simpo_gamma, spo_lambda=self.spo_lambda,
            spo_margin=self.spo_margin, spo_normalize=self.spo_normalize, spo_anchor=self.spo_anchor,
            softcap=softcap)

    @property
    def uses_one_step_anchor(self) -> bool:
        return self.objective == "preference" and self.spo_lambda > 0 and self.spo_anchor == "one_step"

    @property
    def needs_reference(self) -> bool:
        return self.objective == "preference" and self.loss_config().needs_reference

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
