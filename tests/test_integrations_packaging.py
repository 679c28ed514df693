"""Packaging and install story: only ``spo_kernels`` installs; an isolated build without torch fails
with the fix instead of silently dropping the C++ extension (auto / 0 skip it on request); a user can
ask which backend runs; the benchmark CLI prints its table without matplotlib."""

import os
import subprocess
import sys

import pytest
import torch

import spo_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_the_package_is_installed():
    from setuptools import find_packages
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    found = find_packages(ROOT, include=include)
    assert "spo_kernels" in found and "spo_kernels.integrations" in found and "spo_kernels.backends" in found
    assert all(p == "spo_kernels" or p.startswith("spo_kernels.") for p in found), found
    extras = meta["project"]["optional-dependencies"]
    assert {"trl", "train", "bench", "test", "hf", "triton"} <= set(extras)
    assert any(r.startswith("trl>=1.16") and "<1.17" in r for r in extras["trl"])


def _run_setup(env_value):
    """setup.py as pip's isolated build sees it: torch not importable."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = dict(os.environ)
    env.pop("SPO_KERNELS_BUILD_CPU", None)
    if env_value is not None:
        env["SPO_KERNELS_BUILD_CPU"] = env_value
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_isolated_build_without_torch_fails_loudly_with_the_fix():
    proc = _run_setup(None)
    assert proc.returncode != 0
    assert "torch is not importable at build time" in proc.stderr and "--no-build-isolation" in proc.stderr


@pytest.mark.parametrize("value", ["auto", "0"])
def test_build_without_the_extension_on_request(value):
    proc = _run_setup(value)
    assert proc.returncode == 0, proc.stderr
    assert "spo-kernels" in proc.stdout
    if value == "auto":
        assert "WARNING (spo-kernels)" in proc.stderr


def test_resolve_backend_is_public():
    assert spo_kernels.resolve_backend("cpu") in ("cpu", "torch")
    assert spo_kernels.resolve_backend(torch.device("cpu"), backend="torch") == "torch"
    with pytest.raises(ValueError, match="unknown"):
        spo_kernels.resolve_backend("cpu", backend="fastest")


def test_benchmark_cli_prints_its_table_without_matplotlib(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from benchmarks.cli import main; "
            f"sys.exit(main(['--workload', 'logits', '--P', '1', '--T', '8', '--V', '33', '--methods', 'spo_torch', "
            f"'--repeats', '1', '--out-dir', {str(tmp_path)!r}, '--name', 'nompl']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spo (torch)" in proc.stdout and "x eager" in proc.stdout
    assert "plot skipped: matplotlib is not installed" in proc.stdout
    assert (tmp_path / "nompl.md").exists() and not (tmp_path / "nompl.png").exists()
    assert ".png" not in proc.stdout.splitlines()[-1]
