"""Fused-linear path in Triton (docs/gradient.md §6-§8): the compatibility module that names it all.

The code lives in
- ``linear_config.py``: :class:`LinearKernelConfig`, :func:`kernel_config`, ``CONFIG_OVERRIDES``;
- ``linear_plan.py``: :func:`plan_backward`, :class:`BackwardPlan` (the backward's blocks and buffers);
- ``linear_forward.py``: the forward kernels and :func:`linear_forward`;
- ``linear_backward.py``: the backward kernels, :class:`BlockLaunches` and :func:`linear_backward`;
- ``triton_helpers.py``: device helpers and the hooks every launcher reads (poison, SM count, device guard).

Hooks. The launchers read their mutable hooks from those homes at call time. Code written against this
module keeps working: reading or assigning (``monkeypatch.setattr``) one of the names in ``_FORWARDED``
here reads or assigns it in its home (each is a property of this module's class), e.g.
``linear_logprobs.CONFIG_OVERRIDES = {...}`` sets ``linear_config.CONFIG_OVERRIDES``,
``linear_logprobs._num_sms = f`` sets ``triton_helpers.num_sms``, and
``linear_logprobs._forward_partials_kernel = recorder`` replaces the kernel ``linear_forward`` launches.
"""

from __future__ import annotations

import sys
import types

from . import linear_backward as _backward
from . import linear_config as _config
from . import linear_forward as _forward
from . import triton_helpers as _helpers
from .linear_backward import BlockLaunches, linear_backward
from .linear_config import _TABLE_FIELDS, LinearKernelConfig, kernel_config
from .linear_forward import linear_forward
from .linear_plan import BackwardPlan, _plan_blocks, _ranges, _tail_blocks, plan_backward
from .types import LinearGrads

__all__ = ["BackwardPlan", "BlockLaunches", "LinearGrads", "LinearKernelConfig", "kernel_config", "linear_backward",
           "linear_forward", "plan_backward"]

# name here -> (home module, name there)
_FORWARDED = {
    "CONFIG_OVERRIDES": (_config, "CONFIG_OVERRIDES"),
    "POISON_EMPTY": (_helpers, "POISON_EMPTY"),
    "_empty": (_helpers, "empty"),
    "_num_sms": (_helpers, "num_sms"),
    "_device_ctx": (_helpers, "device_guard"),
    **{name: (mod, name) for mod in (_forward, _backward) for name in vars(mod) if name.endswith("_kernel")},
}


def _forwarding_property(name: str) -> property:
    home, attr = _FORWARDED[name]
    return property(lambda self: getattr(home, attr), lambda self, value: setattr(home, attr, value),
                    doc=f"{home.__name__}.{attr}")


# Properties (data descriptors), so that ``monkeypatch.setattr`` records and restores the home's value.
_ForwardingModule = type("_ForwardingModule", (types.ModuleType,),
                         {name: _forwarding_property(name) for name in _FORWARDED})
sys.modules[__name__].__class__ = _ForwardingModule
