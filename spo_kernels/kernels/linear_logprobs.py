"""Fused-linear path in Triton: ``hidden [N, H]`` and the LM head ``W [V, H]`` (+ bias) in, per-sequence
completion log-probs and their gradients out. Logits exist only as on-chip tiles (forward) or as a
bounded scratch of ``dlogits`` (backward); the ``[N, V]`` logits are never materialized.

Notation: ``Nc`` plan tokens (completion tokens only, :class:`~spo_kernels.layout.TokenPlan`), ``S``
sequences, ``V`` vocabulary, ``H`` hidden size. Per plan token ``t`` with row ``r = token_idx[t]``:

    z_raw = h_r W^T + b                                        (fp32 accumulation over H)
    z     = softcap * tanh(z_raw / softcap) / temperature      (SPEC 2; each part optional)
    lse_t = logsumexp_v z_v,   logp_t = z_{y_t} - lse_t,   L_s = sum_{t in s} logp_t
    dz_raw = g_{s(t)} * (onehot(y_t) - exp(z - lse_t)) * (1 - tanh^2(z_raw / softcap)) / temperature
    dhidden_r = dz_raw W,   dW = sum_t dz_raw^T h_r,   db = sum_t dz_raw

Forward (``linear_forward``), 2 Nc V H FLOPs, O(Nc) extra memory
-------------------------------------------------------------------
1. ``_forward_partials_kernel``: a 1-D grid of (token block, vocabulary split) programs. Each program
   gathers its token rows through ``token_idx`` (no compacted copy of ``hidden``) and walks the vocabulary
   tiles of its split in order: logit tile by ``tl.dot`` over H in ``BLOCK_H`` chunks, bias, softcap,
   temperature, then lanes ``>= V`` set to -inf (after every transform: a padded lane must never enter the
   softmax as a logit 0), online max / sum-exp, and the target logit picked where ``col == y``. It writes
   one ``(max, sumexp, target)`` triple per (split, token).
   Why splits instead of one program per token block walking all of V: with few completion tokens (a
   small batch, or the reference pass) ``Nc / BLOCK_N`` programs do not fill the GPU; a handful of splits
   (``>= 8``, about 4 waves in total) does, and the partials cost ``12 * splits * Nc`` bytes. Programs
   are ordered in groups of token blocks x all splits so that the programs resident together share
   their ``hidden`` blocks and ``W`` tiles through L2.
2. ``_merge_segments_kernel``: one program per sequence walks its contiguous run of the plan in order,
   merges the split partials (``lse = M + log sum_j s_j exp(m_j - M)``), writes ``lse`` (fp32, saved for
   backward) and the sequence sum ``L_s``. A fixed-order segment reduction: no atomics, deterministic.

Backward (``linear_backward``), 6 Nc V H FLOPs (one recompute of the logits), always deterministic
----------------------------------------------------------------------------------------------------
The exact gradient needs two reductions that run along different axes of the ``[Nc, V]`` tile grid:
``dW`` sums over tokens, ``dhidden`` over the vocabulary. A single kernel per (token block, vocab block)
tile meets the FLOP floor but must add every partial product into global fp32 buffers with atomics:
``(Nc / BLOCK_N) * V * H + (V / BLOCK_V) * Nc * H`` fp32 atomics (about 1.3e11 at the G1 shape: ~0.5 TB
of read-modify-write through L2 next to ~52 TFLOP of backward matmuls), full fp32 ``[V, H]`` and
``[Nc, H]`` accumulators (2.3 GiB at G1), and results that change bit-wise from run to run. We instead
stream ``dz`` through a bounded scratch:

    for each block (token chunk x vocabulary range) of the [Nc, V] plane, in order:
        _grad_logits_kernel : recompute the logit tiles (2 n_tok n_v H), write dz [n_tok, n_v] in the
                              input dtype (what a tensor-core dot consumes anyway) to the scratch,
                              plus per-tile column sums of fp32 dz for the bias;
        _dw_gemm_kernel     : dW[range]  (+)= dz^T h[chunk]   (2 n_tok n_v H), fp32 accumulator in registers;
        _dh_gemm_kernel     : dh[chunk]  (+)= dz W[range]     (2 n_tok n_v H), fp32 accumulator in registers;
        _bias_reduce_kernel : db[range]  (+)= column sums, token blocks in order.

Only one of the two loops has more than one step. "vocab-outer" (default when ``Nc <= V``): all tokens
x a vocabulary range of ``scratch_bytes / (Nc * itemsize)`` columns; then ``dW`` (and ``db``) rows of the
range are reduced over *all* tokens inside one GEMM and written once, exactly, in the weight's dtype,
while ``dhidden`` adds one partial per range into an fp32 ``[Nc, H]`` accumulator (none when there is a
single range or hidden is fp32: then it accumulates in ``dhidden`` itself). "token-outer" (``Nc > V``)
is the mirror image: a token chunk x all of V, ``dhidden`` rows written once, ``dW`` accumulated in fp32
``[V, H]`` across chunks (none when the weight is fp32). The smaller accumulator wins.

Memory (``plan_backward``, default ``reuse_outputs=True``). With a 16-bit hidden, vocab-outer needs the
fp32 ``[Nc, H]`` dhidden accumulator and a dz scratch; neither gets memory of its own:

* the dz scratch is a view of **dhidden's own storage** (``N * H`` elements, nothing else lives there
  until the end), so a range is ``min(scratch_bytes / itemsize, N * H) / Nc`` columns (8192 at G1);
* the accumulator is a view of **the last ``4 Nc / itemsize`` rows of dW** (``tail_start`` onwards,
  rounded to ``block_v``): phase 1 walks every range, but writes dW only for rows below ``tail_start``;
  once the last range has added its partial, dhidden is zeroed and the accumulator scattered into its
  plan rows (``_scatter_rows_kernel``); phase 2 then recomputes dz for the tail columns (into a fresh
  scratch of 1/32 of the gradients' bytes, widened up to 1/16 where 2 waves of the dW GEMM need it: see
  "Tuning and performance changes") and writes those dW rows, exactly, in one GEMM each.

Used when dW exists and the tail is at most half of V (else the accumulator is allocated). At G1 in
bf16 (dhidden 256 MiB + dW 1002 MiB) on 132 SMs: allocations beyond the gradients 40 MiB, **1.03x
the lower bound** (``reuse_outputs=False``: scratch 256 MiB + accumulator 256 MiB, 1.41x), for a second
recompute of ``2 Nc V H * (2 Nc / V)`` FLOPs: +6.4% of the policy's ``8 Nc V H`` at G1 (``Nc / V`` = 0.128).
A frozen head (no dW) takes token-outer with a fresh scratch; an fp32 hidden accumulates in dhidden.

Costs: FLOPs ``6 Nc V H`` (+ ``2 Nc V H`` forward = the ``8 Nc V H`` floor of a policy fwd+bwd), plus
the phase-2 recompute above. Extra global traffic over the three matmuls: dz written once and read twice
(``6 Nc V`` bytes in bf16) and one read-modify-write of the accumulator per range. Every reduction runs
in a fixed order with no atomics, so **results are bitwise reproducible in every mode**;
``deterministic=True`` is accepted and selects the same code.

Gradient filter (``grad_filter_eps > 0``, opt-in, approximate): the dz kernel flags a tile when
``|g (onehot - softmax)| < eps`` on all its entries, zeroes it, and both GEMMs skip flagged tiles (their
tiles are aligned to the dz tiles), saving up to 2/3 of the backward FLOPs on peaked distributions. The
recompute itself cannot be skipped (it is what tells). Off by default: exact.

Numerics: fp32 accumulation everywhere; 16-bit inputs use native tensor-core dots, fp32 inputs use
``input_precision="ieee"`` (TF32 would miss SPEC 7's 1e-5). Offsets into ``[N, H]``, ``[V, H]`` and the
dz scratch are int64. Every grid is 1-D (axis 0 allows 2^31 - 1 programs): no token or vocabulary
count ever lands on the 65535-limited axes 1/2.

Tuning and performance changes (none of them measured on a GPU yet)
--------------------------------------------------------------------
* Launch parameters come from the tuning table (``tuning.py``, ``tuned_configs.json``), per kernel:
  ``linear_fwd`` (forward tile, warps, stages), ``linear_dz`` (the dz tile, which is also the plan's and
  the filter's granularity), ``linear_dw`` and ``linear_dh`` (GEMM tiles), keyed by GPU name, dtype and
  shape class (H and Nc buckets). :func:`kernel_config` starts from the built-in defaults below (what
  the code used before any measurement), applies the table's entries for the current GPU (never in the
  interpreter), then ``CONFIG_OVERRIDES``; ``benchmarks/gpu/tune.py`` measures the table.
* Phase-2 tail blocks fill >= 2 waves (:func:`_tail_blocks`): each tail block's dW GEMM has
  ``cdiv(width, block_m) x cdiv(H, block_n)`` programs that each reduce over all Nc tokens, so a narrow
  block leaves SMs idle for its whole duration. Blocks are now at least ``2 x SMs`` programs wide (SM
  count from the device; 1 in the interpreter, which runs one program at a time) while that keeps the
  phase-2 scratch within 1/16 of the gradients' bytes, and the tail is cut into equal blocks instead of
  full-width ones plus a sliver. G1 on 132 SMs: 28 blocks of 1152-1280 columns (2.2-2.4 waves; before:
  28 x 1152 columns, 2.2 waves, then one of 512, 1.0 wave), 40 MiB of scratch instead of 36; H = 2048 at
  the same Nc: the cap allows 1.0-1.1 waves instead of 0.5, for +20 MiB. How much this buys depends on
  how many of these programs an SM holds at once (shared memory and registers of the compiled kernel;
  wave quantization): to be measured.
* ``_dw_gemm_kernel`` prefetches ``token_idx``: a step's hidden rows are gathered through indices that
  the previous step loaded, so the row load depends on no load of its own step. Triton's pipeliner
  (AssignLatencies) splits ``num_stages - 1`` steps of prefetch between the levels of a load -> load
  chain: with the index load feeding the row load, every load of the loop was prefetched
  ``(num_stages - 1) / 2`` steps ahead (1 at ``num_stages=3``); with the chain cut, the dz and hidden
  tiles are buffered ``num_stages - 1`` steps ahead like in the dhidden GEMM. Compiled for sm_90 at G1
  (default tiles, ``num_stages=3``) the kernel's shared-memory buffers go from 2 to 3 per operand
  (TTGIR, triton 3.6 and 3.9 alike), for 96 KiB of shared memory instead of 64.5 KiB (still two programs
  per SM).

Compatibility: triton 3.6 (GPU image) to 3.9; only long-standing ``tl`` APIs; tanh is written with
``exp``. Under ``TRITON_INTERPRET=1`` (3.9) ``tl.dot`` on bfloat16 returns garbage, so the interpreter
upcasts 16-bit operands to fp32 before the dot (exact products, same fp32 accumulation as the GPU).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import LinearGrads
from . import tuning

# Tests (and users tuning a GPU) may set fields of LinearKernelConfig here: {"block_h": 32, ...}. They
# apply last, over the tuning table: a shared name (block_n, gemm_m, num_warps, ...) sets that parameter
# of every kernel that has it, a per-kernel name (dw_block_k, fwd_warps, ...) of one kernel.
CONFIG_OVERRIDES: dict = {}
# Tests set this: fill every buffer this module allocates with torch.empty with NaN first, so that a
# kernel reading memory nobody wrote shows up as NaN in the results.
POISON_EMPTY: bool = False

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    outer: "auto" | "vocab" | "token", the backward's streaming order (see the module docstring).
    reuse_outputs: let the backward place its dz scratch in dhidden's storage and its fp32 dhidden
        accumulator in dW's (module docstring, "Memory"); False allocates both (one recompute less).
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
    if _interpreting():
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


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_EMPTY and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _dot_mode(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _interpreting() else "native"


def _num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 1 otherwise (the interpreter runs one program at a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _swizzle(pid, num_m, num_n, group):
    """Program id -> (m, n) in groups of ``group`` m-blocks x all n-blocks, so programs resident together
    share their operand blocks in L2."""
    per_group = group * num_n
    first_m = (pid // per_group) * group
    size_m = tl.minimum(num_m - first_m, group)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


@triton.jit
def _dot_acc(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if DOT == "native":  # 16-bit operands on tensor cores, fp32 accumulation
        return tl.dot(a, b, acc)
    # fp32 inputs (no TF32), or 16-bit widened in the interpreter
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _finish(acc, acc_ptr, out_ptr, acc_off, out_off, mask, LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr):
    """Add the fp32 partial already at ``acc_ptr`` (LOAD_ACC), then either write the result to ``out``
    in its dtype (STORE_OUT, the last step) or put the fp32 partial back."""
    if LOAD_ACC:
        acc += tl.load(acc_ptr + acc_off, mask=mask, other=0.0)
    if STORE_OUT:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + acc_off, acc, mask=mask)


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_row_off, row_mask, cols, col_mask, H, stride_w,
                softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Transformed logits of one tile, fp32 ``[BLOCK_N, BLOCK_V]``, and ``tanh(z_raw / softcap)`` (for the
    softcap chain rule; meaningless without softcap). ``h_row_off`` are int64 element offsets of the
    gathered hidden rows; lanes with ``col_mask`` False come out as -inf."""
    w_row_off = cols.to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # z_raw = sum over H chunks of h[:, k:k+BH] @ W[cols, k:k+BH]^T (every chunk, not just one block of H).
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(hidden_ptr + h_row_off[:, None] + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(weight_ptr + w_row_off[None, :] + ks[:, None],
                      mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _dot_acc(h, w_t, acc, DOT)
    # The bias is added once, after the whole H reduction.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow for any x.
        x = acc / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0.0, -t, t)
        acc = softcap * t
    z = acc * inv_temp
    # Lanes past V: -inf after every transform, so they never enter the log-sum-exp.
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, t


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _forward_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, token_idx_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_tgt_ptr,
    num_tokens, V, H, stride_h, stride_w, num_splits, tiles_per_split, group, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (token block, split): online (max, sumexp) and target logit over the split's vocab tiles.
    Partials are ``[num_splits, num_tokens]`` fp32."""
    pid = tl.program_id(0)
    num_tb = tl.cdiv(num_tokens, BLOCK_N)
    tb, split = _swizzle(pid, num_tb, num_splits, group)
    rows = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_tokens
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    h_row_off = tok * stride_h

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    num_vt = tl.cdiv(V, BLOCK_V)
    vt_end = tl.minimum((split + 1) * tiles_per_split, num_vt)
    for vt in range(split * tiles_per_split, vt_end):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, h_row_off, row_mask, cols, col_mask, H,
                           stride_w, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        # Online log-sum-exp: every tile holds at least one lane < V, so m_new is finite.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # The target logit, from the tile that holds column y (exactly one tile over all splits).
        tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = split.to(tl.int64) * num_tokens + rows
    tl.store(part_max_ptr + out, m, mask=row_mask)
    tl.store(part_sum_ptr + out, s, mask=row_mask)
    tl.store(part_tgt_ptr + out, tz, mask=row_mask)


@triton.jit
def _merge_segments_kernel(
    part_max_ptr, part_sum_ptr, part_tgt_ptr, seq_offsets_ptr, lse_ptr, seq_logps_ptr,
    num_tokens, num_splits,
    SAVE_LSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program s: walk plan entries ``[seq_offsets[s], seq_offsets[s+1])`` in order, merge the split
    partials into ``lse``, and sum ``logp = z_y - lse`` (fp32) into ``L_s`` in float64 (SPEC 7; 0 for an
    empty sequence)."""
    seq = tl.program_id(0)
    start = tl.load(seq_offsets_ptr + seq)
    end = tl.load(seq_offsets_ptr + seq + 1)
    total = tl.zeros((BLOCK_T,), dtype=tl.float64)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = rows < end
        big_m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
        off = rows  # int64 offsets of split sp: sp * num_tokens + row, advanced by addition
        for sp in range(num_splits):
            big_m = tl.maximum(big_m, tl.load(part_max_ptr + off, mask=mask, other=0.0))
            off += num_tokens
        sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_T,), dtype=tl.float32)
        off = rows
        for sp in range(num_splits):
            m_sp = tl.load(part_max_ptr + off, mask=mask, other=0.0)
            # lse = M + log sum_j s_j exp(m_j - M)
            sum_exp += tl.load(part_sum_ptr + off, mask=mask, other=1.0) * tl.exp(m_sp - big_m)
            tgt += tl.load(part_tgt_ptr + off, mask=mask, other=0.0)
            off += num_tokens
        lse = big_m + tl.log(sum_exp)
        if SAVE_LSE:
            tl.store(lse_ptr + rows, lse, mask=mask)
        total += tl.where(mask, (tgt - lse).to(tl.float64), 0.0)
    tl.store(seq_logps_ptr + seq, tl.sum(total, axis=0))


