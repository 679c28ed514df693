"""Run with ``torchrun --nproc_per_node 2 tests/dist/check_trainer.py`` (gloo, CPU): TRL's DPOTrainer and
SPOTrainer under DDP on the same tiny model and data. Every logged metric (gathered across ranks) must
agree within tests/trl_parity.py's relative error, and after training both ranks must hold the same
parameters. Prints one ``RESULT {json}`` line on rank 0; exits 1 on a mismatch."""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import trl_parity as tp  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dist_common import report_and_exit  # noqa: E402
from spo_kernels.integrations.trl import SPOConfig, SPOTrainer  # noqa: E402

TOL = 1e-5


def in_sync(model):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def main():
    import datasets
    datasets.disable_progress_bars()
    out = tempfile.mkdtemp(prefix="spo-dist-")
    kw = dict(per_device_train_batch_size=1, max_steps=3, ddp_backend="gloo")
    trl_logs, trl_trainer = tp.run(DPOTrainer, DPOConfig, out + "/trl", **kw)
    spo_logs, spo_trainer = tp.run(SPOTrainer, SPOConfig, out + "/spo", **kw)
    errs = tp.relative_errors(trl_logs, spo_logs)
    info = {"world": dist.get_world_size(), "max_err": max(errs.values()),
            "worst": max(errs, key=errs.get), "steps": len(spo_logs),
            "spo_ranks_in_sync": in_sync(spo_trainer.model), "trl_ranks_in_sync": in_sync(trl_trainer.model)}
    return info


if __name__ == "__main__":
    info = main()
    ok = info["max_err"] <= TOL and info["spo_ranks_in_sync"] and info["steps"] == 3
    report_and_exit(info, ok)
