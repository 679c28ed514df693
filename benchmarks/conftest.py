"""Lets ``pytest benchmarks/`` import the ``benchmarks`` package from the repository root."""
