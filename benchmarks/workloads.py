"""Benchmark inputs: one preference batch per shape, drawn the same way in every process.

Workloads:
- ``linear``: hidden ``[2P, T, H]``, head ``W [V, H]``, a reference model's hidden and head; the first
  half of each sequence is prompt (label -100), the rest completion. Policy fwd+bwd + reference fwd.
- ``logits``: packed logits ``[N, V]`` of 2P sequences of N/2P tokens, half of each completion, and
  precomputed reference log-probs. Fwd+bwd.
Loss: DPO sigmoid, beta 0.1, summed log-probs (PEERS.md).

Distributions (``Shape.dist``):
- ``random``: logits about N(0, 1) (linear) or N(0, 4) (logits): a flat softmax, top probability ~1e-4
  at V = 128k.
- ``peaked``: every position gets a "top" token whose logit is raised by ``PEAK_LOGIT`` nats over the
  noise; for 75% of the completion tokens the top token is the label. The top probability then exceeds
  0.9 on nearly every token (the reference measures the share and records it), as in a trained model.
  Random inputs flatter methods that skip small gradient tiles (everything is near 1/V); peaked ones
  are what training sees.

Inputs are drawn on the benchmark's device from a seeded generator of that device, so every process
of one run sees the same values without a CPU-drawn copy (billions of elements at G1/G2), then rounded
to the shape's dtype. ``make_inputs`` is the only place inputs are made: methods, the float64 reference
and the tests all call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

BETA = 0.1  # the benchmarks' loss: DPO sigmoid on summed completion log-probs


def dpo_sigmoid(L, R, beta: float = BETA):
    """Mean over pairs of ``-logsigmoid(beta * ((L_w - R_w) - (L_l - R_l)))`` (TRL's sigmoid loss); ``L``,
    ``R`` are ``[2P]`` summed log-probs, chosen first."""
    P = L.shape[0] // 2
    D = (L[:P] - R[:P]) - (L[P:] - R[P:])
    return -torch.nn.functional.logsigmoid(beta * D).mean()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
DISTS = ("random", "peaked")
PEAK_LOGIT = {"linear": 16.0, "logits": 18.0}  # nats added to the top token's logit (see module docstring)
PEAK_LABEL_SHARE = 0.75


@dataclass(frozen=True)
class Shape:
    workload: str  # "linear" or "logits"
    P: int
    T: int
    V: int
    H: int = 0
    dtype: str = "fp32"
    completion: float = 0.5  # share of each sequence that is completion
    dist: str = "random"     # "random" | "peaked"

    def __post_init__(self):
        if self.workload not in ("linear", "logits"):
            raise ValueError(f"workload must be 'linear' or 'logits', got {self.workload!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.dist not in DISTS:
            raise ValueError(f"dist must be one of {DISTS}, got {self.dist!r}")
        if min(self.P, self.T, self.V) < 1 or (self.workload == "linear" and self.H < 1):
            raise ValueError(f"P, T, V (and H for linear) must be positive: {self}")

    @property
    def N(self) -> int:
        return 2 * self.P * self.T

    @property
    def prompt_len(self) -> int:
        return int(self.T * (1 - self.completion))

    @property
    def completion_tokens(self) -> int:
        return 2 * self.P * (self.T - self.prompt_len)

    @property
    def key(self) -> str:
        """A file-name-safe identifier of the inputs (the reference is cached under it)."""
        h = f"-H{self.H}" if self.workload == "linear" else ""
        return f"{self.workload}-P{self.P}-T{self.T}{h}-V{self.V}-{self.dtype}-c{self.completion:g}-{self.dist}"

    def describe(self) -> str:
        h = f" H={self.H}" if self.workload == "linear" else ""
        return (f"{self.workload}: P={self.P} T={self.T}{h} V={self.V} {self.dtype}, "
                f"completion {self.completion:.0%}, {self.dist}")

    def to_dict(self):
        return dict(asdict(self), N=self.N, completion_tokens=self.completion_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "Shape":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _both(shape: Shape):
    return [shape, replace(shape, dist="peaked")]


# Named by what they measure. The GPU harness calls the two GPU shapes G1 and G2 (benchmarks/README.md).
PRESETS = {
    # A few seconds on a CPU: the tests' smoke shape (odd sizes, both workloads).
    "tiny": [Shape("linear", P=1, T=16, H=32, V=101), Shape("logits", P=1, T=16, V=101)],
    # `make demo`-sized run on a CPU.
    "cpu-small": [Shape("linear", P=2, T=256, H=256, V=8192)],
    # The CPU comparison in benchmarks/results/RESULTS.md: fused-linear, 32k vocabulary, fp32.
    "cpu-linear-v32k": [Shape("linear", P=4, T=512, H=512, V=32000)],
    # G1: fused-linear at the Llama-3-8B head (H 4096, V 128256), 8 pairs x 2048 tokens, bf16.
    "llama3-8b-linear": _both(Shape("linear", P=8, T=2048, H=4096, V=128256, dtype="bf16")),
    # G2: the logits path at the same vocabulary, 32768 packed rows, bf16.
    "llama3-8b-logits": _both(Shape("logits", P=8, T=2048, V=128256, dtype="bf16")),
}
ALIASES = {"G1": "llama3-8b-linear", "G2": "llama3-8b-logits"}


def preset(name: str):
    """The shapes of a preset by name or alias (``G1``, ``G2``)."""
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}, aliases: "
                         f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())}")
    return PRESETS[name]


def make_inputs(shape: Shape, device, seed: int = 0, logits_out: torch.Tensor = None) -> dict:
    """Fresh random inputs (never zeros) in the shape's dtype, on ``device``.

    Returns a dict: ``labels`` and, for ``linear``, ``hidden [2P, T, H]``, ``weight [V, H]``,
    ``ref_hidden``, ``ref_weight``; for ``logits``, ``logits [N, V]`` (packed), ``labels [N]``,
    ``cu_seqlens [2P+1]`` int32 and ``ref_logps [2P]`` fp32. The same ``(shape, device, seed)`` gives the
    same values in every process (a seeded generator of that device). ``logits_out``: draw the logits
    into this ``[N, V]`` buffer instead of a new one (to restore them after an in-place backward).
    """
    device = torch.device(device)
    dt = DTYPES[shape.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    S, T, V = 2 * shape.P, shape.T, shape.V
    prompt = shape.prompt_len
    kw = dict(generator=g, device=device)
    labels = torch.randint(0, V, (S, T), **kw)
    labels[:, :prompt] = -100
    peaked = shape.dist == "peaked"
    if peaked:
        # The top token of each position: the label for PEAK_LABEL_SHARE of the completion tokens.
        top = torch.randint(0, V, (S, T), **kw)
        use_label = (torch.rand(S, T, **kw) < PEAK_LABEL_SHARE) & (labels != -100)
        top = torch.where(use_label, labels, top)
    out = {"labels": labels}
    if shape.workload == "linear":
        H = shape.H
        weight = torch.randn(V, H, **kw) / H ** 0.5
        hidden = torch.randn(S, T, H, **kw)
        if peaked:
            w_top = weight[top.reshape(-1)]
            hidden += (PEAK_LOGIT["linear"] * w_top / w_top.pow(2).sum(-1, keepdim=True)).view(S, T, H)
            del w_top
        ref_hidden = hidden + 0.1 * torch.randn(S, T, H, **kw)
        ref_weight = weight + 0.01 * torch.randn(V, H, **kw) / H ** 0.5
        out.update(hidden=hidden.to(dt), weight=weight.to(dt), ref_hidden=ref_hidden.to(dt),
                   ref_weight=ref_weight.to(dt))
    else:
        logits = logits_out if logits_out is not None else torch.empty(S * T, V, dtype=dt, device=device)
        rows = 4096  # draw in row blocks: no fp32 copy of [N, V]
        for r0 in range(0, S * T, rows):
            blk = torch.randn(min(rows, S * T - r0), V, **kw) * 2
            if peaked:
                blk[torch.arange(blk.shape[0], device=device), top.reshape(-1)[r0:r0 + blk.shape[0]]] += \
                    PEAK_LOGIT["logits"]
            logits[r0:r0 + blk.shape[0]] = blk.to(dt)
        out["logits"] = logits
        out["labels"] = labels.reshape(-1)
        out["cu_seqlens"] = torch.arange(0, S * T + 1, T, dtype=torch.int32, device=device)
        n_comp = T - prompt
        out["ref_logps"] = (-torch.rand(S, **kw) * 5 - n_comp * (0.3 if peaked else 12.0)).float()
    return out


def refill_logits(shape: Shape, device, logits: torch.Tensor, seed: int = 0) -> None:
    """Draw the logits of ``make_inputs(shape, device, seed)`` into ``logits`` again (after an in-place
    backward overwrote them with the gradient), without a second ``[N, V]`` buffer."""
    with torch.no_grad():
        make_inputs(shape, device, seed, logits_out=logits)
