"""Benchmarks: each method timed and measured in its own process, side by side in one run.

``python -m benchmarks --preset cpu-linear-v32k`` (see ``--help``); ``python -m benchmarks.gpu STEP``
for the step-wise GPU harness; ``pytest benchmarks/`` for the pytest-benchmark suite. benchmarks/README.md
says what each does.
"""
