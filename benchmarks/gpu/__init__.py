"""The step-wise GPU harness: ``python -m benchmarks.gpu STEP`` (see benchmarks/README.md)."""
