"""Benchmark inputs: one preference batch per shape, built the same way in every process.

Workloads:
- ``linear``: hidden ``[2P, T, H]``, head ``W [V, H]``, a reference model's hidden and head; the first
  half of each sequence is prompt (label -100), the rest completion. Policy fwd+bwd + reference fwd.
- ``logits``: packed logits ``[N, V]`` of 2P sequences of N/2P tokens, half of each completion, and
  precomputed reference log-probs. Fwd+bwd.
Loss: DPO sigmoid, beta 0.1, summed log-probs (PEERS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Shape:
    workload: str  # "linear" or "logits"
    P: int
    T: int
    V: int
    H: int = 0
    dtype: str = "fp32"
    completion: float = 0.5  # share of each sequence that is completion

    @property
    def N(self) -> int:
        return 2 * self.P * self.T

    @property
    def completion_tokens(self) -> int:
        return 2 * self.P * (self.T - int(self.T * (1 - self.completion)))

    def describe(self) -> str:
        h = f" H={self.H}" if self.workload == "linear" else ""
        return f"{self.workload}: P={self.P} T={self.T}{h} V={self.V} {self.dtype}, completion {self.completion:.0%}"

    def to_dict(self):
        return dict(asdict(self), N=self.N, completion_tokens=self.completion_tokens)


PRESETS = {
    # `make demo`-sized smoke run on a CPU.
    "cpu-small": [Shape("linear", P=2, T=256, H=256, V=8192)],
    # Issue 2's acceptance shape.
    "cpu-issue2": [Shape("linear", P=4, T=512, H=512, V=32000)],
    # GPU shapes: G1 (Llama-3-8B head) and G2 (logits path).
    "G1": [Shape("linear", P=8, T=2048, H=4096, V=128256, dtype="bf16")],
    "G2": [Shape("logits", P=8, T=2048, V=128256, dtype="bf16")],
    "tiny": [Shape("linear", P=1, T=16, H=32, V=101), Shape("logits", P=1, T=16, V=101)],
}


def make_inputs(shape: Shape, device: str, dtype: torch.dtype = None, seed: int = 0) -> dict:
    """Fresh random inputs (never zeros), generated on the CPU from ``seed`` so every process and device
    sees the same values, rounded to the shape's dtype, then cast to ``dtype`` (default: the shape's;
    float64 for the reference) and moved to ``device``."""
    dtype = dtype or DTYPES[shape.dtype]
    g = torch.Generator().manual_seed(seed)
    S, T = 2 * shape.P, shape.T
    prompt = int(T * (1 - shape.completion))
    labels = torch.randint(0, shape.V, (S, T), generator=g)
    labels[:, :prompt] = -100
    out = {"labels": labels}
    if shape.workload == "linear":
        H = shape.H
        out["hidden"] = torch.randn(S, T, H, generator=g)
        out["weight"] = torch.randn(shape.V, H, generator=g) / H ** 0.5
        out["ref_hidden"] = out["hidden"] + 0.1 * torch.randn(S, T, H, generator=g)
        out["ref_weight"] = out["weight"] + 0.01 * torch.randn(shape.V, H, generator=g) / H ** 0.5
    else:
        out["logits"] = torch.randn(S * T, shape.V, generator=g) * 2
        out["labels"] = labels.reshape(-1)
        out["cu_seqlens"] = torch.arange(0, S * T + 1, T, dtype=torch.int32)
        out["ref_logps"] = -torch.rand(S, generator=g, dtype=torch.float32) * 5 - (T - prompt) * 3
    # Round to the shape's dtype first: a float64 reference must see exactly the values the methods see.
    base = DTYPES[shape.dtype]
    return {k: (v.to(base).to(dtype) if v.is_floating_point() and k != "ref_logps" else v).to(device)
            for k, v in out.items()}
