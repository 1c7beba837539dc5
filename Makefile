# Two commands on a fresh machine:  make demo  and  make test  (see README).
PYTHON ?= python3
# Installed only when no torch is importable. 2.13.0 is the CPU build this
# project is developed and tested with; any torch >= 2.2 works (pyproject.toml).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m bbdrop demo

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/profile_step.py
	$(PYTHON) benchmarks/epoch_time.py