def _prep(hidden, weight, bias):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"the triton backend supports float32/bfloat16/float16 {name}, got {t.dtype} "
                            f"(use backend='torch' or 'reference' for float64)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, bias


def _softcap_args(softcap, temperature):
    return (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature)


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def linear_forward(hidden, weight, bias, plan, softcap, temperature, save_lse):
    """Per-sequence completion log-probs from hidden states and the head, logits on chip only.

    Args:
        hidden: ``[N, H]`` fp32/bf16/fp16; weight: ``[V, H]`` same dtype; bias: ``[V]`` or None.
        plan: :class:`~spo_kernels.layout.TokenPlan` (``Nc`` completion tokens of ``S`` sequences).
        softcap: float or None; temperature: float > 0.
        save_lse: also return the per-token log-sum-exp (needed by backward).
    Returns:
        ``(seq_logps [S] float64, lse [Nc] fp32 or None)``.
    """
    hidden, weight, bias = _prep(hidden, weight, bias)
    device = hidden.device
    S, Nc = plan.num_seqs, plan.num_tokens
    V, H = weight.shape
    if Nc == 0:
        lse = torch.empty(0, dtype=torch.float32, device=device) if save_lse else None
        return torch.zeros(S, dtype=torch.float64, device=device), lse
    cfg = kernel_config(hidden.dtype, device=device, Nc=Nc, H=H)
    fwd = cfg.launch("linear_fwd")
    num_tb = triton.cdiv(Nc, fwd["BLOCK_N"])
    num_vt = triton.cdiv(V, fwd["BLOCK_V"])
    sms = _num_sms(device)
    splits = cfg.num_splits or max(8, triton.cdiv(4 * sms, num_tb))
    splits = max(1, min(splits, num_vt))
    tiles_per_split = triton.cdiv(num_vt, splits)
    splits = triton.cdiv(num_vt, tiles_per_split)  # no empty split
    group = max(1, sms // splits)
    parts = _empty((3, splits, Nc), torch.float32, device)
    lse = _empty((Nc,), torch.float32, device) if save_lse else parts
    seq_logps = _empty((S,), torch.float64, device)  # per-sequence sums in float64 (SPEC 7)
    softcap_v, inv_temp = _softcap_args(softcap, temperature)
    token_idx = plan.token_idx.contiguous()
    targets = plan.targets.contiguous()
    with _device_ctx(hidden):
        _forward_partials_kernel[(num_tb * splits,)](
            hidden, weight, bias if bias is not None else hidden, token_idx, targets,
            parts[0], parts[1], parts[2],
            Nc, V, H, hidden.stride(0), weight.stride(0), splits, tiles_per_split, group, softcap_v, inv_temp,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT=_dot_mode(hidden.dtype), **fwd,
        )
        _merge_segments_kernel[(S,)](
            parts[0], parts[1], parts[2], plan.seq_offsets.contiguous(), lse, seq_logps, Nc, splits,
            SAVE_LSE=save_lse, BLOCK_T=cfg.segment_block, num_warps=4,
        )
    return seq_logps, (lse if save_lse else None)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, token_idx_ptr, targets_ptr, seq_id_ptr, lse_ptr, grad_seq_ptr,
    dz_ptr, db_part_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_h, stride_w, stride_dz, group, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (token block, vocab block) of the current (chunk x range) block: recompute the logit tile,
    write ``dz_raw`` (input dtype) at ``dz[local token, local col]``, its fp32 column sums for the bias at
    ``db_part[token block, local col]`` and, with FILTER, the tile's skip flag."""
    pid = tl.program_id(0)
    num_tb = tl.cdiv(n_tok, BLOCK_N)
    num_vb = tl.cdiv(n_v, BLOCK_V)
    tb, vb = _swizzle(pid, num_tb, num_vb, group)
    local_rows = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_tok
    rows = tok_start + local_rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    sid = tl.load(seq_id_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_seq_ptr + sid, mask=row_mask, other=0.0)
    local_cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local_cols < n_v
    cols = v_start + local_cols

    z, t = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, tok * stride_h, row_mask, cols, col_mask, H, stride_w,
                       softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, DOT, BLOCK_N, BLOCK_V, BLOCK_H)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    # dL/dz = g_s (onehot(y) - softmax(z)), softmax from the forward's lse (lanes past V: exp(-inf) = 0).
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = tl.where(tile_mask, g[:, None] * (onehot - p), 0.0)
    if FILTER:
        # Approximate, opt-in: a tile whose |g (onehot - p)| < eps everywhere is dropped; both GEMMs skip it.
        skip = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) < filter_eps
        dz = tl.where(skip, 0.0, dz)
        tl.store(skip_ptr + tb * num_vb + vb, skip.to(tl.int8))
    # Chain rule back to z_raw: d/dz_raw [softcap tanh(z_raw/softcap) / T] = (1 - tanh^2) / T.
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = dz * inv_temp
    dz_off = local_rows.to(tl.int64)[:, None] * stride_dz + local_cols[None, :]
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_DB:
        tl.store(db_part_ptr + tb.to(tl.int64) * n_v + local_cols, tl.sum(dz, axis=0), mask=col_mask)


