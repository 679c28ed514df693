"""Build script: the package is pure Python (+ Triton); see pyproject.toml for metadata."""

from setuptools import setup

setup()
