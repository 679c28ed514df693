"""Every ```python block of the README runs as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    BLOCKS = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, monkeypatch):
    monkeypatch.setenv("SPO_KERNELS_BACKEND", "torch")  # the interpreter would work too, only slower
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), {})
