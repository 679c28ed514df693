"""Test setup: without CUDA, Triton kernels run in the interpreter (set before triton is imported). Under
pytest-xdist (``make test`` runs one worker per core) each worker, and what it starts, computes on its share
of the cores: with more threads than cores, OpenMP's spinning threads take turns with the other workers."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)  # the subprocesses a test starts (benchmark workers, torchrun)
    torch.set_num_threads(_share)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
