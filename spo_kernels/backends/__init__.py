"""Backends: the same four ops on different hardware, selected by argument, environment or device.

Every backend implements the ops below on a :class:`~spo_kernels.layout.TokenPlan` (only the
completion tokens, compacted). Log-probs and LSEs are fp32 (float64 for float64 inputs); the
per-sequence sums ``seq_logps`` are float64 on every backend (SPEC 7: a DPO loss is a function of
differences of large sums, and fp32 sums of 8k log-probs cost ~5e-4 of it), the loss step computes in
the precision it is given (float64) and the public outputs are fp32.

- ``logits_forward(logits [N,V], plan, softcap, temperature) -> (seq_logps [S], lse [Nc])``
- ``logits_backward(logits [N,V], plan, softcap, temperature, lse [Nc], grad_seq [S], out [N,V])``:
  writes ``grad_seq[s] * (onehot(y) - softmax(z)) * dz/dlogits`` into ``out`` for plan rows and 0
  elsewhere; ``out`` may be ``logits`` itself (in-place backward).
- ``linear_forward(hidden [N,H], weight [V,H], bias [V]|None, plan, softcap, temperature, save_lse)
  -> (seq_logps [S], lse [Nc] or None)``
- ``linear_backward(hidden, weight, bias, plan, softcap, temperature, lse, grad_seq, need_hidden,
  need_weight, need_bias, deterministic=False, grad_filter_eps=0.0) -> LinearGrads`` (``dhidden [N,H]`` in hidden's dtype, zero on ignored rows;
  ``dweight``/``dbias`` accumulated in fp32 and returned in the parameter's dtype; None when not needed).
- ``loss_step(...)``: the closed-form loss of :func:`spo_kernels.losses.preference_loss_step`.

  ``deterministic=True`` asks for bitwise-identical results across runs; ``grad_filter_eps > 0`` lets a
  backend skip vocabulary tiles whose ``|onehot - softmax|`` is below eps everywhere (approximate,
  opt-in; backends without a filter compute exactly).

Names: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (the C++ extension built from
``csrc/``), ``torch`` (chunked PyTorch, any device), ``reference`` (naive, autograd, tests only;
handled by the public functions). Selection: the ``backend=`` argument, else
``$SPO_KERNELS_BACKEND``, else ``triton`` for CUDA tensors, ``cpu`` for CPU tensors when the
extension is built, ``torch`` otherwise.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ..losses import preference_loss_step

BACKENDS = ("triton", "cpu", "torch", "reference")
ENV_VAR = "SPO_KERNELS_BACKEND"


class LinearGrads(NamedTuple):
    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


class Backend:
    """Base class: the loss step is shared; the four log-prob ops are each backend's own."""

    name = "base"

    def loss_step(self, policy_logps, counts, ref_logps, cfg, anchor=None, bco_delta=None):
        return preference_loss_step(policy_logps, counts, ref_logps, cfg, anchor, bco_delta)

    def logits_forward(self, logits, plan, softcap, temperature):
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def logits_backward(self, logits, plan, softcap, temperature, lse, grad_seq, out):
        raise NotImplementedError(f"backend {self.name!r} has no logits path")

    def linear_forward(self, hidden, weight, bias, plan, softcap, temperature, save_lse):
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")

    def linear_backward(self, hidden, weight, bias, plan, softcap, temperature, lse, grad_seq,
                        need_hidden, need_weight, need_bias, deterministic=False, grad_filter_eps=0.0):
        raise NotImplementedError(f"backend {self.name!r} has no fused-linear path")


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cpu_extension_available() -> bool:
    try:
        from .cpu import extension_available
    except ImportError:
        return False
    return extension_available()


def resolve_backend_name(name: Optional[str], device: torch.device) -> str:
    """The backend to use: explicit name, else ``$SPO_KERNELS_BACKEND``, else by device."""
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if name is None:
        if device.type == "cuda":
            return "triton" if _triton_usable(device) else "torch"
        return "cpu" if device.type == "cpu" and _cpu_extension_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is unknown; expected one of {list(BACKENDS)}")
    if name == "triton" and not _triton_usable(device):
        raise ValueError(f"{source}='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         f"the inputs are on {device}")
    if name == "cpu" and (device.type != "cpu" or not _cpu_extension_available()):
        raise ValueError(f"{source}='cpu' needs CPU tensors and the C++ extension built from csrc/ "
                         f"(pip install -e . with a compiler); the inputs are on {device}")
    return name


def get_backend(name: str) -> Backend:
    if name == "torch":
        from .torch_chunked import TorchChunkedBackend
        return TorchChunkedBackend()
    if name == "triton":
        from .triton import TritonBackend
        return TritonBackend()
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend()
    raise ValueError(f"backend {name!r} has no op implementation (the reference backend is autograd-only)")
