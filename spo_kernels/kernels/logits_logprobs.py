"""Logits path (SPEC 1): fused log-softmax gather, per-sequence sums, and the in-place backward.

Host launchers (the :class:`spo_kernels.backends.Backend` ops of the ``triton`` backend):

- ``logits_forward(logits [N, V], plan, transform, options) -> LogprobResult(seq_logps [S], lse [Nc], stats)``
- ``logits_backward(logits [N, V], plan, transform, lse [Nc], grad_seq [S], out [N, V])``

The kernels take (softcap, temperature): a :class:`~spo_kernels.kernels.types.LogitTransform`'s multiplier
is folded into both (``LogitTransform.folded``: ``c tanh(m x / c) / tau = c' tanh(x / c') / tau'`` with
``c' = c / m``, ``tau' = tau / m``), so the math below holds for every transform.

Math, for a plan token t (row r of the flattened logits, target y, sequence s) with raw logits x = logits[r]:

    z = x;  z <- c * tanh(z / c)   (softcap c, optional);   z <- z / tau   (temperature tau, optional)
    lse_t  = log sum_v exp(z_v)                      (online, over vocab tiles, fp32)
    logp_t = z_y - lse_t
    L_s    = sum_{t in s} logp_t
    dloss/dx_v = g_s * (onehot(y)_v - exp(z_v - lse_t)) * dz_v/dx_v,   dz/dx = (1 - tanh^2(x / c)) / tau

with ``g_s = dloss/dL_s`` (``grad_seq``): docs/gradient.md §2, §3 and §5; precision, offsets and padded lanes
in docs/numerics.md §1-§3, the in-place rule in §6. Inputs fp32/bf16/fp16 compute in fp32; float64 inputs compute in
float64 (tests). Vocab lanes past V are set to -inf *after* every transform, so they never enter the
softmax (verl #2656: lanes loaded as 0 gave log-probs of +123).

Design:

- Forward = two launches. ``_token_logprob_kernel``: grid ``(Nc,)``, one program per completion token
  (ignored tokens are never launched), writes ``lse[t]`` and ``logp[t]``. ``_segment_sum_kernel``: grid
  ``(S,)``, one program per sequence sums its contiguous run ``seq_offsets[s]:seq_offsets[s+1]`` of the
  plan in a fixed order. Why not atomics into ``L``: the add order would vary run to run
  (non-deterministic fp32 sums). Why not one program per sequence over the vocabulary: S is 8..64 in a
  typical step, far too few programs to saturate HBM. The ``[Nc]`` fp32 logp buffer costs 4 bytes per
  token against ``V * 2`` bytes read per token, and never passes through a PyTorch op.
- Backward = one launch, grid ``(N,)``, one program per row of ``out``. A ``[N]`` int32 map row ->
  plan index (-1 outside the plan) picks the branch: plan rows read their logits tile and overwrite the
  same tile with the gradient (read-before-write inside one program, and each row belongs to exactly one
  program, so ``out`` may be ``logits`` itself); other rows only write zeros (no read). Every element of
  ``out`` is written exactly once: the minimum traffic, correct for an uninitialized ``out`` and for the
  in-place case where the buffer still holds logits. The saved LSE is used, the reduction is never re-run.
- 64-bit row offsets (``row * stride`` in int64) everywhere ``[N, V]`` is indexed; tokens and rows are on
  grid axis 0 only (axes 1 and 2 stop at 65535).
- Online LSE is kept per vocab lane (``m_v``, ``s_v`` vectors) and merged once at the end, with one exp
  per element: ``s <- s * exp(m - z) + 1`` when z is the new max, else ``s <- s + exp(z - m)``; a single
  ``exp(min(m, z) - max(m, z))`` serves both cases. No cross-lane reduction inside the vocab loop; the
  running max starts at -FLT_MAX (finite), so no -inf guard is needed per element.
- Vocab tiles of ``BLOCK_V = min(next_pow2(V), 4096)`` lanes (8 warps: 16 elements per thread). Full tiles
  are loaded and stored unmasked; only the last, partial tile is masked. The forward is a streaming
  read (bandwidth bound at V = 128k: about 10 ALU ops and one exp per 2-byte element).

Tuning and the prefetching forward (neither measured on a GPU yet):

- Launch parameters (``block_v``, ``num_warps``, and the forward's ``prefetch``) come from the tuning
  table (``tuning.py``, ``tuned_configs.json``: kernels ``logits_fwd`` / ``logits_bwd``, keyed by GPU name,
  dtype and a V bucket) when it has an entry for the current GPU, else from the built-in defaults above
  (``launch_params``); never in the interpreter. ``CONFIG_OVERRIDES`` applies last (tests).
- Prefetch (``PREFETCH``, on by default except for float64): the forward loads the next full vocab tile
  into registers before it folds the current one, so each program has two tiles of loads in flight
  instead of one while it computes. Why this and not several rows per program: the kernel is bandwidth
  bound, and what keeps HBM busy is bytes in flight per SM. Estimate: at 8 warps and 64-70 registers
  per thread about 3 programs share an SM, one 8 KiB bf16 tile each in flight, ~24 KiB per SM; Little's
  law with H100's 3.35 TB/s and a loaded DRAM latency of ~1 us asks for about as much, more under
  contention. A second tile per program doubles that at the cost of 8 registers (bf16) per thread, and
  keeps the one-token-per-program grid (no tail effects for small Nc, and the same fp32 per-lane
  reduction in the same order: results bitwise equal to the plain loop's in the interpreter). Several
  rows per program would not add bytes in flight per register. The compiler's own pipelining
  (``tl.range(num_stages=...)``) would stage the tiles through shared memory (cp.async) for the same
  purpose; not chosen since it adds a shared-memory round trip per element to a kernel with no reuse.
  Compiled for sm_90 (G2, bf16): 70 registers with triton 3.9, 80 with 3.6, no spills (hoisting the
  target logit's load above the stream made ptxas spill 4 bytes, so it stays after). The float64
  variant (tests only) keeps the plain loop: with the softcap chain a second fp64 tile in flight spills
  there. The tune step measures ``prefetch`` 0 against 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_helpers as TH
from . import tuning
from .logits_stats import _token_stats
from .logits_tiles import _NO_MAX, _col_offsets, _load_tile, _transform
from .triton_helpers import tanh_sech2
from .types import KernelOptions, LogitTransform, LogprobResult, TokenStats

Tensor = torch.Tensor

# Largest vocab tile of the built-in defaults; V=128256 takes 32 tiles of 4096. Tests lower it to
# exercise several tiles.
MAX_BLOCK_V = 4096
# Tests (and users tuning a GPU) may set launch parameters here, per kernel, named as in the tuning
# table: {"logits_fwd": {"prefetch": 0}, "logits_bwd": {"num_warps": 4}}. They apply over the table.
CONFIG_OVERRIDES: dict = {}
# Tokens summed per step of the segment reduction.
BLOCK_T = 256


# ---------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------

# ``_transform`` (SPEC 2 in the compute dtype), ``_col_offsets``, ``_load_tile`` and the initial running max
# ``_NO_MAX`` live in ``logits_tiles`` (shared with the statistics' pass in ``logits_stats``).


@triton.jit
def _fold_tile(m, s, x, vcols, V, softcap, temperature,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    """Fold one loaded vocab tile ``x`` into the per-lane online log-sum-exp ``(m_v, s_v = sum exp(z - m_v))``.

    One exp per element serves both cases: with ``d = exp(min(m, z) - max(m, z))``,
    ``s <- s * d + 1`` when z is the new max (rescale the old sum), else ``s <- s + d``.
    In the ``MASKED`` (last) tile, lanes >= V are set to -inf *after* the transform, so d = 0.
    """
    z = _transform(x.to(ACC), softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    if MASKED:
        z = tl.where(vcols < V, z, float("-inf"))
    m_new = tl.maximum(m, z)
    d = tl.exp(tl.minimum(m, z) - m_new)
    s = tl.where(z > m, s * d + 1.0, s + d)
    return m_new, s


@triton.jit
def _token_lse(row_ptr, cols, V, stride_col, target, t, lse_ptr, token_logp_ptr, softcap, temperature,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
               ACC: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr):
    """The body of :func:`_token_logprob_kernel` without statistics: ``lse[t]`` and ``logp[t]``."""
    # Per-lane online log-sum-exp: lane v holds the max m_v and s_v = sum exp(z - m_v) over the
    # columns v, v + BLOCK_V, ...; no cross-lane reduction until the end.
    m = tl.full([BLOCK_V], _NO_MAX, ACC)
    s = tl.zeros([BLOCK_V], ACC)
    v_full = (V // BLOCK_V) * BLOCK_V
    if PREFETCH:
        if v_full > 0:
            x = _load_tile(row_ptr, cols, V, stride_col, UNIT_COL_STRIDE, False)
            for v0 in range(BLOCK_V, v_full, BLOCK_V):  # full tiles: no mask
                x_next = _load_tile(row_ptr, v0 + cols, V, stride_col, UNIT_COL_STRIDE, False)
                m, s = _fold_tile(m, s, x, v0 - BLOCK_V + cols, V, softcap, temperature,
                                  HAS_SOFTCAP, HAS_TEMPERATURE, ACC, False)
                x = x_next
            m, s = _fold_tile(m, s, x, v_full - BLOCK_V + cols, V, softcap, temperature,
                              HAS_SOFTCAP, HAS_TEMPERATURE, ACC, False)
    else:
        for v0 in range(0, v_full, BLOCK_V):  # full tiles: no mask
            x = _load_tile(row_ptr, v0 + cols, V, stride_col, UNIT_COL_STRIDE, False)
            m, s = _fold_tile(m, s, x, v0 + cols, V, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE, ACC, False)
    if v_full < V:  # the partial last tile
        x = _load_tile(row_ptr, v_full + cols, V, stride_col, UNIT_COL_STRIDE, True)
        m, s = _fold_tile(m, s, x, v_full + cols, V, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE, ACC, True)

    # Merge lanes: lse = M + log(sum_v s_v exp(m_v - M)); M is finite (>= the sentinel).
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)

    x_y = tl.load(row_ptr + _col_offsets(target, stride_col, UNIT_COL_STRIDE)).to(ACC)
    z_y = _transform(x_y, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    tl.store(lse_ptr + t, lse)
    tl.store(token_logp_ptr + t, z_y - lse)


@triton.jit
def _token_logprob_kernel(
    logits_ptr,        # [N, V] fp32/bf16/fp16/fp64
    token_idx_ptr,     # [Nc] int64, row of each plan token
    targets_ptr,       # [Nc] int64, its label in [0, V)
    lse_ptr,           # [Nc] out, ACC
    token_logp_ptr,    # [Nc] out, ACC
    V, stride_row, stride_col,
    softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr,
    stats_ptr=None,    # [4, Nc] out, ACC (STATS only): entropy, log sum p^2, mean logit, target is argmax
    num_tokens=None,   # Nc (STATS only)
    STATS: tl.constexpr = False,
):
    """Program t: ``lse[t]`` and ``logp[t]`` of plan token t, streaming its row in ``BLOCK_V`` tiles.

    PREFETCH: the next full tile is loaded (into registers) before the current one is folded, so each
    program keeps two tiles of loads in flight instead of one (module docstring, "Tuning and the
    prefetching forward").
    STATS: also the per-token statistics, from the same pass (:func:`_fold_tile_stats`; its own plain loop,
    so the code without statistics is exactly what it was)."""
    t = tl.program_id(0)  # plan token: grid axis 0 (up to 2^31 - 1 programs)
    row = tl.load(token_idx_ptr + t).to(tl.int64)
    target = tl.load(targets_ptr + t).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row  # 64-bit: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_V)

    if STATS:
        _token_stats(row_ptr, cols, V, stride_col, target, t, num_tokens, lse_ptr, token_logp_ptr, stats_ptr,
                     softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE, UNIT_COL_STRIDE, ACC, BLOCK_V)
    else:
        _token_lse(row_ptr, cols, V, stride_col, target, t, lse_ptr, token_logp_ptr, softcap, temperature,
                   HAS_SOFTCAP, HAS_TEMPERATURE, UNIT_COL_STRIDE, ACC, BLOCK_V, PREFETCH)


@triton.jit
def _segment_sum_kernel(
    token_logp_ptr,    # [Nc] ACC
    seq_offsets_ptr,   # [S+1] int64: sequence s owns plan entries [off[s], off[s+1])
    seq_logp_ptr,      # [S] out, float64
    BLOCK_T: tl.constexpr,
    weights_ptr=None,  # [Nc] fp32 token weights (HAS_WEIGHTS only)
    HAS_WEIGHTS: tl.constexpr = False,
):
    """``L_s = sum_{t in [off[s], off[s+1])} w_t logp_t`` in float64 (SPEC 7: an fp32 sum of 8k log-probs
    loses ~5e-4 of a DPO loss), fixed order (deterministic); empty runs give 0; ``w_t = 1`` without
    HAS_WEIGHTS (SPEC 8)."""
    seq = tl.program_id(0)
    start = tl.load(seq_offsets_ptr + seq)
    end = tl.load(seq_offsets_ptr + seq + 1)
    acc = tl.zeros([BLOCK_T], tl.float64)
    for t0 in range(start, end, BLOCK_T):
        idx = t0 + tl.arange(0, BLOCK_T)
        logp = tl.load(token_logp_ptr + idx, mask=idx < end, other=0.0).to(tl.float64)
        if HAS_WEIGHTS:
            logp = logp * tl.load(weights_ptr + idx, mask=idx < end, other=0.0).to(tl.float64)
        acc += logp
    tl.store(seq_logp_ptr + seq, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _grad_tile(in_row, out_row, vcols, V, stride_in_col, stride_out_col, target, lse, g, softcap, temperature,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
               ACC: tl.constexpr, MASKED: tl.constexpr):
    """``out = g (onehot(y) - exp(z - lse)) dz/dx`` on one tile, read before written (in-place safe)."""
    in_off = _col_offsets(vcols, stride_in_col, UNIT_COL_STRIDE)
    out_off = _col_offsets(vcols, stride_out_col, UNIT_COL_STRIDE)
    if MASKED:
        in_vocab = vcols < V
        x = tl.load(in_row + in_off, mask=in_vocab, other=0.0).to(ACC)
    else:
        x = tl.load(in_row + in_off).to(ACC)
    z = x
    chain = 1.0
    if HAS_SOFTCAP:
        tanh_u, sech2_u = tanh_sech2(x / softcap)
        z = softcap * tanh_u
        chain = sech2_u  # d/dx c tanh(x/c) = 1 - tanh^2(x/c)
    if HAS_TEMPERATURE:
        z = z / temperature
        chain = chain / temperature
    if MASKED:
        z = tl.where(in_vocab, z, float("-inf"))  # lanes past V: p = 0 (and never stored)
    p = tl.exp(z - lse)  # softmax from the saved LSE
    onehot = tl.where(vcols == target, 1.0, 0.0)
    dx = ((g * (onehot - p)) * chain).to(out_row.dtype.element_ty)
    if MASKED:
        tl.store(out_row + out_off, dx, mask=in_vocab)
    else:
        tl.store(out_row + out_off, dx)


@triton.jit
def _logits_backward_kernel(
    logits_ptr,        # [N, V] input (may alias out_ptr)
    out_ptr,           # [N, V] gradient, logits' dtype
    row_token_ptr,     # [N] int32: plan index of each row, -1 outside the plan
    targets_ptr,       # [Nc] int64
    seq_id_ptr,        # [Nc] int64
    lse_ptr,           # [Nc] ACC (saved by the forward)
    grad_seq_ptr,      # [S] g_s = dloss/dL_s
    V, stride_in_row, stride_in_col, stride_out_row, stride_out_col,
    softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    weights_ptr=None,  # [Nc] fp32 token weights w_t (HAS_WEIGHTS only): the gradient carries g_s w_t
    HAS_WEIGHTS: tl.constexpr = False,
):
    r = tl.program_id(0).to(tl.int64)  # row of [N, V]: grid axis 0
    t = tl.load(row_token_ptr + r)
    in_row = logits_ptr + r * stride_in_row  # 64-bit row offsets
    out_row = out_ptr + r * stride_out_row
    cols = tl.arange(0, BLOCK_V)
    v_full = (V // BLOCK_V) * BLOCK_V
    if t >= 0:  # a plan row: the gradient
        target = tl.load(targets_ptr + t)
        lse = tl.load(lse_ptr + t).to(ACC)
        g = tl.load(grad_seq_ptr + tl.load(seq_id_ptr + t)).to(ACC)
        if HAS_WEIGHTS:
            g = g * tl.load(weights_ptr + t).to(ACC)
        for v0 in range(0, v_full, BLOCK_V):
            _grad_tile(in_row, out_row, v0 + cols, V, stride_in_col, stride_out_col, target, lse, g, softcap,
                       temperature, HAS_SOFTCAP, HAS_TEMPERATURE, UNIT_COL_STRIDE, ACC, False)
        if v_full < V:
            _grad_tile(in_row, out_row, v_full + cols, V, stride_in_col, stride_out_col, target, lse, g, softcap,
                       temperature, HAS_SOFTCAP, HAS_TEMPERATURE, UNIT_COL_STRIDE, ACC, True)
    else:  # any other row: zeros, written without reading
        zeros = tl.zeros([BLOCK_V], out_ptr.dtype.element_ty)
        for v0 in range(0, v_full, BLOCK_V):
            tl.store(out_row + _col_offsets(v0 + cols, stride_out_col, UNIT_COL_STRIDE), zeros)
        if v_full < V:
            vcols = v_full + cols
            tl.store(out_row + _col_offsets(vcols, stride_out_col, UNIT_COL_STRIDE), zeros, mask=vcols < V)


# ---------------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------------

def _acc_dtypes(dtype: torch.dtype):
    """(torch, triton) compute dtype: fp32 for fp32/bf16/fp16, float64 for float64."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32, tl.float32
    raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {dtype}")


def _block_v(vocab: int, largest: int = None) -> int:
    return max(16, min(triton.next_power_of_2(vocab), MAX_BLOCK_V if largest is None else largest))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def launch_params(kernel: str, dtype: torch.dtype, vocab: int, device) -> dict:
    """``{"block_v", "num_warps"[, "prefetch"]}`` of ``kernel`` ("logits_fwd" | "logits_bwd") for logits of
    ``dtype`` with ``vocab`` columns on ``device``: the built-in defaults (``block_v`` = next_pow2(V) up to
    MAX_BLOCK_V, 8 warps from 2048 lanes on, prefetch on except for float64), replaced by the tuning
    table's entry for this GPU (never in the interpreter; ``tuning.py``), then by CONFIG_OVERRIDES.
    ``block_v`` from the table or the overrides is the largest tile: it is clipped to next_pow2(V)."""
    params = {"block_v": _block_v(vocab)}
    params["num_warps"] = _num_warps(params["block_v"])
    if kernel == "logits_fwd":
        # float64 (tests only) keeps the plain loop: its tiles are twice the registers, and with the softcap
        # chain a second one in flight spills on sm_90.
        params["prefetch"] = 0 if dtype == torch.float64 else 1
    where = "built-in defaults"
    if dtype in tuning.DTYPES.values():
        entry = tuning.lookup(kernel, dtype, device, V=vocab)
        if entry is not None:
            params.update(entry.params)
            where = entry.where()
    over = CONFIG_OVERRIDES.get(kernel)
    if over:
        params.update(over)
        where = f"{where} + CONFIG_OVERRIDES[{kernel!r}]"
    params = tuning.check_params(kernel, params, where)
    params["block_v"] = _block_v(vocab, params["block_v"])
    return params


def _transform_args(transform: LogitTransform):
    """Kernel arguments ``(softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)`` of ``transform``, the
    multiplier folded into softcap and temperature (:meth:`LogitTransform.folded`)."""
    softcap, temperature = transform.folded()
    has_softcap = softcap is not None
    has_temperature = float(temperature) != 1.0
    return (float(softcap) if has_softcap else 1.0, float(temperature), has_softcap, has_temperature)


def _check_logits_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, V] (2-D), got shape {tuple(x.shape)}")


