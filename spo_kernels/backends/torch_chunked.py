"""The ``torch`` backend: chunked PyTorch over completion tokens only, any device.

Never holds more than one chunk of ``[rows, V]`` logits (about ``$SPO_KERNELS_CHUNK_MB`` MiB in fp32,
default 32), skips ignored tokens entirely, and uses the closed-form gradient
``g_s * (onehot(y) - softmax(z))`` instead of an autograd graph over the vocabulary. dW and db are
accumulated in fp32; with a 16-bit head every GEMM runs in fp32 on one upcast vocab block at a time.
The logit multiplier is folded into softcap and temperature (``LogitTransform.folded``); token weights
scale the float64 sums and the per-token ``g``; the per-token statistics (``options.token_stats``) come
from each chunk's own ``exp(z - max)``.
"""

from __future__ import annotations

import os

import torch

from .base import Backend, LinearGrads, LogitTransform, LogprobResult, TokenStats


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(vocab: int) -> int:
    budget = float(os.environ.get("SPO_KERNELS_CHUNK_MB", "32")) * 2**20
    return max(1, int(budget // (vocab * 4)))


def _transform(z: torch.Tensor, transform: LogitTransform):
    """Apply SPEC 2's transform in place; return ``dz_final/dz_raw`` (or None when it is 1). The multiplier
    is folded into softcap and temperature (:meth:`LogitTransform.folded`)."""
    softcap, temperature = transform.folded()
    chain = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        chain = 1 - z * z  # d/dz c*tanh(z/c) = 1 - tanh^2
        z.mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
        chain = (chain if chain is not None else torch.ones_like(z)).div_(temperature)
    return chain


def _lse_and_target(z: torch.Tensor, targets: torch.Tensor, want_stats: bool = False):
    """``(logsumexp(z), z[y], stats)`` per row, destroying z: ``lse = m + log(sum(exp(z - m)))`` in place, so
    no second ``[rows, V]`` temporary exists without statistics. ``stats`` (``want_stats``): the
    :class:`TokenStats` of the rows, from the same pass (one ``exp(z - m)`` temporary):
    ``H = log S - sum_v e_v log e_v / S`` with ``e = exp(z - m)``, ``S = sum e`` (relative to the max, so a
    peaked row keeps its small entropy exactly), ``log sum p^2 = log sum e^2 - 2 log S``."""
    target = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    if not want_stats:
        lse = z.sub_(m).exp_().sum(dim=1).log_().add_(m.squeeze(1))
        return lse, target, None
    mean_logit = z.mean(dim=1)
    # The first maximum, as torch.argmax and TRL's is_top1: a tie with an earlier token does not count.
    is_argmax = (z.argmax(dim=1) == targets).to(z.dtype)
    e = z.sub_(m).exp_()
    log_s = e.sum(dim=1).log_()
    # sum_v e_v (z_v - m) = sum_v e_v log e_v; xlogy keeps e = 0 (a -inf logit) at 0 instead of 0 * -inf.
    u = torch.special.xlogy(e, e).sum(dim=1)
    q = torch.einsum("ij,ij->i", e, e)
    stats = TokenStats(entropy=log_s - u / log_s.exp(), log_sum_p2=q.log() - 2 * log_s,
                       mean_logit=mean_logit, is_argmax=is_argmax)
    return log_s + m.squeeze(1), target, stats


def _grad_logits(z: torch.Tensor, targets, lse, g_tok, chain):
    """In place: ``z <- g * (onehot(y) - exp(z - lse)) * chain`` (z is the transformed fp32 tile)."""
    z.sub_(lse[:, None]).exp_().mul_(-g_tok[:, None])
    z[torch.arange(z.shape[0], device=z.device), targets] += g_tok
    if chain is not None:
        z.mul_(chain)
    return z


def _token_grads(grad_seq, plan, acc):
    """``g_s w_t`` per plan token (``w_t = 1`` without token weights), in ``acc``."""
    g_tok = grad_seq.to(acc)[plan.seq_id]
    if plan.token_weights is not None:
        g_tok = g_tok * plan.token_weights.to(acc)
    return g_tok


def _sequence_sums(logp, plan):
    """``L_s = sum_t w_t logp_t`` accumulated in float64: a sequence of 1k tokens summed in fp32 loses
    ~1e-7 relative, and a DPO loss is a function of differences of such sums (S values, free)."""
    logp = logp.to(torch.float64)
    if plan.token_weights is not None:
        logp = logp * plan.token_weights.to(torch.float64)
    sums = torch.zeros(plan.num_seqs, dtype=torch.float64, device=logp.device)
    return sums.index_add_(0, plan.seq_id, logp)


class _StatsBuffers:
    """``[Nc]`` buffers of the per-token statistics, filled chunk by chunk (or nothing when off)."""

    def __init__(self, num_tokens, dtype, device, on):
        self.stats = TokenStats(*(torch.empty(num_tokens, dtype=dtype, device=device) for _ in range(4))) \
            if on else None

    def put(self, start, end, chunk_stats):
        if self.stats is not None:
            for buf, val in zip(self.stats, chunk_stats):
                buf[start:end] = val


def _vocab_blocks(weight, block_bytes=16 * 2**20):
    """Row ranges of the head whose fp32 copy takes at most ``block_bytes``."""
    V, H = weight.shape
    step = max(1, block_bytes // (4 * H))
    return [(a, min(a + step, V)) for a in range(0, V, step)]


def _chunks(plan, vocab):
    step = _chunk_rows(vocab)
    for start in range(0, plan.num_tokens, step):
        end = min(start + step, plan.num_tokens)
        yield start, end, plan.token_idx[start:end], plan.targets[start:end]


class TorchChunkedBackend(Backend):
    name = "torch"

    # ---- logits path -------------------------------------------------------------------------
    def logits_forward(self, logits, plan, transform, options):
        acc = _acc_dtype(logits.dtype)
        lse = torch.empty(plan.num_tokens, dtype=acc, device=logits.device)
        logp = torch.empty_like(lse)
        stats = _StatsBuffers(plan.num_tokens, acc, logits.device, options.token_stats)
        for start, end, rows, tgt in _chunks(plan, logits.shape[1]):
            z = logits.index_select(0, rows).to(acc)
            _transform(z, transform)
            lse[start:end], target, chunk_stats = _lse_and_target(z, tgt, options.token_stats)
            logp[start:end] = target - lse[start:end]
            stats.put(start, end, chunk_stats)
        return LogprobResult(_sequence_sums(logp, plan), lse, stats.stats)

    def logits_backward(self, logits, plan, transform, lse, grad_seq, out):
        acc = _acc_dtype(logits.dtype)
        g_tok = _token_grads(grad_seq, plan, acc)
        # Rows outside the plan get 0. Plan rows are read before being overwritten, chunk by chunk,
        # so ``out`` may alias ``logits``.
        keep = torch.ones(plan.num_rows, dtype=torch.bool, device=logits.device)
        keep[plan.token_idx] = False
        out[keep] = 0
        for start, end, rows, tgt in _chunks(plan, logits.shape[1]):
            z = logits.index_select(0, rows).to(acc)
            chain = _transform(z, transform)
            _grad_logits(z, tgt, lse[start:end], g_tok[start:end], chain)
            out.index_copy_(0, rows, z.to(out.dtype))

    # ---- fused-linear path -------------------------------------------------------------------
    @staticmethod
    def _logits_tile(h, weight, bias, acc):
        """``[rows, V]`` logits in ``acc`` precision. A 16-bit head is upcast one vocab block at a time:
        a 16-bit GEMM would round the logits themselves to 16 bits (loss errors of ~1e-2 against the
        float64 reference at V=32k), and a whole fp32 copy of the head would double its memory."""
        if weight.dtype == acc:
            z = h @ weight.t()
        else:
            h = h.to(acc)
            z = torch.empty(h.shape[0], weight.shape[0], dtype=acc, device=h.device)
            for a, b in _vocab_blocks(weight):
                torch.mm(h, weight[a:b].to(acc).t(), out=z[:, a:b])
        if bias is not None:
            z += bias.to(acc)
        return z

    def linear_forward(self, hidden, weight, bias, plan, transform, options, save_lse):
        acc = _acc_dtype(hidden.dtype)
        lse = torch.empty(plan.num_tokens, dtype=acc, device=hidden.device)
        logp = torch.empty_like(lse)
        stats = _StatsBuffers(plan.num_tokens, acc, hidden.device, options.token_stats)
        for start, end, rows, tgt in _chunks(plan, weight.shape[0]):
            z = self._logits_tile(hidden.index_select(0, rows), weight, bias, acc)
            _transform(z, transform)
            lse[start:end], target, chunk_stats = _lse_and_target(z, tgt, options.token_stats)
            logp[start:end] = target - lse[start:end]
            stats.put(start, end, chunk_stats)
        return LogprobResult(_sequence_sums(logp, plan), lse if save_lse else None, stats.stats)

    def linear_backward(self, hidden, weight, bias, plan, transform, options, lse, grad_seq,
                        need_hidden, need_weight, need_bias, extra=None):
        # Always deterministic (fixed chunk order, no atomics) and exact (no filter).
        acc = _acc_dtype(hidden.dtype)
        g_tok = _token_grads(grad_seq, plan, acc)
        dh = torch.zeros_like(hidden) if need_hidden else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        for start, end, rows, tgt in _chunks(plan, weight.shape[0]):
            h = hidden.index_select(0, rows)
            z = self._logits_tile(h, weight, bias, acc)
            chain = _transform(z, transform)
            dz = _grad_logits(z, tgt, lse[start:end], g_tok[start:end], chain)
            h = h.to(acc)
            if weight.dtype == acc:
                if dh is not None:
                    dh.index_copy_(0, rows, (dz @ weight).to(dh.dtype))
                if dw is not None:
                    dw.addmm_(dz.t(), h)
            else:  # 16-bit head: fp32 GEMMs over vocab blocks, as in the forward
                dh_rows = torch.zeros(h.shape, dtype=acc, device=h.device) if dh is not None else None
                for a, b in _vocab_blocks(weight):
                    if dh_rows is not None:
                        dh_rows.addmm_(dz[:, a:b], weight[a:b].to(acc))
                    if dw is not None:
                        dw[a:b].addmm_(dz[:, a:b].t(), h)
                if dh is not None:
                    dh.index_copy_(0, rows, dh_rows.to(dh.dtype))
            if db is not None:
                db += dz.sum(0)
        return LinearGrads(
            hidden=dh,
            weight=None if dw is None else dw.to(weight.dtype),
            bias=None if db is None else db.to(bias.dtype),
        )
