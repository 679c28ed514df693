"""spo-kernels: fused kernels for DPO-family preference losses and Stable Preference Optimization.

Public API (see README):
    fused_linear_preference_loss, preference_loss            -> PreferenceLossOutput
    fused_linear_sequence_logprobs, sequence_logprobs        -> SequenceLogprobs
    FusedLinearPreferenceLoss, PreferenceLoss                (nn.Module)
    PreferenceLossConfig, LOSS_TYPES
"""

from .api import (fused_linear_preference_loss, fused_linear_sequence_logprobs, preference_loss,
                  sequence_logprobs)
from .config import LOSS_TYPES, PreferenceLossConfig
from .losses import METRIC_NAMES
from .modules import FusedLinearPreferenceLoss, PreferenceLoss
from .output import PreferenceLossOutput, SequenceLogprobs

__version__ = "0.1.0"

__all__ = [
    "fused_linear_preference_loss", "fused_linear_sequence_logprobs", "preference_loss", "sequence_logprobs",
    "FusedLinearPreferenceLoss", "PreferenceLoss", "PreferenceLossConfig", "PreferenceLossOutput",
    "SequenceLogprobs", "LOSS_TYPES", "METRIC_NAMES",
]
