"""The input checks of SPEC 6-7: tensor kinds, dtypes, devices and shapes, before any kernel runs.

Each raises a ``TypeError`` / ``ValueError`` that names the argument. The data-dependent checks of
labels and ``cu_seqlens`` run where the token plan is built (:func:`spo_kernels.layout.build_plan`); the
loss configuration validates itself (:class:`spo_kernels.config.PreferenceLossConfig`).
"""

from __future__ import annotations

import torch

from .config import _finite, check_bool
from .kernels.types import KernelOptions, LogitTransform

# Floating dtypes the kernels compute with (float64 for tests); fp8 and complex are rejected up front.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Label dtypes: every integer dtype, normalized to int64 by the plan (and by the reference backend).
INT_DTYPES = tuple(dt for dt in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                 getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                 getattr(torch, "uint64", None)) if dt is not None)


def _is_dtensor(x) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (SPEC 6: a weight kind the kernels cannot handle is a clear
    error, never a number computed on one shard)."""
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(x, DTensor)


def check_tensor(name: str, x, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (a shape without data); pass a tensor with data")
    if _is_dtensor(x):
        raise TypeError(f"{name} is a DTensor (a sharded tensor, e.g. an FSDP2 or tensor-parallel LM head outside "
                        f"its module's forward): the kernels need the whole local tensor. Run the loss inside the "
                        f"module's forward, where FSDP2 has gathered it (spo_kernels.integrations.hf."
                        f"enable_fused_head does), or pass {name}.full_tensor()")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")


def check_float(name: str, x, device=None) -> None:
    """``x`` is a tensor with data (not meta) of a dtype the kernels compute with (SPEC 7)."""
    check_tensor(name, x, device)
    if x.dtype not in FLOAT_DTYPES:
        kind = "an integer" if not (x.is_floating_point() or x.is_complex()) else f"a {x.dtype}"
        raise TypeError(f"{name} must be a float32, bfloat16 or float16 tensor (float64 for tests), got "
                        f"{kind} tensor ({x.dtype})")


def check_same_device(tensors: dict) -> None:
    """Every tensor of ``{name: tensor or None}`` on one device; else a ``ValueError`` that names the
    arguments off the majority device (ties: the first argument's device wins) and lists them all."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    distinct = list(dict.fromkeys(devices.values()))
    if len(distinct) <= 1:
        return
    votes = {d: sum(v == d for v in devices.values()) for d in distinct}
    main = max(distinct, key=lambda d: votes[d])  # max keeps the first of equal counts
    odd = [n for n, d in devices.items() if d != main]
    where = ", ".join(f"{n} on {d}" for n, d in devices.items())
    verb = "is" if len(odd) == 1 else "are"
    raise ValueError(f"{', '.join(odd)} {verb} not on {main} like the other inputs; every tensor must be on one "
                     f"device (got {where})")


def check_labels(labels, device=None) -> None:
    check_tensor("labels", labels, device)
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def check_logits(logits, cu_seqlens, name="logits"):
    """A float ``[S, T, V]`` (padded) or ``[N, V]`` (packed, ``cu_seqlens`` given) tensor with V > 0."""
    check_float(name, logits)
    want = 2 if cu_seqlens is not None else 3
    if logits.dim() != want:
        layout = "packed [N, V] (cu_seqlens given)" if cu_seqlens is not None else "padded [S, T, V]"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_linear(hidden, weight, bias, cu_seqlens, prefix=""):
    """Shapes and dtypes of the fused-linear inputs (SPEC 6): outside autocast, hidden, weight and bias
    share one dtype; a mismatch names both and the cast to make."""
    check_float(f"{prefix}hidden", hidden)
    want = 2 if cu_seqlens is not None else 3
    if hidden.dim() != want:
        layout = "packed [N, H] (cu_seqlens given)" if cu_seqlens is not None else "padded [S, T, H]"
        raise ValueError(f"{prefix}hidden must be {layout}, got shape {tuple(hidden.shape)}")
    check_float(f"{prefix}weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight must be [V, H] with H={hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight has no rows: the vocabulary is empty (V = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight dtype {weight.dtype} differs from {prefix}hidden dtype {hidden.dtype}; "
                        f"outside autocast they must match: cast one, e.g. {prefix}hidden.to({weight.dtype}) or "
                        f"{prefix}weight.to({hidden.dtype})")
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}bias dtype {bias.dtype} differs from {prefix}weight dtype {weight.dtype}; "
                            f"outside autocast they must match: pass {prefix}bias.to({weight.dtype})")


def check_devices(**tensors) -> None:
    """Before anything reads data: no meta tensor among the arguments, and all of them on one device
    (the error names the argument(s) off the others' device, not whichever came second)."""
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (a shape without data); pass a tensor with data")
    check_same_device(tensors)


def check_per_seq(name, x, num, device=None):
    """A per-sequence float tensor of shape ``[num]`` on ``device``."""
    check_float(name, x, device)
    if tuple(x.shape) != (num,):
        raise ValueError(f"{name} must have shape [{num}], got {tuple(x.shape)}")


def check_kernel_options(deterministic=False, grad_filter_eps=0.0, inplace_backward=True,
                         token_stats=False) -> KernelOptions:
    """The validated :class:`KernelOptions`: the flags bools, ``grad_filter_eps`` a number in [0, 1)."""
    check_bool("deterministic", deterministic)
    check_bool("inplace_backward", inplace_backward)
    check_bool("token_stats", token_stats)
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)) or not (
            0.0 <= grad_filter_eps < 1.0):
        raise ValueError(f"grad_filter_eps must be a number in [0, 1), got {grad_filter_eps!r}")
    return KernelOptions(inplace_backward=inplace_backward, deterministic=deterministic,
                         grad_filter_eps=float(grad_filter_eps), token_stats=token_stats)


def check_transform(multiplier=1.0, softcap=None, temperature=1.0) -> LogitTransform:
    """The validated :class:`LogitTransform` (SPEC 2): finite numbers, ``multiplier > 0``, ``softcap > 0`` or
    None, ``temperature > 0`` (the same rules as :class:`~spo_kernels.config.PreferenceLossConfig`)."""
    _finite("logit_multiplier", multiplier)
    if multiplier <= 0:
        raise ValueError(f"logit_multiplier must be > 0, got {multiplier}")
    if softcap is not None:
        _finite("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    _finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return LogitTransform(multiplier=float(multiplier), softcap=None if softcap is None else float(softcap),
                          temperature=float(temperature))


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_ref_logits(ref_logits, logits, cu_seqlens):
    """``ref_logits``: as :func:`check_logits`, with the policy logits' shape."""
    check_logits(ref_logits, cu_seqlens, "ref_logits")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")


def check_ref_linear(ref_hidden, ref_weight, ref_bias, hidden, weight, cu_seqlens):
    """The reference model's fused-linear inputs (defaults already resolved): as :func:`check_linear`,
    with hidden's shape and the head's V."""
    check_linear(ref_hidden, ref_weight, ref_bias, cu_seqlens, prefix="ref_")
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have V={weight.shape[0]} rows, got {ref_weight.shape[0]}")


def check_bco_delta(bco_delta, device):
    """``bco_delta``: None, a callable, or a scalar float tensor on ``device``."""
    if bco_delta is not None and not callable(bco_delta):
        check_float("bco_delta", bco_delta, device)
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a scalar tensor, got shape {tuple(bco_delta.shape)}")
