"""Devices and torch.distributed for the trainer: one process, or DDP / FSDP2 under ``torchrun``.

The trainer never runs a home-made distributed engine: ``torchrun`` starts the processes (its
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` environment variables), ``torch.distributed`` connects them
(nccl on GPU, gloo on CPU), and the policy is wrapped by ``DistributedDataParallel`` or FSDP2's
``fully_shard`` (one unit per decoder layer, the root unit holding embeddings, final norm and head).
The loss runs inside the wrapped module's forward (:class:`training.modeling.PolicyWithLoss`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import TrainConfig


@dataclass
class Runtime:
    """Where this process runs: its device, and its place among the processes of the run."""

    mode: str               # "none" | "ddp" | "fsdp2"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes metrics, plots, the final model and the single-file checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean_over_ranks(self, values: Dict[str, float]) -> Dict[str, float]:
        """Every rank's numbers averaged (in float64, in a fixed key order); one process: as they are."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. "a stop signal arrived": all ranks stop at
        the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": cuda when present (``cuda:LOCAL_RANK`` under torchrun), else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA device (torch {torch.__version__})")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def start(cfg: TrainConfig) -> Runtime:
    """This process's :class:`Runtime`; under torchrun (``WORLD_SIZE`` set) it joins the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mode = cfg.dist
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode != "none" and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"dist={cfg.dist!r} needs the processes started by torchrun "
                         f"(torchrun --nproc_per_node N -m training train ...)")
    if mode == "none" and world_size > 1:
        raise ValueError(f"dist='none' under torchrun with {world_size} processes would train {world_size} "
                         f"independent copies; use dist 'ddp' or 'fsdp2'")
    device = resolve_device(cfg.device, local_rank)
    if mode != "none":
        per_step = world_size * cfg.grad_accum
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of world size x grad_accum "
                             f"({world_size} x {cfg.grad_accum}): every rank takes an equal slice of the batch")
        if cfg.uses_one_step_anchor:
            raise ValueError("spo_anchor='one_step' takes its SFT step on the whole batch in one process; "
                             "run it without torchrun (or use spo_anchor='reference')")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(mode=mode, rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def stop(runtime: Runtime, failed: bool = False) -> None:
    """Leave the process group. After a failure no barrier: the other ranks may never reach it, and this
    process must exit so that torchrun ends the run."""
    if runtime.distributed and torch.distributed.is_initialized():
        if not failed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def attention_implementation(packed: bool, device: torch.device, dtype: str) -> Optional[str]:
    """Packed rows on a GPU run flash-attn's varlen kernel when flash-attn is installed (16-bit weights);
    otherwise None: the model's default (SDPA), with the block-diagonal mask built from position ids."""
    if not (packed and device.type == "cuda" and dtype == "bf16"):
        return None
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return None
    return "flash_attention_2"


def decoder_layers(model) -> list:
    """The transformer blocks of a Hugging Face causal LM (``model.get_decoder().layers``)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard with FSDP2")
    return list(layers)


def wrap(runtime: Runtime, module: torch.nn.Module, hf_model, trainable: bool = True) -> torch.nn.Module:
    """``module`` (whose forward runs ``hf_model``) wrapped for this run: DDP (a trainable module only;
    a frozen reference model is simply replicated) or FSDP2 (each decoder layer, then the root)."""
    if runtime.mode == "ddp":
        if not trainable:
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if runtime.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in decoder_layers(hf_model):
            fully_shard(layer)
        fully_shard(module)
        return module
    return module


def total_grad_norm(params, max_norm: float, runtime: Runtime) -> float:
    """Clip to ``max_norm`` (0 = no clipping) and return the global norm before clipping (FSDP2's
    sharded gradients included)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif runtime.mode == "fsdp2":
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    else:
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_model_state(runtime: Runtime, policy: torch.nn.Module, hf_model) -> Optional[dict]:
    """The whole model's state dict on rank 0 (CPU; gathered from the shards under FSDP2), with the
    Hugging Face model's own key names; None on the other ranks."""
    if runtime.mode != "fsdp2":
        return hf_model.state_dict() if runtime.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not runtime.is_main:
        return None
    prefix = "model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
