"""The ``cpu`` backend: the C++ extension ``spo_kernels._cpu`` built from ``csrc/`` by setup.py.

Same ops and semantics as the ``torch`` backend (:mod:`.torch_chunked`), on CPU tensors:

- logits path: one fused pass per completion-token row, rows in parallel: transform (multiplier,
  softcap, temperature), online max / sum-exp, target gather in the forward; transform, exp,
  normalize, one-hot and chain rule written straight into the output row in the backward (``out``
  may be the logits buffer). No ``[rows, V]`` temporaries.
- fused-linear path: completion tokens gathered into tiles, the vocabulary walked in blocks of W;
  each logits block ``[tokens, Vb]`` (about ``$SPO_KERNELS_CPU_BLOCK_MB`` MiB; default
  ``$SPO_KERNELS_CHUNK_MB`` or 64, like the torch backend's chunks) is one BLAS GEMM, reduced in
  place by the same row kernels; the backward forms ``dz`` in place and feeds it to the dhidden and
  dW GEMMs, producing each dW block once, in fp32.
- frozen head (weight and bias without ``requires_grad``, fp32/fp64): the forward walks tiles of
  tokens over the whole vocabulary and also computes ``w_t (onehot - softmax) @ W`` for them, so the
  backward is a scaling by ``g`` (three GEMMs per step with a reference head instead of four).

Token weights (``plan.token_weights``) scale each token's log-prob in the float64 sums and its
gradient. Per-token statistics (``options.token_stats``: SPEC 8's entropy, log sum p^2, mean logit,
first-argmax) come from the forward's log-sum-exp pass, a separate instantiation of the row kernel
(the pass without them does no extra work).

Always deterministic (fixed blocking and order, no atomics) and exact (``grad_filter_eps`` is
accepted and ignored). bf16/fp16 operands are upcast to fp32 per tile; LSEs, log-probs and statistics
are fp32 (float64 for float64 inputs), per-sequence sums float64. Other dtypes fall back to the
``torch`` backend.
"""

from __future__ import annotations

import os

import torch

from .base import Backend, LinearGrads, LogprobResult, TokenStats

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
    """Budget of one logits block: $SPO_KERNELS_CPU_BLOCK_MB, else the torch backend's
    $SPO_KERNELS_CHUNK_MB, else 64 MiB (larger blocks make the GEMMs more efficient)."""
    mb = os.environ.get("SPO_KERNELS_CPU_BLOCK_MB") or os.environ.get("SPO_KERNELS_CHUNK_MB") or "64"
    return max(1 << 16, int(float(mb) * 2**20))


def _xform(transform):
    """The extension's transform arguments ``(multiplier, softcap, temperature)``; softcap 0 means none."""
    softcap = 0.0 if transform.softcap is None else float(transform.softcap)
    return float(transform.multiplier), softcap, float(transform.temperature)


def _stats(stats):
    """The extension's ``[4, Nc]`` statistics as :class:`TokenStats` (None when not computed)."""
    return None if stats is None else TokenStats(*stats.unbind(0))


def _frozen_head(hidden, weight, bias) -> bool:
    """The head needs no gradient (LoRA / frozen LM head): only dhidden will be asked for."""
    if os.environ.get("SPO_KERNELS_CPU_FROZEN_FASTPATH", "1") == "0":
        return False
    return (hidden.dtype in (torch.float32, torch.float64) and weight.dtype == hidden.dtype
            and not weight.requires_grad and (bias is None or not bias.requires_grad))


_BF16_GEMM = None


def _bf16_grad_gemms(hidden, weight) -> bool:
    """bf16 operands and a CPU with native bf16 GEMMs (oneDNN: AVX512-BF16 / AMX): run the two
    gradient GEMMs (dz @ W, dz^T @ h) in bf16 with fp32 accumulation; the logits stay fp32 GEMMs.
    $SPO_KERNELS_CPU_BF16_GEMM=0 keeps every GEMM in fp32."""
    global _BF16_GEMM
    if hidden.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if os.environ.get("SPO_KERNELS_CPU_BF16_GEMM", "1") == "0":
        return False
    if _BF16_GEMM is None:
        try:
            _BF16_GEMM = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _BF16_GEMM = False
    return _BF16_GEMM


