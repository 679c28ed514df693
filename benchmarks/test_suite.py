"""pytest-benchmark suite: ``pytest benchmarks/test_suite.py`` (shape preset via ``$SPO_BENCH_PRESET``,
default ``cpu-small`` on CPU and ``G1`` on CUDA; any preset name or alias, comma-separated).

Times one full step (policy fwd+bwd + reference fwd for ``linear``; fwd+bwd for ``logits``) per
method in this process, so no memory figures here: ``python -m benchmarks`` measures memory with one
process per method.
"""

import os

import pytest
import torch

from benchmarks.methods import Unavailable, build
from benchmarks.worker import _restore
from benchmarks.workloads import preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = os.environ.get("SPO_BENCH_PRESET", "cpu-small" if DEVICE == "cpu" else "G1")
SHAPES = [s for name in PRESET.split(",") for s in preset(name)]
METHODS = {"linear": ["eager", "liger", "trl", "flce", "flce_chunked", "spo_torch", "spo"],
           "logits": ["eager", "spo_torch", "spo"]}
if DEVICE == "cuda":
    METHODS = {"linear": ["eager", "compile", "liger", "cce_exact", "cce", "trl", "flce", "flce_chunked", "spo_triton"],
               "logits": ["eager", "compile", "spo_triton"]}


@pytest.mark.parametrize("shape", SHAPES, ids=[s.describe().replace(" ", "_") for s in SHAPES])
@pytest.mark.parametrize("method", sorted({m for ms in METHODS.values() for m in ms}))
def test_step(benchmark, shape, method):
    if method not in METHODS[shape.workload]:
        pytest.skip(f"{method} is not a {shape.workload} method")
    from benchmarks.workloads import make_inputs
    inp = make_inputs(shape, DEVICE)
    try:
        step = build(method, shape.workload, inp, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))

    def setup():
        _restore(step, shape, DEVICE)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def run():
        out = step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
    assert torch.isfinite(out["loss"])
    benchmark.extra_info.update(shape=shape.to_dict(), device=DEVICE)