def logits_forward(logits: Tensor, plan, transform: LogitTransform, options: KernelOptions) -> LogprobResult:
    """Per-sequence summed completion log-probs and the per-token LSE, from logits.

    Args:
        logits: ``[N, V]`` fp32/bf16/fp16 (float64 for tests), any row stride.
        plan: :class:`spo_kernels.layout.TokenPlan` over the N rows (its tensors on logits' device).
        transform: the :class:`LogitTransform` (multiplier, softcap, temperature).
        options: :class:`KernelOptions`; ``token_stats`` adds the per-token statistics.
    Returns:
        :class:`LogprobResult`: ``seq_logps [S] float64``, ``lse [Nc]`` fp32 (float64 for float64 logits),
        what :func:`logits_backward` needs; ``stats`` or None.
    """
    _check_logits_2d("logits", logits)
    acc_torch, acc_tl = _acc_dtypes(logits.dtype)
    num_rows, vocab = logits.shape
    if num_rows != plan.num_rows:
        raise ValueError(f"logits has {num_rows} rows, the token plan {plan.num_rows}")
    device = logits.device
    num_tokens, num_seqs = plan.num_tokens, plan.num_seqs
    lse = TH.empty((num_tokens,), acc_torch, device)
    token_logp = TH.empty((num_tokens,), acc_torch, device)
    seq_logps = TH.empty((num_seqs,), torch.float64, device)  # per-sequence sums in float64 (SPEC 7)
    want_stats = bool(options.token_stats)
    stats = TH.empty((4, num_tokens), acc_torch, device) if want_stats else None
    weights = plan.token_weights
    # The switches only when on: the launches without them are exactly the ones of before.
    extra_fwd = dict(stats_ptr=stats, num_tokens=num_tokens, STATS=True) if want_stats else {}
    extra_sum = dict(weights_ptr=weights.contiguous(), HAS_WEIGHTS=True) if weights is not None else {}
    softcap_v, temperature_v, has_softcap, has_temperature = _transform_args(transform)
    if num_tokens > 0:
        fwd = launch_params("logits_fwd", logits.dtype, vocab, device)
        if want_stats and logits.dtype == torch.float64:
            # Seven per-lane float64 vectors: 4096 lanes would spill (tests-only dtype).
            fwd["block_v"] = min(fwd["block_v"], 1024)
        with TH.device_guard(logits):
            _token_logprob_kernel[(num_tokens,)](
                logits, plan.token_idx, plan.targets, lse, token_logp,
                vocab, logits.stride(0), logits.stride(1), softcap_v, temperature_v,
                HAS_SOFTCAP=has_softcap, HAS_TEMPERATURE=has_temperature,
                UNIT_COL_STRIDE=logits.stride(1) == 1, ACC=acc_tl, BLOCK_V=fwd["block_v"],
                PREFETCH=bool(fwd["prefetch"]), num_warps=fwd["num_warps"], **extra_fwd,
            )
    if num_seqs > 0:
        with TH.device_guard(logits):
            _segment_sum_kernel[(num_seqs,)](
                token_logp, plan.seq_offsets, seq_logps, BLOCK_T=BLOCK_T, num_warps=4, **extra_sum,
            )
    return LogprobResult(seq_logps, lse, TokenStats(*stats.unbind(0)) if want_stats else None)