@triton.jit
def _dw_gemm_kernel(
    dz_ptr, hidden_ptr, token_idx_ptr, acc_ptr, out_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_dz, stride_h, num_vb_skip, group,
    LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr, FILTER: tl.constexpr, DOT: tl.constexpr,
    SKIP_BN: tl.constexpr, SKIP_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[v_start + m, n] (+)= sum_k dz[k, m] h[token_idx[tok_start + k], n]``: program (vocab block, H
    block), reduction over the chunk's tokens in order, fp32 in registers. ``acc``/``out`` are ``[V, H]``
    row-major (``acc`` fp32; ``out`` in the weight's dtype; they may be the same tensor).

    The hidden rows of a step are gathered through ``token_idx``. Each step's indices are loaded one step
    ahead (``tok`` is loop-carried), so that the hidden-row load of a step depends on no load of the same
    step: Triton's pipeliner then treats it as a direct load and buffers it ``num_stages - 1`` steps ahead,
    instead of splitting those stages between the index load and the row load (the module docstring,
    "Tuning and performance changes")."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_v, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    pm, pn = _swizzle(pid, num_m, num_n, group)
    local_cols = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    v_mask = local_cols < n_v
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    idx_ptr = token_idx_ptr + tok_start
    ks0 = tl.arange(0, BLOCK_K)
    tok = tl.load(idx_ptr + ks0, mask=ks0 < n_tok, other=0).to(tl.int64)  # step 0's rows
    for k0 in range(0, n_tok, BLOCK_K):
        ks = k0 + ks0
        k_mask = ks < n_tok
        # The next step's rows, before this step's loads (index n_tok and beyond: masked, row 0).
        ks_next = ks + BLOCK_K
        tok_next = tl.load(idx_ptr + ks_next, mask=ks_next < n_tok, other=0).to(tl.int64)
        go = True
        if FILTER:
            go = tl.load(skip_ptr + (k0 // SKIP_BN) * num_vb_skip + (pm * BLOCK_M) // SKIP_BV) == 0
        if go:
            # dz^T tile [BLOCK_M vocab, BLOCK_K tokens]
            a = tl.load(dz_ptr + ks.to(tl.int64)[None, :] * stride_dz + local_cols[:, None],
                        mask=v_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(hidden_ptr + tok[:, None] * stride_h + hs[None, :],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = _dot_acc(a, b, acc, DOT)
        tok = tok_next
    off = (v_start + local_cols).to(tl.int64)[:, None] * H + hs[None, :]
    mask = v_mask[:, None] & h_mask[None, :]
    _finish(acc, acc_ptr, out_ptr, off, off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _dh_gemm_kernel(
    dz_ptr, weight_ptr, token_idx_ptr, acc_ptr, out_ptr, skip_ptr,
    tok_start, n_tok, v_start, n_v, H, stride_dz, stride_w, num_vb_skip, group,
    LOAD_ACC: tl.constexpr, ACC_GATHERED: tl.constexpr, STORE_OUT: tl.constexpr, FILTER: tl.constexpr,
    DOT: tl.constexpr, SKIP_BN: tl.constexpr, SKIP_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dh[token_idx[tok_start + m], n] (+)= sum_k dz[m, k] W[v_start + k, n]``: program (token block, H
    block), reduction over the range's vocabulary in order, fp32 in registers. ``out`` is ``dhidden
    [N, H]`` (rows gathered through token_idx); ``acc`` is either ``out`` itself (ACC_GATHERED, fp32 hidden)
    or a compact fp32 ``[Nc, H]`` buffer indexed by plan position."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_tok, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    pm, pn = _swizzle(pid, num_m, num_n, group)
    local_rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local_rows < n_tok
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dz_row_off = local_rows.to(tl.int64)[:, None] * stride_dz
    for k0 in range(0, n_v, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_v
        go = True
        if FILTER:
            go = tl.load(skip_ptr + ((pm * BLOCK_M) // SKIP_BN) * num_vb_skip + k0 // SKIP_BV) == 0
        if go:
            a = tl.load(dz_ptr + dz_row_off + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(weight_ptr + (v_start + ks).to(tl.int64)[:, None] * stride_w + hs[None, :],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = _dot_acc(a, b, acc, DOT)
    rows = tok_start + local_rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    mask = row_mask[:, None] & h_mask[None, :]
    out_off = tok[:, None] * H + hs[None, :]
    acc_off = rows[:, None] * H + hs[None, :]
    if ACC_GATHERED:
        acc_off = out_off
    _finish(acc, acc_ptr, out_ptr, acc_off, out_off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _bias_reduce_kernel(
    db_part_ptr, acc_ptr, out_ptr, v_start, n_v, num_tb,
    LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """``db[v_start + c] (+)= sum_i db_part[i, c]`` over the chunk's token blocks, in order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_v
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = db_part_ptr + cols
    for i in range(num_tb):  # token blocks in order: a fixed reduction order
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += n_v
    off = v_start + cols
    _finish(acc, acc_ptr, out_ptr, off, off, mask, LOAD_ACC, STORE_OUT)


@triton.jit
def _scatter_rows_kernel(acc_ptr, token_idx_ptr, out_ptr, n_tok, H, group,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[token_idx[m], :] = acc[m, :]`` cast to out's dtype: the compact fp32 dhidden accumulator
    (plan order) into the ``[N, H]`` gradient."""
    pid = tl.program_id(0)
    pm, pn = _swizzle(pid, tl.cdiv(n_tok, BLOCK_M), tl.cdiv(H, BLOCK_N), group)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n_tok
    hs = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (hs < H)[None, :]
    tok = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    x = tl.load(acc_ptr + rows[:, None] * H + hs[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + tok[:, None] * H + hs[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def _ranges(start, stop, width):
    return [(v, min(width, stop - v)) for v in range(start, stop, width)]


def _plan_blocks(Nc, V, itemsize, cfg, need_hidden, need_weight, need_bias, hidden_dtype, weight_dtype,
                 bias_dtype):
    """The streaming order and the (token chunk, vocab range) blocks of a fresh ``scratch_bytes`` scratch:
    returns ``(outer, [(tok_start, n_tok)], [(v_start, n_v)])``."""
    tile = cfg.block_n * cfg.block_v
    cap_elems = max(tile, cfg.scratch_bytes // itemsize)
    outer = cfg.outer
    if outer == "auto":
        if Nc * V <= cap_elems:
            outer = "vocab"  # one block covers the plane: no accumulator either way
        else:
            # Bytes of the fp32 accumulator each order needs (per H column; the H factor cancels).
            vocab_acc = Nc * 4 if (need_hidden and hidden_dtype != torch.float32) else 0
            token_acc = (V * 4 if (need_weight and weight_dtype != torch.float32) else 0) + (
                4 if (need_bias and bias_dtype != torch.float32) else 0)
            outer = "vocab" if vocab_acc <= token_acc else "token"
    if outer == "vocab":
        n_v = max(cfg.block_v, (cap_elems // max(Nc, 1)) // cfg.block_v * cfg.block_v)
        return outer, [(0, Nc)], _ranges(0, V, min(n_v, V))
    n_t = max(cfg.block_n, (cap_elems // V) // cfg.block_n * cfg.block_n)
    return outer, _ranges(0, Nc, min(n_t, Nc)), [(0, V)]


@dataclass(frozen=True)
class BackwardPlan:
    """How :func:`linear_backward` walks the ``[Nc, V]`` plane and where its buffers live.

    Phase 1 visits ``tok_blocks x v_blocks``; dW rows ``>= tail_start`` are not written there (their
    storage may hold the dhidden accumulator) but in phase 2, which recomputes dz for ``tail_blocks``.
    scratch: "fresh" or "dhidden" (the dz scratch is a view of dhidden's storage, which nothing else
        uses before the end).
    dh_acc: "none" (one range writes dhidden directly), "dhidden" (fp32: accumulate in place), "fresh"
        (a compact fp32 ``[Nc, H]`` buffer) or "weight_tail" (the same buffer, placed in the storage of
        dW rows ``>= tail_start``, written only after dhidden is final).
    dw_acc / db_acc: "none", "weight" / "bias" (fp32: in place) or "fresh" (token-outer, 16-bit).
    dz_rows / db_part_shape / num_skip_flags: sizes of the dz scratch, the bias partials, the filter flags.
    extra_bytes: the allocations beyond the gradients themselves, by name (O(Nc + V) ones included).
    """

    outer: str
    tok_blocks: list
    v_blocks: list
    stride_dz: int
    scratch: str
    dh_acc: str
    dw_acc: str
    db_acc: str
    tail_start: int
    tail_blocks: list
    tail_stride_dz: int
    dz_rows: int
    db_part_shape: tuple
    num_skip_flags: int
    extra_bytes: dict

    @property
    def total_extra_bytes(self) -> int:
        return sum(self.extra_bytes.values())


def _tail_blocks(tail_start, V, Nc, H, budget, cap, itemsize, cfg: LinearKernelConfig, num_sms):
    """Phase 2's vocabulary blocks over ``[tail_start, V)``. Each block's dW GEMM is one launch whose grid
    is ``cdiv(width, dw block_m) x cdiv(H, dw block_n)`` programs, each reducing over all ``Nc`` tokens: a
    grid of less than 2 waves of ``num_sms`` leaves SMs idle for a whole long reduction. So a block is as
    wide as the scratch ``budget`` (bytes) allows, and at least as wide as 2 waves need, as long as that
    stays within ``cap`` bytes of scratch; the tail is then cut into equal blocks (+- one ``block_v``), so
    that the last one is not a sliver with a tiny grid (the blocks that get one ``block_v`` more are the
    last ones: the last block also holds the partial tile of ``V``)."""
    bv = cfg.block_v
    dw = cfg.params("linear_dw")
    tail = V - tail_start
    row_bytes = Nc * itemsize
    w_budget = max(bv, budget // row_bytes // bv * bv)
    w_cap = max(w_budget, cap // row_bytes // bv * bv)
    m_blocks = triton.cdiv(2 * num_sms, triton.cdiv(H, dw["block_n"]))
    w_min = min(triton.cdiv(m_blocks * dw["block_m"], bv) * bv, w_cap)
    # As many blocks as the budget needs, fewer where 2 waves need wider ones, never wider than the cap.
    count = max(1, min(triton.cdiv(tail, w_budget), tail // w_min), triton.cdiv(tail, w_cap))
    base, extra = divmod(triton.cdiv(tail, bv), count)
    blocks, v = [], tail_start
    for i in range(count):
        n = min((base + (i >= count - extra)) * bv, V - v)
        blocks.append((v, n))
        v += n
    return blocks


def plan_backward(N, Nc, V, H, hidden_dtype, weight_dtype, bias_dtype, need_hidden, need_weight, need_bias,
                  cfg: LinearKernelConfig, filter_on=False, num_sms=1) -> BackwardPlan:
    """Choose the backward's blocks and buffer placement (see the module docstring, "Memory").

    ``N`` rows of hidden, ``Nc`` plan tokens, ``V x H`` head; dtypes of hidden / weight / bias (None when
    there is no bias to differentiate); ``num_sms``: SMs the phase-2 grids should fill (1: the
    interpreter). Pure host arithmetic, so its memory figures are testable anywhere.
    """
    h_item = torch.empty(0, dtype=hidden_dtype).element_size()
    w_item = torch.empty(0, dtype=weight_dtype).element_size()
    f32 = torch.float32
    outer, tok_blocks, v_blocks = _plan_blocks(Nc, V, h_item, cfg, need_hidden, need_weight, need_bias,
                                               hidden_dtype, weight_dtype, bias_dtype)
    scratch, dh_acc, tail_start, tail_blocks = "fresh", "none", V, []
    width = max(n for _, n in v_blocks)
    # Output reuse (cfg.reuse_outputs): vocab-outer with a 16-bit dhidden needs the fp32 accumulator; the
    # dz scratch then moves into dhidden's own storage, as wide as the cap and that storage allow.
    host_w = min(cfg.scratch_bytes // h_item, N * H) // max(Nc, 1) // cfg.block_v * cfg.block_v
    if (cfg.reuse_outputs and outer == "vocab" and need_hidden and hidden_dtype != f32
            and host_w >= cfg.block_v):
        scratch, dh_acc = "dhidden", "fresh"
        width = min(host_w, triton.cdiv(V, cfg.block_v) * cfg.block_v)
        # fp32 [Nc, H] = Nc * 4 / w_item rows of dW. Hosting it there costs one more recompute of those
        # columns (phase 2), so only when they are at most half the vocabulary.
        acc_rows = triton.cdiv(Nc * 4, w_item)
        if need_weight and acc_rows <= V // 2:
            dh_acc = "weight_tail"
            tail_start = (V - acc_rows) // cfg.block_v * cfg.block_v
            v_blocks = _ranges(0, tail_start, width) + _ranges(tail_start, V, width)
            # Phase 2's scratch is fresh: 1/32 of the gradients' own bytes (and at most the cap), widened
            # up to 1/16 of them where 2 waves of the dW GEMM need it (see _tail_blocks).
            grads = N * H * h_item + V * H * w_item
            tail_blocks = _tail_blocks(tail_start, V, Nc, H, min(cfg.scratch_bytes, grads // 32),
                                       min(cfg.scratch_bytes, grads // 16), h_item, cfg, num_sms)
        else:
            v_blocks = _ranges(0, V, width)
    multi_tok, multi_v = len(tok_blocks) > 1, len(v_blocks) > 1
    if dh_acc == "none" and need_hidden:
        dh_acc = "dhidden" if hidden_dtype == f32 else ("fresh" if multi_v else "none")
    dw_acc = "none"
    if need_weight:
        dw_acc = "weight" if weight_dtype == f32 else ("fresh" if multi_tok else "none")
    db_acc = "none"
    if need_bias:
        db_acc = "bias" if bias_dtype == f32 else ("fresh" if multi_tok else "none")

    max_tok = max(n for _, n in tok_blocks)
    max_v = max(n for _, n in v_blocks)
    stride_dz = triton.cdiv(max_v, 16) * 16  # 32-byte aligned rows
    tail_stride = triton.cdiv(max((n for _, n in tail_blocks), default=0), 16) * 16
    max_tb = triton.cdiv(max_tok, cfg.block_n)
    num_skip_flags = max_tb * triton.cdiv(max(max_v, tail_stride), cfg.block_v)
    extra = {
        "dz_scratch": 0 if scratch == "dhidden" else max_tok * stride_dz * h_item,
        "tail_dz_scratch": Nc * tail_stride * h_item,
        "dhidden_acc": Nc * H * 4 if dh_acc == "fresh" else 0,
        "dweight_acc": V * H * 4 if dw_acc == "fresh" else 0,
        "dbias_acc": V * 4 if db_acc == "fresh" else 0,
        "dbias_partials": max_tb * max_v * 4 if need_bias else 0,
        "skip_flags": num_skip_flags if filter_on else 0,
    }
    return BackwardPlan(outer, tok_blocks, v_blocks, stride_dz, scratch, dh_acc, dw_acc, db_acc, tail_start,
                        tail_blocks, tail_stride, max_tok, (max_tb, max_v), num_skip_flags, extra)


class BlockLaunches:
    """The backward's kernel launches over one (token chunk x vocabulary range) block of the ``[Nc, V]``
    plane, with one config: :func:`linear_backward` walks the plane with it, and the tune step
    (``benchmarks/gpu/tune.py``) times each kernel on one block of its G1 plan through the same calls.

    ``db_part`` / ``skip``: the bias partials and the filter flags (any tensor when unused).
    """

    def __init__(self, cfg: LinearKernelConfig, hidden, weight, bias, plan, softcap, temperature, lse, grad_seq,
                 grad_filter_eps, db_part, skip):
        self.cfg, self.hidden, self.weight, self.bias = cfg, hidden, weight, bias
        self.token_idx = plan.token_idx.contiguous()
        self.targets = plan.targets.contiguous()
        self.seq_id = plan.seq_id.contiguous()
        self.lse = lse.contiguous().float()
        self.grad_seq = grad_seq.contiguous().float()
        self.softcap_v, self.inv_temp = _softcap_args(softcap, temperature)
        self.has_softcap = softcap is not None
        self.eps = float(grad_filter_eps)
        self.use_filter = grad_filter_eps > 0
        self.db_part, self.skip = db_part, skip
        self.dot = _dot_mode(hidden.dtype)

    def grad_logits(self, dz_buf, stride, tok_start, n_tok, v_start, n_v, with_db):
        """dz of the block into ``dz_buf`` (row stride ``stride``), bias partials if ``with_db``."""
        cfg, hidden, weight, bias = self.cfg, self.hidden, self.weight, self.bias
        _grad_logits_kernel[(triton.cdiv(n_tok, cfg.block_n) * triton.cdiv(n_v, cfg.block_v),)](
            hidden, weight, bias if bias is not None else hidden, self.token_idx, self.targets, self.seq_id,
            self.lse, self.grad_seq, dz_buf, self.db_part, self.skip,
            tok_start, n_tok, v_start, n_v, hidden.shape[1], hidden.stride(0), weight.stride(0), stride,
            cfg.group, self.softcap_v, self.inv_temp, self.eps,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=self.has_softcap, DOT=self.dot, NEED_DB=with_db,
            FILTER=self.use_filter, **cfg.launch("linear_dz"))

    def dw_gemm(self, dz_buf, stride, acc, out, tok_start, n_tok, v_start, n_v, load_acc, store_out):
        """``dW[v_start:v_start+n_v] (+)= dz^T h[chunk]`` (see ``_dw_gemm_kernel``)."""
        cfg, hidden = self.cfg, self.hidden
        H = hidden.shape[1]
        launch = cfg.launch("linear_dw")
        _dw_gemm_kernel[(triton.cdiv(n_v, launch["BLOCK_M"]) * triton.cdiv(H, launch["BLOCK_N"]),)](
            dz_buf, hidden, self.token_idx, acc, out, self.skip,
            tok_start, n_tok, v_start, n_v, H, stride, hidden.stride(0), triton.cdiv(n_v, cfg.block_v), cfg.group,
            LOAD_ACC=load_acc, STORE_OUT=store_out, FILTER=self.use_filter, DOT=self.dot,
            SKIP_BN=cfg.block_n, SKIP_BV=cfg.block_v, **launch)

    def dh_gemm(self, dz_buf, stride, acc, out, tok_start, n_tok, v_start, n_v, load_acc, gathered, store_out):
        """``dh[chunk] (+)= dz W[v_start:v_start+n_v]`` (see ``_dh_gemm_kernel``)."""
        cfg, weight = self.cfg, self.weight
        H = weight.shape[1]
        launch = cfg.launch("linear_dh")
        _dh_gemm_kernel[(triton.cdiv(n_tok, launch["BLOCK_M"]) * triton.cdiv(H, launch["BLOCK_N"]),)](
            dz_buf, weight, self.token_idx, acc, out, self.skip,
            tok_start, n_tok, v_start, n_v, H, stride, weight.stride(0), triton.cdiv(n_v, cfg.block_v), cfg.group,
            LOAD_ACC=load_acc, ACC_GATHERED=gathered, STORE_OUT=store_out, FILTER=self.use_filter, DOT=self.dot,
            SKIP_BN=cfg.block_n, SKIP_BV=cfg.block_v, **launch)


def linear_backward(hidden, weight, bias, plan, softcap, temperature, lse, grad_seq, need_hidden, need_weight,
                    need_bias, deterministic=False, grad_filter_eps=0.0):
    """Gradients of ``sum_s grad_seq[s] * L_s`` w.r.t. hidden, weight and bias, by streaming dz.

    Args:
        hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` | None, plan, softcap, temperature: as in forward.
        lse: ``[Nc]`` fp32 from :func:`linear_forward`. grad_seq: ``[S]`` upstream gradient ``dloss/dL_s``.
        need_hidden / need_weight / need_bias: which gradients to compute (a frozen head skips dW).
        deterministic: accepted; every mode of this backend is bitwise reproducible (see module docstring).
        grad_filter_eps: > 0 skips tiles whose ``|g (onehot - softmax)|`` is below it everywhere.
    Returns:
        :class:`~spo_kernels.backends.LinearGrads`: ``dhidden [N, H]`` in hidden's dtype (zero on rows
        outside the plan), ``dweight [V, H]`` / ``dbias [V]`` in their parameter's dtype; None where not needed.
    """
    del deterministic  # every path is deterministic
    hidden, weight, bias = _prep(hidden, weight, bias)
    need_bias = bool(need_bias and bias is not None)
    device = hidden.device
    N, H = hidden.shape
    V = weight.shape[0]
    Nc = plan.num_tokens
    if Nc == 0 or not (need_hidden or need_weight or need_bias):
        return LinearGrads(
            hidden=torch.zeros((N, H), dtype=hidden.dtype, device=device) if need_hidden else None,
            weight=torch.zeros((V, H), dtype=weight.dtype, device=device) if need_weight else None,
            bias=torch.zeros_like(bias) if need_bias else None)
    cfg = kernel_config(hidden.dtype, device=device, Nc=Nc, H=H)
    use_filter = grad_filter_eps > 0
    bp = plan_backward(N, Nc, V, H, hidden.dtype, weight.dtype, bias.dtype if need_bias else None,
                       need_hidden, need_weight, need_bias, cfg, use_filter, _num_sms(device))
    f32 = torch.float32
    # Gradients. dhidden is zero outside the plan: zeroed up front unless its storage hosts the scratch
    # (then it is zeroed after the last read of dz, just before the accumulator is scattered into it).
    dh = None
    if need_hidden:
        dh = _empty((N, H), hidden.dtype, device) if bp.scratch == "dhidden" else torch.zeros(
            (N, H), dtype=hidden.dtype, device=device)
    dw = _empty((V, H), weight.dtype, device) if need_weight else None
    db = _empty((V,), bias.dtype, device) if need_bias else None
    # Accumulators: none, the gradient itself (fp32), a fresh fp32 buffer, or dW's tail rows.
    def accumulator(kind, own, shape):
        return _empty(shape, f32, device) if kind == "fresh" else (None if kind == "none" else own)

    if bp.dh_acc == "weight_tail":
        # Rows >= tail_start of dW, reinterpreted as fp32 [Nc, H]; dW's own values go there in phase 2.
        start = bp.tail_start * H  # a multiple of block_v * H elements: the fp32 view is aligned
        dh_acc = dw.view(-1)[start: start + Nc * H * 4 // dw.element_size()].view(f32).view(Nc, H)
        if POISON_EMPTY:
            dh_acc.fill_(float("nan"))
    else:
        dh_acc = accumulator(bp.dh_acc, dh, (Nc, H))
    dw_acc = accumulator(bp.dw_acc, dw, (V, H))
    db_acc = accumulator(bp.db_acc, db, (V,))
    if bp.scratch == "dhidden":
        dz = dh.view(-1)[: bp.dz_rows * bp.stride_dz].view(bp.dz_rows, bp.stride_dz)
        if POISON_EMPTY:
            dz.fill_(float("nan"))
    else:
        dz = _empty((bp.dz_rows, bp.stride_dz), hidden.dtype, device)
    db_part = _empty(bp.db_part_shape, f32, device) if need_bias else dz
    skip = _empty((bp.num_skip_flags,), torch.int8, device) if use_filter else dz

    run = BlockLaunches(cfg, hidden, weight, bias, plan, softcap, temperature, lse, grad_seq, grad_filter_eps,
                        db_part, skip)
    grad_logits = run.grad_logits

    def dw_gemm(dz_buf, stride, tok_start, n_tok, v_start, n_v, load_acc, store_out):
        run.dw_gemm(dz_buf, stride, dw_acc if dw_acc is not None else dw, dw, tok_start, n_tok, v_start, n_v,
                    load_acc, store_out)

    with _device_ctx(hidden):
        # Phase 1: every block of the plane.
        for tok_start, n_tok in bp.tok_blocks:
            num_tb = triton.cdiv(n_tok, cfg.block_n)
            first_tok, last_tok = tok_start == 0, tok_start + n_tok == Nc
            for v_start, n_v in bp.v_blocks:
                first_v, last_v = v_start == 0, v_start + n_v == V
                grad_logits(dz, bp.stride_dz, tok_start, n_tok, v_start, n_v, need_bias)
                if need_weight and v_start < bp.tail_start:
                    # Across token chunks (token-outer) dW accumulates in fp32; the last chunk writes it.
                    dw_gemm(dz, bp.stride_dz, tok_start, n_tok, v_start, n_v, not first_tok,
                            last_tok or dw_acc is dw)
                if need_bias:
                    _bias_reduce_kernel[(triton.cdiv(n_v, 128),)](
                        db_part, db_acc if db_acc is not None else db, db, v_start, n_v, num_tb,
                        LOAD_ACC=not first_tok, STORE_OUT=last_tok or db_acc is db, BLOCK=128, num_warps=4)
                if need_hidden:
                    # Across vocab ranges (vocab-outer) dhidden accumulates in fp32. The last range writes
                    # dhidden itself, unless dhidden's storage is the scratch being read (then see below).
                    gathered = dh_acc is dh
                    store_out = (last_v and bp.scratch != "dhidden") or gathered
                    run.dh_gemm(dz, bp.stride_dz, dh_acc if dh_acc is not None else dh, dh, tok_start, n_tok,
                                v_start, n_v, not first_v, gathered, store_out)
        if bp.scratch == "dhidden":
            # dz is dead: dhidden = 0 outside the plan, the accumulator on its rows.
            dh.zero_()
            bm, bn = cfg.params("linear_dh")["block_m"], cfg.params("linear_dh")["block_n"]
            _scatter_rows_kernel[(triton.cdiv(Nc, bm) * triton.cdiv(H, bn),)](
                dh_acc, run.token_idx, dh, Nc, H, cfg.group, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        # Phase 2: the dW rows that held the accumulator, from a second recompute of their dz.
        if bp.tail_blocks:
            dz_tail = _empty((Nc, bp.tail_stride_dz), hidden.dtype, device)
            for v_start, n_v in bp.tail_blocks:
                grad_logits(dz_tail, bp.tail_stride_dz, 0, Nc, v_start, n_v, False)
                dw_gemm(dz_tail, bp.tail_stride_dz, 0, Nc, v_start, n_v, False, True)
    return LinearGrads(hidden=dh, weight=dw, bias=db)
