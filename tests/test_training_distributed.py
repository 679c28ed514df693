"""The trainer under ``torchrun`` on gloo (CPU, 2 processes): DDP (on packed batches) and FSDP2 runs equal a
single-process run on the same global batch, and a run killed mid-way resumes bit for bit on the same world
size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from training import TrainConfig, train  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import write_preference_jsonl  # noqa: E402
from training.distributed import Runtime  # noqa: E402
from training.modeling import load_model  # noqa: E402
from training.task import make_pairs, make_problems  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
# Flags of every run here: 4 steps of 8 pairs (2 ranks x 2 micro-batches x 2 pairs), DPO+SPO.
RUN = dict(max_steps=4, batch_size=8, grad_accum=2, lr=1e-3, beta=0.5, spo_lambda=1.0, max_grad_norm=0.5,
           warmup_steps=1, lr_schedule="linear", save_every=2, builtin_hidden_size=32, builtin_layers=2,
           builtin_heads=2, num_threads=1, progress=False, plot=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_preference_jsonl(str(path), make_pairs(make_problems(24, seed=3), seed=4))
    return str(path)


def _flags(cfg: dict) -> list:
    out = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def torchrun(args: list, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N <args>`` from the repository root, on the CPU (gloo)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_under_torchrun(data_file, out_dir, dist, extra=()) -> subprocess.CompletedProcess:
    return torchrun(["-m", "training", "train", "--data", data_file, "--out-dir", str(out_dir), "--dist", dist,
                     "--device", "cpu"] + _flags(RUN) + list(extra))


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return train(TrainConfig(data=data_file, out_dir=str(out), **RUN))


@pytest.fixture(scope="module")
def fsdp2_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = train_under_torchrun(data_file, out, "fsdp2")
    return out, proc


@pytest.mark.parametrize("dist", ["ddp", "fsdp2"])
def test_two_processes_equal_one_on_the_same_global_batch(data_file, tmp_path, single_run, fsdp2_run, dist):
    if dist == "fsdp2":
        out, proc = fsdp2_run
    else:
        # DDP on packed batches (each rank packs its own micro-batches): the same run again.
        out = tmp_path / "ddp"
        proc = train_under_torchrun(data_file, out, dist, ["--packed"])
    # Rank 0 alone writes: one summary line, one metrics line per step.
    assert proc.stdout.count("[train] finished") == 1, proc.stdout
    assert "2 process(es)" in proc.stdout
    one, two = metrics(single_run.out_dir), metrics(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                    "spo/penalty", "spo/active_fraction", "nll", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # The final model, gathered from the shards under FSDP2, is the single process's. AdamW's first
    # updates are ~sign(grad) * lr, so a weight whose gradient is ~0 (a rare token's embedding row) may
    # land a fraction of an update (lr 1e-3) away: nearly every weight agrees to 2e-5, none is off by
    # more than one update.
    final = load_model(os.path.join(out, "final"))
    for name, p in single_run.model.state_dict().items():
        diff = (final.state_dict()[name] - p).abs()
        assert float(diff.max()) < 1e-3 and int((diff > 2e-5).sum()) <= max(1, p.numel() // 1000), name
    assert os.path.exists(os.path.join(out, "final", "char_tokenizer.json"))
    if dist == "fsdp2":
        names = os.listdir(os.path.join(out, "checkpoint"))
        assert "state.pt" in names and [n for n in names if n.startswith("dcp-step")] == ["dcp-step4"]


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from training import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))

    def kill_at_step_3(step, record, model):
        # A hard kill of rank 0 after step 3 was logged (the checkpoint of step 2 is the last one): torchrun
        # then takes the other rank down. metrics.jsonl is left with a line past the checkpoint.
        if step == 3 and int(os.environ["RANK"]) == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, on_step_end=kill_at_step_3)
""")


def test_killed_fsdp2_run_resumes_bit_for_bit(data_file, tmp_path, fsdp2_run):
    straight, _ = fsdp2_run
    out = tmp_path / "killed"
    script = tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT)
    cfg = dict(RUN, data=data_file, out_dir=str(out), dist="fsdp2", device="cpu")
    proc = torchrun([str(script), json.dumps(cfg)], check=False)
    assert proc.returncode != 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 0.69')  # and a line torn by the kill
    resumed = train_under_torchrun(data_file, out, "fsdp2", ["--resume"])
    assert "skipped 1 unreadable line(s)" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(straight))
    a, b = load_model(os.path.join(straight, "final")), load_model(os.path.join(out, "final"))
    for name, p in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], p), name


def test_fsdp2_checkpoint_refuses_another_world_size(data_file, fsdp2_run):
    """The FSDP2 run's checkpoint (2 processes) resumed by 1 process: refused, saying why, before any shard is
    read (in this process: the check comes before anything distributed)."""
    out, _ = fsdp2_run
    cfg = TrainConfig(**dict(RUN, data=data_file, out_dir=str(out), dist="fsdp2", device="cpu"))
    one = Runtime(mode="fsdp2", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"dist='fsdp2' on 2 process\(es\); this run is dist='fsdp2' on 1 .*same world size"):
        load_checkpoint(cfg, one, None, None, None, None)