def _torch_fallback():
    from .torch_chunked import TorchChunkedBackend
    return TorchChunkedBackend()


class CpuBackend(Backend):
    name = "cpu"

    # ---- logits path -------------------------------------------------------------------------
    def logits_forward(self, logits, plan, transform, options):
        if logits.dtype not in _DTYPES:
            return _torch_fallback().logits_forward(logits, plan, transform, options)
        seq, lse, stats = _require().logits_forward(logits, plan.token_idx, plan.targets, plan.seq_offsets,
                                                    plan.token_weights, *_xform(transform), options.token_stats)
        return LogprobResult(seq, lse, _stats(stats))

    def logits_backward(self, logits, plan, transform, lse, grad_seq, out):
        if logits.dtype not in _DTYPES:
            return _torch_fallback().logits_backward(logits, plan, transform, lse, grad_seq, out)
        _require().logits_backward(logits, plan.token_idx, plan.targets, plan.seq_id, plan.token_weights, lse,
                                   grad_seq, *_xform(transform), out)

    # ---- fused-linear path -------------------------------------------------------------------
    def linear_forward(self, hidden, weight, bias, plan, transform, options, save_lse):
        if hidden.dtype not in _DTYPES:
            return _torch_fallback().linear_forward(hidden, weight, bias, plan, transform, options, save_lse)
        seq, lse, stats = _require().linear_forward(
            hidden, weight, bias, plan.token_idx, plan.targets, plan.seq_offsets, plan.token_weights,
            *_xform(transform), options.token_stats, _block_bytes())
        return LogprobResult(seq, lse if save_lse else None, _stats(stats))

    def linear_forward_for_backward(self, hidden, weight, bias, plan, transform, options):
        if hidden.dtype in _DTYPES and _frozen_head(hidden, weight, bias):
            # Only dhidden will be asked for: compute w_t (onehot - softmax) @ W now, while the logits tile
            # is at hand, and let the backward scale it by g (one GEMM fewer in all). The caller keeps it.
            seq, lse, stats, dh_unit = _require().linear_forward_frozen(
                hidden, weight, bias, plan.token_idx, plan.targets, plan.seq_offsets, plan.token_weights,
                *_xform(transform), options.token_stats, _block_bytes())
            return LogprobResult(seq, lse, _stats(stats)), dh_unit
        return super().linear_forward_for_backward(hidden, weight, bias, plan, transform, options)

    def linear_backward(self, hidden, weight, bias, plan, transform, options, lse, grad_seq,
                        need_hidden, need_weight, need_bias, extra=None):
        # Always deterministic and exact: options.deterministic and grad_filter_eps need nothing.
        if hidden.dtype not in _DTYPES:
            return _torch_fallback().linear_backward(hidden, weight, bias, plan, transform, options, lse,
                                                     grad_seq, need_hidden, need_weight, need_bias)
        if extra is not None and need_hidden and not need_weight and not (need_bias and bias is not None):
            dh_unit = extra  # w_t (onehot - softmax) @ W from linear_forward_for_backward
            dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            g_tok = grad_seq.to(dh_unit.dtype).index_select(0, plan.seq_id)
            dh.index_copy_(0, plan.token_idx, (dh_unit * g_tok[:, None]).to(hidden.dtype))
            return LinearGrads(hidden=dh, weight=None, bias=None)
        dh, dw, db = _require().linear_backward(
            hidden, weight, bias, plan.token_idx, plan.targets, plan.seq_id, plan.token_weights, lse, grad_seq,
            *_xform(transform), bool(need_hidden), bool(need_weight), bool(need_bias and bias is not None),
            _block_bytes(), _bf16_grad_gemms(hidden, weight))
        return LinearGrads(hidden=dh, weight=dw, bias=db)
