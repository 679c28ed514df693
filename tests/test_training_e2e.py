"""The GPU harness's end-to-end step (``python3 -m benchmarks.gpu e2e``): its CPU dry run through the same
code (a tiny Qwen2, every method in its own process, the report), its resume, and the longest-sequence
search on a known threshold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from benchmarks import runner  # noqa: E402
from benchmarks.gpu.e2e import search_longest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("threshold, start, limit, granularity", [
    (1000, 64, 4096, 16), (5000, 512, 131072, 512), (64, 64, 4096, 16), (10**9, 16, 100, 8),
])
def test_longest_sequence_search_finds_the_threshold(threshold, start, limit, granularity):
    probes = []

    def fits(T):
        probes.append(T)
        return T <= threshold

    found = search_longest(fits, start, limit, granularity)
    assert found["status"] == "ok"
    if threshold >= limit:
        assert found["longest_T"] == limit and found["capped_at_search_max"]
    else:
        assert threshold - granularity < found["longest_T"] <= threshold
        assert found["first_failing_T"] > threshold and not found["capped_at_search_max"]
    assert all(fits(T) for T in [found["longest_T"]] if T)
    assert len(probes) <= 2 * (limit // start).bit_length() + 2 * (limit // granularity).bit_length()


def test_longest_sequence_search_says_when_cut_short():
    found = search_longest(lambda T: T <= 1000, 64, 4096, 16, deadline=time.monotonic() - 1)
    assert found["status"] == "incomplete" and found["longest_T"] == 0


def _e2e(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "e2e", "--dry-run", "--out-dir", str(out),
                           "--repeats", "1"] + list(extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_e2e_dry_run_measures_every_method_and_resumes(tmp_path):
    out = tmp_path / "out"
    proc = _e2e(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = runner.read_lines(str(out / "E2E-dry.jsonl"))
    by = {(r["method"], r["kind"]): r for r in lines if r.get("kind") in ("e2e", "e2e_longest")}
    losses = {}
    for method in ("spo", "trl", "eager"):
        e, lg = by[(method, "e2e")], by[(method, "e2e_longest")]
        assert e["status"] == "ok", e
        assert e["tokens_per_s"] > 0 and e["time_s_median"] > 0 and e["peak_extra_bytes"] >= 0
        assert e["tokens_per_step"] == 2 * 1 * 24
        losses[method] = e["first_loss"]
        assert lg["status"] == "ok" and lg["longest_T"] >= 16 and lg["probes"], lg
    # Same model and inputs, policy and reference different: every method's loss is the same, and not log 2.
    assert abs(losses["eager"] - 0.6931) > 1e-3
    for method in ("spo", "trl"):
        assert losses[method] == pytest.approx(losses["eager"], rel=1e-4), method
    summary = json.loads((out / "E2E-dry.json").read_text())["summary"]
    assert summary["loss_agrees"] == {"spo": True, "trl": True, "eager": True}
    md = (out / "E2E-dry.md").read_text()
    for method in ("spo", "trl", "eager"):
        assert f"| {method} | ok |" in md
    assert "goal: tokens/s: spo / trl" in md and "goal: longest sequence" in md

    # --resume: nothing left to measure, no worker starts, the report is drawn again.
    count = len(lines)
    again = _e2e(out, "--resume")
    assert again.returncode == 0
    assert len(runner.read_lines(str(out / "E2E-dry.jsonl"))) == count + 1  # its environment line only
    assert "spo: throughput" not in again.stdout


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_e2e_methods_compute_the_same_step(gradient_checkpointing):
    """The three methods of the e2e step on the same tiny model and batch: the same loss and the same
    gradient of every policy weight (a float64 model; eager upcasts its logits to fp32, hence fp32
    tolerances: loss rel 1e-6, gradients rel (norm) 1e-5)."""
    import dataclasses

    import torch

    from benchmarks.gpu.e2e import E2EPlan, build_models, make_batch, make_step
    plan = dataclasses.replace(E2EPlan.dry(), gradient_checkpointing=gradient_checkpointing)
    device = torch.device("cpu")
    results = {}
    for method in ("eager", "spo", "trl"):
        policy, reference = build_models(plan, device)
        checkpointing = getattr(type(policy), "is_activation_checkpointing", None)  # transformers >= 5.2x
        flag = policy.is_activation_checkpointing if checkpointing is not None else policy.is_gradient_checkpointing
        assert flag == gradient_checkpointing
        policy.double()
        reference.double()
        ids, mask, labels = make_batch(plan, 2, 20, device)
        try:
            loss = make_step(method, policy, reference, labels)(ids, mask)
        except Exception as err:  # noqa: BLE001
            from benchmarks.methods import Unavailable
            if isinstance(err, Unavailable):
                pytest.skip(f"{method}: {err}")
            raise
        results[method] = (float(loss), {n: p.grad.clone() for n, p in policy.named_parameters()})
    loss, grads = results["eager"]
    assert abs(loss - 0.6931) > 1e-3  # policy and reference differ
    for method in ("spo", "trl"):
        assert results[method][0] == pytest.approx(loss, rel=1e-6), method
        for name, g in grads.items():
            assert g.abs().sum() > 0, name
            assert float((results[method][1][name] - g).norm() / g.norm()) <= 1e-5, f"{method}: {name}"
