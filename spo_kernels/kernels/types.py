"""Plain result types returned by the kernel launchers. The bottom layer: ``spo_kernels.backends``
imports them from here (and re-exports them), never the other way round."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LinearGrads(NamedTuple):
    """Gradients of the fused-linear path (docs/gradient.md §4): ``hidden [N, H]`` in hidden's dtype
    (zero on rows outside the plan), ``weight [V, H]`` / ``bias [V]`` in their parameter's dtype; None
    where not requested."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
