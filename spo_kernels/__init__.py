"""spo-kernels: fused kernels for DPO-family preference losses and Stable Preference Optimization.

Public API (see README):
    fused_linear_preference_loss, preference_loss            -> PreferenceLossOutput
    fused_linear_sequence_logprobs, sequence_logprobs        -> SequenceLogprobs
    FusedLinearPreferenceLoss, PreferenceLoss                (nn.Module)
    PreferenceLossConfig, LOSS_TYPES
    resolve_backend(device)                                   -> which backend a call on `device` runs
Integrations (imported on demand): spo_kernels.integrations.hf / .trl / .anchor
"""

from .api import (fused_linear_preference_loss, fused_linear_sequence_logprobs, preference_loss,
                  sequence_logprobs)
from .config import LOSS_TYPES, PreferenceLossConfig
from .losses import METRIC_NAMES
from .modules import FusedLinearPreferenceLoss, PreferenceLoss
from .output import PreferenceLossOutput, SequenceLogprobs

__version__ = "0.1.0"


def resolve_backend(device="cpu", backend=None) -> str:
    """The backend a call on ``device`` runs: ``backend`` if given (validated), else
    ``$SPO_KERNELS_BACKEND``, else ``"triton"`` on CUDA, ``"cpu"`` on CPU when the C++ extension was
    built, ``"torch"`` otherwise. E.g. ``spo_kernels.resolve_backend(hidden.device)``."""
    import torch

    from .backends import resolve_backend_name

    return resolve_backend_name(backend, torch.device(device))


__all__ = [
    "fused_linear_preference_loss", "fused_linear_sequence_logprobs", "preference_loss", "sequence_logprobs",
    "FusedLinearPreferenceLoss", "PreferenceLoss", "PreferenceLossConfig", "PreferenceLossOutput",
    "SequenceLogprobs", "LOSS_TYPES", "METRIC_NAMES", "resolve_backend",
]
