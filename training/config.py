"""The trainer's configuration: one flat dataclass, one field per command-line flag.

Loss options: the fields of :class:`spo_kernels.PreferenceLossConfig` that the trainer names itself are
fields here (``loss_type``, ``beta``, ``spo_lambda``, ...); every other field of that class (``dpop_lambda``,
``rdpo_alpha``, ``discopop_tau``, and whatever the loss gains later) goes into ``loss_options`` and gets
its command-line flag from the class itself (training/__main__.py), so no loss option is out of reach.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Union

from spo_kernels import PreferenceLossConfig

OBJECTIVES = ("preference", "sft")
REFERENCE_MODES = ("precompute", "model")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")  # or "cuda:N"
DTYPES = ("fp32", "bf16", "bf16-autocast")
DIST_MODES = ("auto", "none", "ddp", "fsdp2")

# Fields of PreferenceLossConfig the trainer never takes from the user: they come from the model's config
# (softcap, logit_multiplier) or from the data (ignore_index).
MODEL_OWNED_LOSS_FIELDS = ("softcap", "logit_multiplier", "ignore_index")

# Fields that may differ between a run and its --resume without changing what is computed.
RESUME_FREE_FIELDS = ("progress", "save_every", "plot", "overwrite")


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Data and model:
        data: JSONL file of ``{"prompt", "chosen", "rejected"}`` rows (TRL's format).
        model: local path of a Hugging Face causal LM (``save_pretrained`` layout); None builds the
            built-in small Llama from ``builtin_*`` with the character tokenizer.
        tokenizer: local tokenizer path; defaults to ``model``.
        out_dir: where metrics, checkpoints, the final model and plots go. An existing run folder is
            refused unless ``--resume`` (continue it) or ``overwrite`` (start over in it).
        objective: "preference" (the fused preference loss) or "sft" (token-mean NLL of the chosen
            completions, for building the starting checkpoint).
        packed: padding-free batches: each micro-batch's prompt+completion sequences are packed into one
            row with ``cu_seqlens`` and per-sequence position ids (flash-attn varlen attention when the
            model uses it, a block-diagonal causal mask otherwise) and fed to the loss's packed layout.
    Loss (see :class:`spo_kernels.PreferenceLossConfig`; the softcap comes from the model's config):
        loss_type, beta, label_smoothing, reference_free, sft_weight, simpo_gamma (SimPO's target margin),
        spo_lambda (0 = plain DPO-family loss), spo_margin, spo_normalize,
        spo_anchor: "reference" (per-token reference log-prob) or "one_step" (computed each batch by
            :func:`training.one_step_anchor` with step size ``spo_alpha``).
        loss_options: any other PreferenceLossConfig field, by name (e.g. ``{"dpop_lambda": 20.0}``).
        reference: "precompute" (default: one forward pass over the data before training, cached on
            disk at ``ref_cache`` or ``<out_dir>/ref_logps.pt`` and reused) or "model" (a frozen copy of
            the starting model runs forward-only on every batch).
    Device and precision: ``device`` "auto" (cuda when present) / "cpu" / "cuda" / "cuda:N" (under torchrun
        each rank takes ``cuda:LOCAL_RANK``); ``dtype`` "fp32", "bf16" (weights and optimizer state in bf16)
        or "bf16-autocast" (fp32 weights, bf16 matmuls under ``torch.autocast``). ``backend`` None lets the
        package choose by device (triton on GPU).
    Optimization: AdamW with ``lr``, ``weight_decay``, ``warmup_steps`` and ``lr_schedule``; ``batch_size``
        pairs per optimizer step (the global batch, over all ranks and micro-batches) for ``max_steps``
        steps, in ``grad_accum`` micro-batches per rank; gradient-norm clipping at ``max_grad_norm`` (0 = off).
        A step's loss is the mean of its micro-batches' losses over ranks (as in TRL and the HF Trainer):
        for losses that are means over pairs this is exactly the loss of the whole batch.
    Distributed: ``dist`` "auto" (DDP under torchrun with more than one process, else none), "none",
        "ddp" or "fsdp2" (torch.distributed; gloo on CPU, nccl on GPU). ``batch_size`` must divide by
        world size x ``grad_accum``.
    Bookkeeping: ``save_every`` steps a checkpoint (and on SIGINT/SIGTERM); ``--resume`` continues from it.
    """

    data: str = ""
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    out_dir: str = "runs/train"
    objective: str = "preference"
    packed: bool = False

    builtin_hidden_size: int = 128
    builtin_layers: int = 4
    builtin_heads: int = 4

    loss_type: Union[str, List[str]] = "sigmoid"
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
    loss_options: dict = field(default_factory=dict)
    reference: str = "precompute"
    ref_cache: Optional[str] = None
    backend: Optional[str] = None

    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None

    device: str = "auto"
    dtype: str = "fp32"
    dist: str = "auto"

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
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
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("reference", REFERENCE_MODES),
                              ("lr_schedule", LR_SCHEDULES), ("dtype", DTYPES), ("dist", DIST_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not (self.device in DEVICES or (isinstance(self.device, str) and self.device.startswith("cuda:")
                                           and self.device[5:].isdigit())):
            raise ValueError(f"device must be one of {list(DEVICES)} or 'cuda:N', got {self.device!r}")
        for name in ("max_steps", "batch_size", "save_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if not isinstance(self.loss_options, dict):
            raise TypeError(f"loss_options must be a dict of PreferenceLossConfig fields, "
                            f"got {type(self.loss_options).__name__}")
        named = {f.name for f in dataclasses.fields(TrainConfig)}
        known = {f.name for f in dataclasses.fields(PreferenceLossConfig)}
        for key in self.loss_options:
            if key not in known or key in MODEL_OWNED_LOSS_FIELDS:
                raise ValueError(f"loss_options: {key!r} is not a loss option the trainer passes on "
                                 f"(PreferenceLossConfig fields, less {list(MODEL_OWNED_LOSS_FIELDS)})")
            if key in named:
                raise ValueError(f"loss_options: {key!r} is a TrainConfig field of its own; set it there")
        if self.objective == "preference":
            loss = self.loss_config()  # validates the loss fields early, with the library's messages
            ld_alpha = loss.ld_alpha
            if ld_alpha is not None and ld_alpha != 1.0 and loss.needs_reference:
                # LD-DPO weighs the reference's tokens too; the trainer's reference log-probs (the cache, or
                # the frozen model's forward) are plain sums, which would be silently wrong here.
                raise ValueError(f"ld_alpha={ld_alpha} with a loss that reads reference log-probs is not supported "
                                 f"by the trainer (its reference log-probs are unweighted sums); use a "
                                 f"reference-free loss or leave ld_alpha unset")

    def loss_config(self, softcap: Optional[float] = None) -> PreferenceLossConfig:
        """The loss configuration; ``softcap`` comes from the model (the trainer refuses models that
        scale their logits otherwise, see ``modeling.lm_head``)."""
        loss_type = self.loss_type if isinstance(self.loss_type, str) else tuple(self.loss_type)
        return PreferenceLossConfig(
            beta=self.beta, loss_type=loss_type, label_smoothing=self.label_smoothing,
            reference_free=bool(self.reference_free), sft_weight=self.sft_weight,
            simpo_gamma=self.simpo_gamma, spo_lambda=self.spo_lambda,
            spo_margin=self.spo_margin, spo_normalize=self.spo_normalize, spo_anchor=self.spo_anchor,
            softcap=softcap, **self.loss_options)

    @property
    def uses_one_step_anchor(self) -> bool:
        return self.objective == "preference" and self.spo_lambda > 0 and self.spo_anchor == "one_step"

    @property
    def needs_reference(self) -> bool:
        return self.objective == "preference" and self.loss_config().needs_reference

    @property
    def loss_name(self) -> str:
        if self.objective != "preference":
            return "nll"
        name = self.loss_type if isinstance(self.loss_type, str) else "+".join(self.loss_type)
        return name + ("+spo" if self.spo_lambda > 0 else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
