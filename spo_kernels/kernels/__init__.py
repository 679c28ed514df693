"""Triton kernels, one op per file, each with its host launcher beside it."""
