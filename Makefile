# Two commands on a fresh machine:  make demo  and  make test  (see README).
# While editing: make test-fast (ruff, then every test but the end-to-end runs marked
# slow, and the docstring examples; under a minute on 2 cores, no install step).
PYTHON ?= python3
# Two pytest processes (pytest-xdist, in the [test] extra), each on its own share of the
# cores (tests/conftest.py): most tests compute on one thread, and the subprocesses of
# the end-to-end tests spend seconds importing torch. A test file stays in one process
# (--dist loadscope), so the runs it shares among its tests are made once; the files go
# out longest first (tests/conftest.py), not reordered by their number of tests. PYTEST_N=1,
# or pytest-xdist not installed (test-fast has no install step): one process.
PYTEST_N ?= 2
XDIST = $(shell $(PYTHON) -c "import xdist" 2>/dev/null && [ "$(PYTEST_N)" -gt 1 ] \
	&& echo "-n $(PYTEST_N) --dist loadscope --no-loadscope-reorder")
# Installed only when no torch is importable. 2.13.0 is the CPU build this
# project is developed and tested with; any torch >= 2.2 works (pyproject.toml).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m bbdrop demo

# Everything (CI, README): the unit, contract and doc tests and the end-to-end runs.
# The suite starts Python processes by the dozen (python -m bbdrop, torchrun, --jobs
# workers): with PYTHONDONTWRITEBYTECODE set (as in some containers), each would compile
# bbdrop's modules again (about 0.2 s a process; measured: 4:10 to 4:07 for the suite,
# within the noise). The bytecode goes to a folder of its own, not into the checkout.
PYCACHE ?= $(or $(TMPDIR),/tmp)/bbdrop-pycache
test: install
	$(PYTHON) -m ruff check src tests benchmarks
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(PYCACHE) $(PYTHON) -m pytest -q $(XDIST)

# The edit loop, after one make install: pyproject.toml's [tool.pytest.ini_options]
# collect tests/ and the doctests of src/bbdrop; -m "not slow" leaves out the runs.
test-fast:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest -q -m "not slow" $(XDIST)

bench: install
	$(PYTHON) benchmarks/profile_step.py
	$(PYTHON) benchmarks/epoch_time.py
