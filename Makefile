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

# The oldest MLflow of the supported range (setup.cfg's mlflow>=3.9,<3.18); the newest is the main
# .venv's (requirements-dev.txt). The fast tests run against both.
MLFLOW_OLDEST ?= 3.9
OLD_VENV ?= .venv-mlflow-oldest
OLD_BIN := $(OLD_VENV)/bin

.PHONY: setup setup-torchvision setup-mlflow-oldest demo lint typecheck test test-fast test-busy test-torchvision test-mlflow-oldest dist bench clean

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

# Not editable: the checkout's own .venv keeps its editable install. Reinstalled when the package changes.
$(OLD_BIN)/.installed: setup.cfg $(shell find mlflow_fullmodel -name '*.py')
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_BIN)/pip install --quiet --upgrade pip
	$(OLD_BIN)/pip install --quiet torch==2.13.0
	# MLflow 3.9's scoring server declares its routes with app.route, which Starlette 1.0 removed.
	$(OLD_BIN)/pip install --quiet "mlflow==$(MLFLOW_OLDEST).*" "starlette<1" ".[dev,examples,signing,ray,int8]"
	touch $@

setup-mlflow-oldest: $(OLD_BIN)/.installed

demo: setup  ## train, log, register and serve the examples; send a request; print the answer
	$(BIN)/python example_projects/demo.py

lint: setup  ## ruff over the package, tests, benchmarks and examples (configured in pyproject.toml)
	$(BIN)/ruff check mlflow_fullmodel tests benchmarks example_projects

typecheck: setup  ## mypy over the package (configured in setup.cfg)
	$(BIN)/python -m mypy mlflow_fullmodel

# The torchvision environment (about 7 GB) is built only once the main suite has passed.
test: setup lint typecheck  ## lint and type check, then the whole test suite, end-to-end tests included
	$(BIN)/python -m pytest
	$(MAKE) test-mlflow-oldest
	$(MAKE) test-torchvision

test-mlflow-oldest: setup-mlflow-oldest  ## the fast tests with the oldest supported MLflow
	PATH="$(abspath $(OLD_BIN)):$$PATH" $(OLD_BIN)/python -m pytest -m "not slow"

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
	rm -rf $(VENV) $(TV_VENV) $(OLD_VENV) mlruns mlflow.db .pytest_cache build dist *.egg-info
