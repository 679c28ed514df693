"""Backends: the same ops on different hardware, selected by argument, environment or device.

The interface is :class:`~spo_kernels.backends.base.Backend` (its module documents the ops and the
precision of their results). Names: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu``
(the C++ extension built from ``csrc/``), ``torch`` (chunked PyTorch, any device), ``reference``
(naive, materializes logits, differentiated by autograd; tests only). Selection: the ``backend=``
argument, else ``$SPO_KERNELS_BACKEND``, else ``triton`` for CUDA tensors, ``cpu`` for CPU tensors
when the extension is built, ``torch`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .base import Backend, LinearGrads

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "LinearGrads", "get_backend", "resolve_backend_name"]

BACKENDS = ("triton", "cpu", "torch", "reference")
ENV_VAR = "SPO_KERNELS_BACKEND"


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
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    raise ValueError(f"backend {name!r} is unknown; expected one of {list(BACKENDS)}")
