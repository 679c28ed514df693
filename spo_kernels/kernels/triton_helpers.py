"""What the kernel files share: Triton device helpers (tanh, dot-accumulate, the store-or-accumulate
epilogue, the program-id swizzle) and the host hooks every launcher goes through (buffer allocation
with its NaN poison for tests, the device guard, the SM count, the dot mode).

Hooks are module attributes read at call time, so a test (or ``tests/compile_for_gpu.py``) that sets
``triton_helpers.POISON_EMPTY`` / ``triton_helpers.num_sms`` / ``triton_helpers.empty`` changes every
launcher (``linear_logprobs`` forwards its old names ``POISON_EMPTY``, ``_num_sms``, ``_empty`` here).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Tests set this: every buffer a launcher allocates through :func:`empty` is filled with NaN first, so
# that a kernel reading memory nobody wrote shows up as NaN in the results.
POISON_EMPTY: bool = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (float ones NaN-poisoned under POISON_EMPTY)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_EMPTY and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def device_guard(t: torch.Tensor):
    """The context every launcher launches in: ``t``'s CUDA device made current (launches go to the
    current device, which need not be the tensors'); a no-op elsewhere (CPU interpreter, meta)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 1 otherwise (the interpreter runs one program at a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def dot_mode(dtype: torch.dtype) -> str:
    """``DOT`` constexpr of :func:`dot_acc` for operands of ``dtype`` (docs/numerics.md §1)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "native"


# ---------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------
# Two tanh forms (docs/gradient.md §3), both written with exp (``tl.math.tanh`` is absent from the
# interpreter and renamed across Triton versions). They are not unified: the logits path's
# ``tanh_sech2`` switches to a series below |u| = 0.25, the fused-linear path's ``tanh_exp`` does not,
# so their results differ near 0 (by ~eps / |u| relative); merging them would change one path's numerics.

@triton.jit
def tanh_sech2(u):
    """``(tanh(u), 1 - tanh(u)^2)`` for any finite or infinite u (logits path).

    ``e = exp(-2|u|)`` lies in [0, 1] (no overflow): ``tanh(u) = sign(u) (1 - e) / (1 + e)`` and
    ``1 - tanh^2 = 4 e / (1 + e)^2`` (no cancellation when |tanh| -> 1). Near 0, ``1 - e`` cancels
    (relative error ~ eps / |u|), so |u| < 0.25 uses the odd series
    ``u - u^3/3 + 2u^5/15 - 17u^7/315 + 62u^9/2835`` (truncation below 1e-8 relative there).
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t_abs = tl.where(a < 0.25, small, big)
    t = tl.where(u < 0, -t_abs, t_abs)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return t, sech2


@triton.jit
def tanh_exp(x):
    """``tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})``: no overflow for any x (fused-linear path,
    fp32 tiles; the caller forms ``1 - t^2`` for the chain rule)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def swizzle(pid, num_m, num_n, group):
    """Program id -> (m, n) in groups of ``group`` m-blocks x all n-blocks, so programs resident together
    share their operand blocks in L2."""
    per_group = group * num_n
    first_m = (pid // per_group) * group
    size_m = tl.minimum(num_m - first_m, group)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


@triton.jit
def dot_acc(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (docs/numerics.md §1)."""
    if DOT == "native":  # 16-bit operands on tensor cores, fp32 accumulation
        return tl.dot(a, b, acc)
    # fp32 inputs (no TF32), or 16-bit widened in the interpreter
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def finish(acc, acc_ptr, out_ptr, acc_off, out_off, mask, LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr):
    """Store-or-accumulate epilogue: add the fp32 partial already at ``acc_ptr`` (LOAD_ACC), then either
    write the result to ``out`` in its dtype (STORE_OUT, the last step) or put the fp32 partial back."""
    if LOAD_ACC:
        acc += tl.load(acc_ptr + acc_off, mask=mask, other=0.0)
    if STORE_OUT:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + acc_off, acc, mask=mask)
