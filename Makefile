# One virtual environment, made on first use: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `mlflow models serve --env-manager local` starts uvicorn from PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo typecheck test test-fast bench clean

$(BIN)/.installed: requirements-dev.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed

demo: setup  ## train, log, register and serve the examples; send a request; print the answer
	$(BIN)/python example_projects/demo.py

typecheck: setup  ## mypy over the package (configured in setup.cfg)
	$(BIN)/python -m mypy mlflow_fullmodel

test: setup typecheck  ## type check, then the whole test suite, end-to-end tests included
	$(BIN)/python -m pytest

test-fast: setup  ## without the end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) mlruns mlflow.db .pytest_cache build *.egg-info
