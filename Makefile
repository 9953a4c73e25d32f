# `make test` and `make demo` each create .venv when it is missing, install the package, and run.
# TORCH pins the torch build installed first: on these machines torch==2.13.0 is a local CPU wheel,
# while an unpinned `torch` would pull a multi-GB CUDA build. Override it on a GPU box:
#   make demo TORCH="torch"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint format demo install gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,sweep,launchers,serve]"
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(PY) -m pytest -q

# ruff's linter and formatter, configured in pyproject.toml; `make format` applies both.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) train.py

# Every CUDA path once, one PASS/FAIL/SKIP line each: make gpu-check TORCH=torch
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean-venv:
	rm -rf $(VENV)
