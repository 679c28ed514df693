"""Benchmarks: each method timed and measured in its own process, side by side in one run.

``python -m benchmarks --preset cpu-issue2`` (see ``--help``); ``pytest benchmarks/`` for the
pytest-benchmark suite.
"""
