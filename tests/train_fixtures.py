"""Shared pieces of the trainer tests (tests/test_training*.py): the tiny model, a data file, a config."""

import json
import os

import pytest

from training import TrainConfig
from training.data import write_preference_jsonl
from training.task import make_pairs, make_problems

TINY = dict(builtin_hidden_size=32, builtin_layers=2, builtin_heads=2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_preference_jsonl(str(path), make_pairs(make_problems(24, seed=3), seed=4))
    return str(path)


def tiny_config(data_file, out_dir, **overrides) -> TrainConfig:
    values = dict(data=data_file, out_dir=str(out_dir), max_steps=3, batch_size=4, lr=1e-3, beta=0.5,
                  progress=False, plot=False, num_threads=1, **TINY)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
