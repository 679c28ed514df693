"""What the torchrun scripts of this folder share: how a rank reports its result and exits."""

import json
import os
import sys

import torch.distributed as dist


def report_and_exit(info: dict, ok: bool) -> None:
    """Rank 0 prints ``RESULT <json>`` (what tests/test_integrations_dist.py reads); every rank exits with 0
    when ``ok``, else 1."""
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(info), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's background threads can abort the process while it is destroyed.
    os._exit(0 if ok else 1)
