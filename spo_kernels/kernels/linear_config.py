"""Launch parameters of the fused-linear kernels (``linear_forward`` / ``linear_backward``): the
:class:`LinearKernelConfig` dataclass, :func:`kernel_config` and the ``CONFIG_OVERRIDES`` hook.

Launch parameters come from the tuning table (``tuning.py``, ``tuned_configs.json``), per kernel:
``linear_fwd`` (forward tile, warps, stages), ``linear_dz`` (the dz tile, which is also the plan's and
the filter's granularity), ``linear_dw`` and ``linear_dh`` (GEMM tiles), keyed by GPU name, dtype and
shape class (H and Nc buckets). :func:`kernel_config` starts from the built-in defaults below (what
the code used before any measurement), applies the table's entries for the current GPU (never in the
interpreter), then ``CONFIG_OVERRIDES``; ``benchmarks/gpu/tune.py`` measures the table.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import tuning
from .triton_helpers import interpreting

# Tests (and users tuning a GPU) may set fields of LinearKernelConfig here: {"block_h": 32, ...}. They
# apply last, over the tuning table: a shared name (block_n, gemm_m, num_warps, ...) sets that parameter
# of every kernel that has it, a per-kernel name (dw_block_k, fwd_warps, ...) of one kernel.
CONFIG_OVERRIDES: dict = {}
# Read at call time by kernel_config; ``linear_logprobs.CONFIG_OVERRIDES = {...}`` assigns this one.


# Tuning-table kernel -> {its parameter: the LinearKernelConfig field that holds it}.
_TABLE_FIELDS = {
    "linear_fwd": {"block_n": "fwd_block_n", "block_v": "fwd_block_v", "block_h": "fwd_block_h",
                   "num_warps": "fwd_warps", "num_stages": "fwd_stages"},
    "linear_dz": {"block_n": "block_n", "block_v": "block_v", "block_h": "block_h",
                  "num_warps": "dz_warps", "num_stages": "dz_stages"},
    "linear_dw": {"block_m": "dw_block_m", "block_n": "dw_block_n", "block_k": "dw_block_k",
                  "num_warps": "dw_warps", "num_stages": "dw_stages"},
    "linear_dh": {"block_m": "dh_block_m", "block_n": "dh_block_n", "block_k": "dh_block_k",
                  "num_warps": "dh_warps", "num_stages": "dh_stages"},
}
# Per-kernel field -> the shared field it falls back to (None: use the shared one).
_SHARED = {
    "fwd_block_n": "block_n", "fwd_block_v": "block_v", "fwd_block_h": "block_h",
    "fwd_warps": "num_warps", "fwd_stages": "num_stages", "dz_warps": "num_warps", "dz_stages": "num_stages",
    "dw_block_m": "gemm_m", "dw_block_n": "gemm_n", "dw_block_k": "gemm_k", "dw_warps": "num_warps",
    "dw_stages": "num_stages",
    "dh_block_m": "gemm_m", "dh_block_n": "gemm_n", "dh_block_k": "gemm_k", "dh_warps": "num_warps",
    "dh_stages": "num_stages",
}
# Constexpr names of each kernel's tile parameters.
_CONSTEXPR = {"block_n": "BLOCK_N", "block_v": "BLOCK_V", "block_h": "BLOCK_H", "block_m": "BLOCK_M",
              "block_k": "BLOCK_K"}
_GEMM_NAME = {"linear_dw": "dW", "linear_dh": "dhidden"}


@dataclass(frozen=True)
class LinearKernelConfig:
    """Tile sizes and launch parameters.

    block_n / block_v / block_h: logit tiles (plan tokens x vocabulary, dot over H in block_h chunks) of
        the backward dz kernel, and of the forward unless fwd_block_* are set. block_n x block_v is also the
        gradient filter's tile and the granularity of the backward's plan.
    gemm_m / gemm_n / gemm_k: dW and dhidden GEMM tiles ((vocab | tokens) x H, reduction step), unless
        dw_block_* / dh_block_* are set. Each GEMM's m and k tiles must divide both block_n and block_v, so
        that every GEMM tile step lies inside one dz tile (the gradient filter's skip flags are per dz tile).
    num_warps / num_stages: every kernel of the path unless <kernel>_warps / <kernel>_stages are set.
    fwd_* / dz_* / dw_* / dh_*: per-kernel values (None: the shared one). :func:`kernel_config` fills them
        from the tuning table (``tuning.py``); :meth:`params` gives the resolved values of one kernel.
    num_splits: forward vocabulary splits (None: enough for about 4 waves, at least 8).
    scratch_bytes: size of the backward dz scratch.
    outer: "auto" | "vocab" | "token", the backward's streaming order (docs/gradient.md §7; ``linear_backward``).
    reuse_outputs: let the backward place its dz scratch in dhidden's storage and its fp32 dhidden
        accumulator in dW's (docs/gradient.md §7, ``linear_plan``); False allocates both (one recompute less).
    """

    block_n: int = 128
    block_v: int = 128
    block_h: int = 64
    gemm_m: int = 128
    gemm_n: int = 128
    gemm_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group: int = 8
    segment_block: int = 128
    num_splits: Optional[int] = None
    scratch_bytes: int = 256 * 2**20
    outer: str = "auto"
    reuse_outputs: bool = True
    fwd_block_n: Optional[int] = None
    fwd_block_v: Optional[int] = None
    fwd_block_h: Optional[int] = None
    fwd_warps: Optional[int] = None
    fwd_stages: Optional[int] = None
    dz_warps: Optional[int] = None
    dz_stages: Optional[int] = None
    dw_block_m: Optional[int] = None
    dw_block_n: Optional[int] = None
    dw_block_k: Optional[int] = None
    dw_warps: Optional[int] = None
    dw_stages: Optional[int] = None
    dh_block_m: Optional[int] = None
    dh_block_n: Optional[int] = None
    dh_block_k: Optional[int] = None
    dh_warps: Optional[int] = None
    dh_stages: Optional[int] = None

    def _get(self, field: str) -> int:
        v = getattr(self, field)
        return getattr(self, _SHARED[field]) if v is None else v

    def params(self, kernel: str) -> dict:
        """Resolved parameters of one kernel, named as in the tuning table (``tuning.KERNELS``)."""
        return {p: self._get(f) if f in _SHARED else getattr(self, f) for p, f in _TABLE_FIELDS[kernel].items()}

    def launch(self, kernel: str) -> dict:
        """Keyword arguments of one kernel's launch: its tile constexprs, num_warps and num_stages."""
        return {(_CONSTEXPR.get(p, p)): v for p, v in self.params(kernel).items()}

    def resolved(self) -> "LinearKernelConfig":
        """The same config with every per-kernel field explicit."""
        return dataclasses.replace(self, **{f: self._get(f) for f in _SHARED})

    def check(self) -> None:
        for name in ("block_n", "block_v", "block_h", "gemm_m", "gemm_n", "gemm_k", "segment_block"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        for kernel in _TABLE_FIELDS:
            for p, f in _TABLE_FIELDS[kernel].items():
                v = self._get(f) if f in _SHARED else getattr(self, f)
                why = tuning._check_value(kernel, p, v)
                if why:
                    raise ValueError(f"{f} ({p} of {kernel}) {why}")
        for kernel, gemm in _GEMM_NAME.items():
            prm = self.params(kernel)
            for p, shared in (("block_m", "gemm_m"), ("block_k", "gemm_k")):
                v = prm[p]
                if self.block_n % v or self.block_v % v:
                    raise ValueError(f"{_TABLE_FIELDS[kernel][p]}={v} ({p} of the {gemm} GEMM, default {shared}) "
                                     f"must divide block_n={self.block_n} and block_v={self.block_v}")
        if self.outer not in ("auto", "vocab", "token"):
            raise ValueError(f"outer must be 'auto', 'vocab' or 'token', got {self.outer!r}")


def _apply_overrides(cfg: LinearKernelConfig, over: dict) -> LinearKernelConfig:
    """CONFIG_OVERRIDES: a shared name also sets every per-kernel field that falls back to it (over what
    the table put there), unless that per-kernel field is itself overridden."""
    fields = dict(over)
    for f, shared in _SHARED.items():
        if shared in over and f not in over:
            fields[f] = over[shared]
    return dataclasses.replace(cfg, **fields)


def kernel_config(dtype: torch.dtype, *, device=None, Nc: int = 0, H: int = 0) -> LinearKernelConfig:
    """Launch parameters of the fused-linear kernels for ``dtype`` inputs on ``device`` at ``Nc`` plan
    tokens and hidden size ``H``: built-in defaults (H100-sized tiles; small ones in the interpreter),
    then the tuning table's entries for this GPU (``tuning.py``; never in the interpreter), then
    CONFIG_OVERRIDES. Every value is checked; a table entry that does not fit is a ValueError naming the
    file and the entries."""
    if interpreting():
        cfg = LinearKernelConfig(block_n=32, block_v=32, block_h=32, gemm_m=32, gemm_n=64, gemm_k=32,
                                 num_warps=4, num_stages=1, group=4, segment_block=16)
    elif dtype == torch.float32:
        # ieee fp32 dots run on the FMA units: smaller tiles keep the operands in registers.
        # The dhidden GEMM gets 8 warps: with 4, its gradient-filter variant spills on sm_90 (triton 3.9,
        # benchmarks/results/sm90-kernels.md).
        cfg = LinearKernelConfig(block_n=64, block_v=64, block_h=32, gemm_m=64, gemm_n=64, gemm_k=32,
                                 num_warps=4, num_stages=2, dh_warps=8)
    else:
        cfg = LinearKernelConfig()
    mb = os.environ.get("SPO_KERNELS_LINEAR_SCRATCH_MB")
    if mb:
        cfg = dataclasses.replace(cfg, scratch_bytes=int(float(mb) * 2**20))
    cfg = cfg.resolved()
    used = []
    for kernel in tuning.LINEAR_KERNELS:
        entry = tuning.lookup(kernel, dtype, device, H=H, Nc=Nc)
        if entry is not None:
            cfg = dataclasses.replace(cfg, **{_TABLE_FIELDS[kernel][p]: v for p, v in entry.params.items()})
            used.append(entry)
    if used:
        try:
            cfg.check()
        except ValueError as e:
            raise ValueError(f"{used[0].path}: the tuning entries {[u.key for u in used]} do not fit together "
                             f"(or with the defaults of the kernels without an entry): {e}") from None
    if CONFIG_OVERRIDES:
        cfg = _apply_overrides(cfg, CONFIG_OVERRIDES)
    cfg.check()
    return cfg
