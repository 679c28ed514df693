"""Run-folder files: checkpoints (one file, or torch.distributed.checkpoint shards under FSDP2) and the
metrics log, both written so that a killed run leaves something ``--resume`` can continue from.

Layout of ``<out_dir>/checkpoint/``:
    state.pt        the step, data position, config, scheduler, RNG states; with one process or DDP also the
                    model and optimizer. Written last, by rank 0, then renamed into place: it is the commit
                    record, so a run killed while writing resumes from the previous checkpoint.
    dcp-step<N>/    FSDP2 only: model and optimizer shards of step N (torch.distributed.checkpoint), named
                    by state.pt; older ones are removed once state.pt points past them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import numpy as np
import torch

from .config import RESUME_FREE_FIELDS, TrainConfig
from .distributed import Runtime

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
# What makes a folder a run folder (refused as a new run's out_dir unless --resume or --overwrite).
RUN_MARKERS = (METRICS_FILE, CHECKPOINT_DIR, FINAL_DIR, "config.json")


def prepare_run_folder(cfg: TrainConfig, resume: bool, runtime: Runtime) -> None:
    """A new run refuses a folder that holds another run, unless ``overwrite`` (then its checkpoint and
    final model are removed: a stale checkpoint must never be resumed by mistake)."""
    found = [m for m in RUN_MARKERS if os.path.exists(os.path.join(cfg.out_dir, m))]
    # Every rank takes the same decision (an error on some ranks only would leave the others waiting).
    if not runtime.broadcast_flag(bool(found) and not resume):
        return
    if not cfg.overwrite:
        raise FileExistsError(f"out_dir {cfg.out_dir} holds a run already ({', '.join(found) or 'on another rank'}): "
                              f"pass --resume to continue it or --overwrite to start over in it")
    runtime.barrier()  # every rank has looked before rank 0 removes anything
    if runtime.is_main:
        for name in (CHECKPOINT_DIR, FINAL_DIR):
            shutil.rmtree(os.path.join(cfg.out_dir, name), ignore_errors=True)
    runtime.barrier()


def save_checkpoint(cfg: TrainConfig, runtime: Runtime, step: int, data_position: dict, policy, hf_model,
                    optimizer, scheduler) -> str:
    directory = os.path.join(cfg.out_dir, CHECKPOINT_DIR)
    if runtime.is_main:
        os.makedirs(directory, exist_ok=True)
    runtime.barrier()
    state = {
        "step": step,
        "data_position": data_position,
        "config": cfg.to_dict(),
        "dist": runtime.mode,
        "world_size": runtime.world_size,
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    if runtime.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(policy, optimizer)
        shards = f"dcp-step{step}"
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(directory, shards))
        state["dcp"] = shards
        runtime.barrier()  # every rank's shards are on disk before state.pt points at them
    else:
        state["model"] = hf_model.state_dict()
        state["optimizer"] = optimizer.state_dict()
    path = os.path.join(directory, CHECKPOINT_FILE)
    if runtime.is_main:
        # Write then rename: a kill during the write leaves the previous checkpoint intact.
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        for name in os.listdir(directory):
            if name.startswith("dcp-step") and name != state.get("dcp"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    runtime.barrier()
    return path


def load_checkpoint(cfg: TrainConfig, runtime: Runtime, policy, hf_model, optimizer, scheduler) -> int:
    path = os.path.join(cfg.out_dir, CHECKPOINT_DIR, CHECKPOINT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    # The trainer's own file; it holds RNG states (tuples, numpy arrays), hence weights_only=False.
    state = torch.load(path, weights_only=False, map_location="cpu")
    saved, now = state["config"], cfg.to_dict()
    # A field the checkpoint predates counts as its default (checkpoints of older versions resume).
    defaults = TrainConfig().to_dict()
    changed = sorted(k for k in now if k not in RESUME_FREE_FIELDS and saved.get(k, defaults[k]) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume with a different configuration than the checkpoint's ({diff})")
    saved_mode, saved_world = state.get("dist", "none"), state.get("world_size", 1)
    if saved_mode != runtime.mode or (runtime.mode == "fsdp2" and saved_world != runtime.world_size):
        raise ValueError(f"--resume: the checkpoint was written by dist={saved_mode!r} on {saved_world} process(es); "
                         f"this run is dist={runtime.mode!r} on {runtime.world_size} (FSDP2 shards resume on the "
                         f"same world size)")
    if runtime.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(policy, optimizer)
        shards = os.path.join(cfg.out_dir, CHECKPOINT_DIR, state["dcp"])
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=shards)
        set_state_dict(policy, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    else:
        hf_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------

def parse_metrics_lines(path: str):
    """``(records, bad_lines)``: the parsed records, and the 1-based numbers of lines that are not a JSON
    object with a "step" (a line torn by a kill mid-write is the usual one: the last)."""
    records, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(lineno)
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            else:
                bad.append(lineno)
    return records, bad


def keep_metrics_up_to(path: str, step: int) -> None:
    """After a resume, keep the logged steps up to the checkpoint's (the rest will be logged again) and
    drop lines a kill tore (with a message): the log then matches the checkpoint exactly."""
    if not os.path.exists(path):
        return
    records, bad = parse_metrics_lines(path)
    if bad:
        print(f"[train] {path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad))}; "
              f"a run killed mid-write); resuming from the checkpoint of step {step}", file=sys.stderr)
    kept = [r for r in records if r["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def read_metrics(path: str):
    return parse_metrics_lines(path)[0]