def logits_backward(logits: Tensor, plan, transform: LogitTransform, lse: Tensor, grad_seq: Tensor,
                    out: Tensor) -> None:
    """``out[r] = g_s * (onehot(y) - softmax(z)) * dz/dx`` for plan rows r, 0 for every other row.

    Args:
        logits: ``[N, V]`` as given to :func:`logits_forward` (unchanged since).
        lse: ``[Nc]`` from :func:`logits_forward`.  grad_seq: ``[S]`` ``dloss/dL_s``.
        out: ``[N, V]`` in logits' dtype, every element is written. It may be ``logits`` itself
            (in-place backward: each row is read before it is overwritten, by the same program).
    """
    _check_logits_2d("logits", logits)
    _check_logits_2d("out", out)
    acc_torch, acc_tl = _acc_dtypes(logits.dtype)
    if out.shape != logits.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    if num_rows != plan.num_rows:
        raise ValueError(f"logits has {num_rows} rows, the token plan {plan.num_rows}")
    if tuple(lse.shape) != (plan.num_tokens,) or tuple(grad_seq.shape) != (plan.num_seqs,):
        raise ValueError(f"lse must be [{plan.num_tokens}] and grad_seq [{plan.num_seqs}], got "
                         f"{tuple(lse.shape)} and {tuple(grad_seq.shape)}")
    if num_rows == 0:
        return
    device = logits.device
    # Row -> plan index map: O(N) int32 bookkeeping (N * 4 bytes against N * V * 2 written).
    row_token = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    if plan.num_tokens > 0:
        row_token[plan.token_idx] = torch.arange(plan.num_tokens, dtype=torch.int32, device=device)
    softcap_v, temperature_v, has_softcap, has_temperature = _transform_args(transform)
    bwd = launch_params("logits_bwd", logits.dtype, vocab, device)
    weights = plan.token_weights
    extra = dict(weights_ptr=weights.contiguous(), HAS_WEIGHTS=True) if weights is not None else {}
    with TH.device_guard(logits):
        _logits_backward_kernel[(num_rows,)](
            logits, out, row_token, plan.targets, plan.seq_id, lse.contiguous(), grad_seq.contiguous(),
            vocab, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
            softcap_v, temperature_v,
            HAS_SOFTCAP=has_softcap, HAS_TEMPERATURE=has_temperature,
            UNIT_COL_STRIDE=(logits.stride(1) == 1 and out.stride(1) == 1), ACC=acc_tl, BLOCK_V=bwd["block_v"],
            num_warps=bwd["num_warps"], **extra,
        )
