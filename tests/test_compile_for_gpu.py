"""Every kernel variant the launchers use compiles for sm_90 (H100/H200) with the installed Triton.

The interpreter tests check the arithmetic; this checks the compiler accepts the kernels (front end
through ptxas), which the interpreter does not. It needs no GPU: see tests/compile_for_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_every_kernel_variant_compiles_for_sm90():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_for_gpu.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "all " in proc.stdout and "variants compiled" in proc.stdout, out[-3000:]
    # The backward's output-reuse path and the forward/backward of both paths are among them.
    for name in ("_scatter_rows_kernel", "_forward_partials_kernel", "_dh_gemm_kernel", "_token_logprob_kernel",
                 "_logits_backward_kernel", "_loss_step_kernel"):
        assert f"ok {name}" in proc.stdout, name
