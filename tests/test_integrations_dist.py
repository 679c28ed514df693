"""``torchrun --nproc_per_node 2`` on gloo (CPU), as subprocesses with a timeout: the fused head under DDP
and FSDP2 (the LM head sharded with the root, and as its own unit) equals one process on the same global
batch (loss, every gradient, the parameters after a step), the ranks stay in sync; SPOTrainer under DDP
logs TRL's numbers. The scripts are in tests/dist/."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, timeout=180):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tests", "dist", script), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


MODES = ["ddp", "fsdp_root", "fsdp_head"]


@pytest.fixture(scope="module")
def parallel_checks():
    """The three modes in one launch (each on models of its own): ``{mode: what it found}``."""
    return _torchrun("check_parallel.py", ",".join(MODES))


@pytest.mark.parametrize("mode", MODES)
def test_parallel_equals_single_process(parallel_checks, mode):
    info = parallel_checks[mode]
    assert info["mode"] == mode
    assert info["world"] == 2 and info["ranks_in_sync"]
    assert info["loss_err"] < 1e-5 and info["grad_err"] < 1e-5 and info["param_err_after_step"] < 1e-5, info
    if mode == "ddp":
        assert info["anchor_err"] < 1e-5, info  # the one-step anchor's SFT step spans the global batch
    if mode == "fsdp_head":
        assert info["tp_head"] == "TypeError", info  # a tensor-parallel (DTensor) head raises
        # The FSDP2-sharded head passed to the public API outside its forward: a TypeError before any kernel.
        assert info["dtensor_outside_forward"] == "TypeError", info


def test_spo_trainer_under_ddp_logs_trls_numbers():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    info = _torchrun("check_trainer.py")
    assert info["spo_ranks_in_sync"] and info["steps"] == 3 and info["max_err"] <= 1e-5, info
