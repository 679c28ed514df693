"""The benchmark's peer adapters (benchmarks/methods.py), on CPU, against an independent float64 DPO loss.

Each adapter must compute the same loss (DPO sigmoid, beta 0.1, summed completion log-probs, reference
under no_grad) and the same gradients as a plain float64 autograd computation written here. A peer
whose package is missing is skipped with the adapter's own reason.
"""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.methods import Unavailable, _trl_logps, build
from benchmarks.workloads import Shape, make_inputs

SHAPE = Shape("linear", P=1, T=16, H=32, V=101)
# A second shape: several pairs, hidden size and vocabulary not multiples of anything, 75% completion.
SHAPE2 = Shape("linear", P=3, T=24, H=48, V=257, completion=0.75)
CPU_PEERS = ["eager", "liger", "trl", "flce", "flce_chunked", "spo_torch", "spo_cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _float64_dpo(inp):
    """Loss and (hidden, weight) gradients in float64: full logits, log_softmax, gather, mask, sum."""
    h = inp["hidden"].double().requires_grad_(True)
    W = inp["weight"].double().requires_grad_(True)
    labels = inp["labels"]
    mask = labels != -100
    safe = labels.clamp(min=0).unsqueeze(-1)

    def seq_logps(x, w):
        logp = torch.log_softmax(torch.einsum("sth,vh->stv", x, w), dim=-1)
        return torch.where(mask, logp.gather(-1, safe).squeeze(-1), 0.0).sum(dim=1)

    L = seq_logps(h, W)
    R = seq_logps(inp["ref_hidden"].double(), inp["ref_weight"].double()).detach()
    P = L.shape[0] // 2
    margin = (L[:P] - R[:P]) - (L[P:] - R[P:])
    loss = torch.nn.functional.softplus(-0.1 * margin).mean()  # -log sigmoid(beta * margin)
    loss.backward()
    return loss.detach(), h.grad, W.grad


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(res, want):
    loss, gh, gW = want
    assert abs(float(res["loss"].detach()) - float(loss)) / abs(float(loss)) <= 1e-5
    assert _rel(res["grads"]["hidden"], gh) <= 1e-4
    assert _rel(res["grads"]["weight"], gW) <= 1e-4


@pytest.mark.parametrize("shape", [SHAPE, SHAPE2], ids=["tiny", "odd"])
@pytest.mark.parametrize("method", CPU_PEERS)
def test_peer_matches_float64(method, shape):
    inp = make_inputs(shape, "cpu")
    want = _float64_dpo(inp)
    try:
        step = build(method, "linear", inp, "cpu")
    except Unavailable as e:
        pytest.skip(f"{method}: {e}")
    h, W = step.leaves
    assert h.grad is None and W.grad is None
    _check(step(), want)
    # A second step (after the caller's reset) gives the same result: no state kept between steps.
    for leaf in step.leaves:
        leaf.grad = None
    _check(step(), want)


@pytest.mark.parametrize("compact", [True, False], ids=["triton-layout", "cpu-layout"])
def test_trl_both_layouts(compact):
    """TRL scores only completion positions on Triton devices and every position elsewhere: both layouts of the
    adapter (the GPU one forced here on CPU) give the float64 loss and gradients."""
    pytest.importorskip("trl")
    inp = make_inputs(SHAPE2, "cpu")
    want = _float64_dpo(inp)
    try:
        policy, reference = _trl_logps(inp["labels"], compact=compact)
    except Unavailable as e:
        pytest.skip(str(e))
    h = inp["hidden"].detach().requires_grad_(True)
    W = inp["weight"].detach().requires_grad_(True)
    L = policy(h, W)
    with torch.no_grad():
        R = reference(inp["ref_hidden"], inp["ref_weight"])
    P = SHAPE2.P
    loss = torch.nn.functional.softplus(-0.1 * ((L[:P] - R[:P]) - (L[P:] - R[P:]))).mean()
    loss.backward()
    _check({"loss": loss, "grads": {"hidden": h.grad, "weight": W.grad}}, want)


@pytest.mark.parametrize("method", ["cce", "cce_exact"])
def test_cuda_only_peers_say_why(method):
    with pytest.raises(Unavailable, match="CUDA"):
        build(method, "linear", make_inputs(SHAPE, "cpu"), "cpu")


@pytest.mark.parametrize("method", ["trl", "flce", "flce_chunked", "liger"])
def test_linear_only_peers_on_logits_workload(method):
    with pytest.raises(Unavailable, match="no logits-path form"):
        build(method, "logits", make_inputs(Shape("logits", P=1, T=16, V=101), "cpu"), "cpu")


@pytest.mark.parametrize("method", ["flce", "flce_chunked"])
def test_flce_needs_torch_2_13(method, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(Unavailable, match=r"torch >= 2\.13; this is torch 2\.11\.0"):
        build(method, "linear", make_inputs(SHAPE, "cpu"), "cpu")


def _run_without(module, method):
    """Build ``method`` in a fresh interpreter where ``module`` cannot be imported; returns its output."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from benchmarks.methods import Unavailable, build\n"
            "from benchmarks.workloads import Shape, make_inputs\n"
            "try:\n"
            f"    build({method!r}, 'linear', make_inputs(Shape('linear', P=1, T=16, H=32, V=101), 'cpu'), 'cpu')\n"
            "    print('BUILT')\n"
            "except Unavailable as e:\n"
            "    print('UNAVAILABLE', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_missing_peer_packages_say_why():
    """The GPU image has neither trl nor datasets: the trl peer is unavailable with a reason, not an error in the
    middle of its backward (TRL's kernel backward imports trl.trainer.utils, which imports datasets)."""
    pytest.importorskip("trl")
    out = _run_without("datasets", "trl")
    assert out.startswith("UNAVAILABLE") and "datasets" in out, out
    out = _run_without("trl", "trl")
    assert out.startswith("UNAVAILABLE") and "trl not installed" in out, out
    out = _run_without("liger_kernel", "liger")
    assert out.startswith("UNAVAILABLE") and "liger-kernel not installed" in out, out
