"""The ``cpu`` backend: the C++ extension ``spo_kernels._cpu`` built from ``csrc/`` by setup.py.

Same four ops and semantics as the ``torch`` backend (:mod:`.torch_chunked`), on CPU tensors:

- logits path: one fused pass per completion-token row, rows in parallel: transform (softcap,
  temperature), online max / sum-exp, target gather in the forward; transform, exp, normalize,
  one-hot and chain rule written straight into the output row in the backward (``out`` may be the
  logits buffer). No ``[rows, V]`` temporaries.
- fused-linear path: completion tokens gathered into tiles, the vocabulary walked in blocks of W;
  each logits block ``[tokens, Vb]`` (at most ``$SPO_KERNELS_CPU_BLOCK_MB`` MiB, default 16) is one
  BLAS GEMM, reduced in place by the same row kernels; the backward forms ``dz`` in place and
  feeds it to the dhidden / dW GEMMs, producing each dW block once in fp32.

Always deterministic (fixed blocking and order, no atomics) and exact (``grad_filter_eps`` is
accepted and ignored). bf16/fp16 operands are upcast to fp32 per tile; LSEs, log-probs and sums are
fp32 (float64 for float64 inputs). Other dtypes fall back to the ``torch`` backend.
"""

from __future__ import annotations

import os

import torch

from . import Backend, LinearGrads

try:  # the compiled extension is optional: setup.py skips it when it cannot be built
    from .. import _cpu
except (ImportError, OSError):  # not built, or built against another torch
    _cpu = None

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def extension_available() -> bool:
    """True when ``spo_kernels._cpu`` was built and imports."""
    return _cpu is not None


def _require():
    if _cpu is None:
        raise RuntimeError("the 'cpu' backend needs the C++ extension spo_kernels._cpu, which is not built: "
                           "reinstall with `pip install --no-build-isolation -e .` (torch and a C++ compiler "
                           "needed) or use backend='torch'")
    return _cpu


def _block_bytes() -> int:
    mb = float(os.environ.get("SPO_KERNELS_CPU_BLOCK_MB", "16"))
    return max(1 << 16, int(mb * 2**20))


def _softcap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)


def _torch_fallback():
    from .torch_chunked import TorchChunkedBackend
    return TorchChunkedBackend()


class CpuBackend(Backend):
    name = "cpu"

    # ---- logits path -------------------------------------------------------------------------
    def logits_forward(self, logits, plan, softcap, temperature):
        if logits.dtype not in _DTYPES:
            return _torch_fallback().logits_forward(logits, plan, softcap, temperature)
        return _require().logits_forward(logits, plan.token_idx, plan.targets, plan.seq_offsets,
                                         _softcap(softcap), float(temperature))

    def logits_backward(self, logits, plan, softcap, temperature, lse, grad_seq, out):
        if logits.dtype not in _DTYPES:
            return _torch_fallback().logits_backward(logits, plan, softcap, temperature, lse, grad_seq, out)
        _require().logits_backward(logits, plan.token_idx, plan.targets, plan.seq_id, lse, grad_seq,
                                   _softcap(softcap), float(temperature), out)

    # ---- fused-linear path -------------------------------------------------------------------
    def linear_forward(self, hidden, weight, bias, plan, softcap, temperature, save_lse):
        if hidden.dtype not in _DTYPES:
            return _torch_fallback().linear_forward(hidden, weight, bias, plan, softcap, temperature, save_lse)
        seq, lse = _require().linear_forward(hidden, weight, bias, plan.token_idx, plan.targets, plan.seq_offsets,
                                             _softcap(softcap), float(temperature), _block_bytes())
        return seq, (lse if save_lse else None)

    def linear_backward(self, hidden, weight, bias, plan, softcap, temperature, lse, grad_seq,
                        need_hidden, need_weight, need_bias, deterministic=False, grad_filter_eps=0.0):
        # Always deterministic and exact: both options are accepted and need nothing.
        if hidden.dtype not in _DTYPES:
            return _torch_fallback().linear_backward(hidden, weight, bias, plan, softcap, temperature, lse,
                                                     grad_seq, need_hidden, need_weight, need_bias)
        dh, dw, db = _require().linear_backward(
            hidden, weight, bias, plan.token_idx, plan.targets, plan.seq_id, lse, grad_seq,
            _softcap(softcap), float(temperature), bool(need_hidden), bool(need_weight),
            bool(need_bias and bias is not None), _block_bytes())
        return LinearGrads(hidden=dh, weight=dw, bias=db)
