# One virtual environment, made on first use: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `mlflow models serve --env-manager local` starts uvicorn from PATH.
export PATH := $(abspath $(BIN)):$(PATH)

# The torchvision tests' own environment: PyPI's torchvision does not import beside the CPU torch
# wheel (its build is linked against a CUDA torch), so they run with the torch/torchvision pair
# that does, on the CPU.
TV_VENV ?= .venv-torchvision
TV_BIN := $(TV_VENV)/bin
# (on aarch64 the CPU pair 2.9.1 / 0.24.1; elsewhere 2.14.1 / 0.29.1, a CUDA build, run on the CPU)
TV_TORCH ?= $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: setup setup-torchvision demo typecheck test test-fast test-busy test-torchvision dist bench clean

$(BIN)/.installed: requirements-dev.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed

$(TV_BIN)/.installed: requirements-dev.txt setup.cfg
	$(PYTHON) -m venv $(TV_VENV)
	$(TV_BIN)/pip install --quiet --upgrade pip
	$(TV_BIN)/pip install --quiet $(TV_TORCH)
	$(TV_BIN)/pip install --quiet "mlflow==3.17.*" -e ".[dev,examples,torchvision]"
	touch $@

setup-torchvision: $(TV_BIN)/.installed

demo: setup  ## train, log, register and serve the examples; send a request; print the answer
	$(BIN)/python example_projects/demo.py

typecheck: setup  ## mypy over the package (configured in setup.cfg)
	$(BIN)/python -m mypy mlflow_fullmodel

# The torchvision environment (about 7 GB) is built only once the main suite has passed.
test: setup typecheck  ## type check, then the whole test suite, end-to-end tests included
	$(BIN)/python -m pytest
	$(MAKE) test-torchvision

test-torchvision: setup-torchvision  ## the image example with torchvision pre-processing
	MLFLOW_FULLMODEL_REQUIRE_TORCHVISION=1 PATH="$(abspath $(TV_BIN)):$$PATH" $(TV_BIN)/python -m pytest tests/test_example_image_torchvision.py

test-fast: setup  ## without the end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

test-busy:  ## `make test` with every core kept busy by another process, as on a loaded machine
	bash .ci/test-under-load

dist: setup  ## the wheel and source distribution, under dist/
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(TV_VENV) mlruns mlflow.db .pytest_cache build dist *.egg-info
