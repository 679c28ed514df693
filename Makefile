# The two commands of the README. Both build a local virtualenv (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test bench reproduce clean

$(VENV)/.installed: requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: on this project's CPU machines the CPU wheel (an unpinned torch, asked for directly
	# or by another package, pulls several GB of CUDA packages). Elsewhere: README, "Install".
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# One pytest-xdist worker per core, a test file to a worker (module fixtures run once).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) -m training demo --out runs/demo

# The paper's claim over 3 seeds: DPO, SimPO, IPO with and without SPO (CPU, 15 to 30 minutes on 2 cores; not part of test).
reproduce: $(VENV)/.installed
	$(PY) -m training reproduce --out runs/reproduce

bench: $(VENV)/.installed
	$(PY) -m benchmarks --preset cpu-linear-v32k --methods eager,liger,trl,flce,flce_chunked,spo_torch,spo_cpu

clean:
	rm -rf $(VENV) build *.egg-info
