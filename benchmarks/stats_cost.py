"""The cost of the per-token statistics (SPEC 8): forward time with ``token_stats`` on and off, side by side.

    python -m benchmarks.stats_cost [--backends torch,cpu] [--tokens 1024] [--hidden 1024] [--vocab 32000]
                                    [--repeats 9] [--device cpu]

For each backend and path (logits, fused linear) it times the no-grad forward (``sequence_logprobs`` /
``fused_linear_sequence_logprobs``) with ``token_stats=False`` and ``True``, alternating the two so that
machine load hits both alike, and prints the medians and their ratio as a markdown table. The statistics
are computed in the forward's log-sum-exp pass; the backward is the same with them on or off. On a GPU
pass ``--device cuda --backends triton,torch`` (timings synchronize the device).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import spo_kernels as sk


def _inputs(tokens: int, hidden: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(device)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    cu = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32, device=device)
    return h, w, labels, cu


def _timer(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(backend: str, path: str, tokens: int, hidden: int, vocab: int, repeats: int, device: str) -> dict:
    """Median seconds of the forward with statistics off and on (alternating runs, one warm-up each)."""
    h, w, labels, cu = _inputs(tokens, hidden, vocab, device)
    logits = h @ w.t() if path == "logits" else None

    def run(stats: bool):
        with torch.no_grad():
            if path == "logits":
                out = sk.sequence_logprobs(logits, labels, cu_seqlens=cu, token_stats=stats, backend=backend)
            else:
                out = sk.fused_linear_sequence_logprobs(h, w, labels, cu_seqlens=cu, token_stats=stats,
                                                        backend=backend)
        assert (out.stats is not None) == stats  # the statistics were computed exactly when asked
        return out

    run(False), run(True)
    off, on = [], []
    for _ in range(repeats):
        off.append(_timer(lambda: run(False), device))
        on.append(_timer(lambda: run(True), device))
    t_off, t_on = statistics.median(off), statistics.median(on)
    return {"backend": backend, "path": path, "off_ms": 1e3 * t_off, "on_ms": 1e3 * t_on, "ratio": t_on / t_off}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torch,cpu")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    print(f"forward, fp32, N={args.tokens} completion tokens, H={args.hidden}, V={args.vocab}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| backend | path | stats off (ms) | stats on (ms) | on / off |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for path in ("fused_linear", "logits"):
            r = measure(backend, path, args.tokens, args.hidden, args.vocab, args.repeats, args.device)
            print(f"| {r['backend']} | {r['path']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {r['ratio']:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
