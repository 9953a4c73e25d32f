# `make test` and `make demo` each create .venv when it is missing, install the package, and run.
# TORCH pins the torch build installed first: on these machines torch==2.13.0 is a local CPU wheel,
# while an unpinned `torch` would pull a multi-GB CUDA build. Override it on a GPU box:
#   make demo TORCH="torch"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-browser lint format demo install gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,sweep,launchers,serve]"
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(PY) -m pytest -q

# The chat page's tests in Debian's headless Chromium (installed here when missing, with a CJK
# font for the Chinese page); `make test` runs them too when the browser is there, else skips them.
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium fonts-noto-cjk) \
		|| (sudo apt-get update -q && sudo apt-get install -y -q chromium fonts-noto-cjk)
	$(PY) -m pytest -q -rs tests/serve/test_page.py

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
