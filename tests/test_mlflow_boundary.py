"""The one boundary to MLflow: only ``mlflow_fullmodel/_mlflow.py`` uses MLflow's private names, and
what it assumes about MLflow holds for the installed version."""

from __future__ import annotations

import ast
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mlflow_fullmodel
from mlflow_fullmodel import _mlflow

PACKAGE = Path(mlflow_fullmodel.__file__).parent
BOUNDARY = PACKAGE / "_mlflow.py"


def _is_mlflow(module: str) -> bool:
    return module == "mlflow" or module.startswith("mlflow.")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def mlflow_internals(source: str, filename: str = "<module>") -> list[str]:
    """Where ``source`` reaches into MLflow's private names: ``from mlflow.x import _y``, a module path
    with a private part (``mlflow.tracking._model_registry``), ``module._name`` on an imported MLflow
    module, or the name of an environment variable MLflow's scoring server sets."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    modules: set[str] = set()  # local names bound to MLflow modules (or to names imported from them)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _is_mlflow(node.module):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_mlflow(alias.name):
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value in (
            _mlflow.SERVER_MODEL_PATH_VARIABLE, _mlflow.SERVING_ENVIRONMENT_VARIABLE
        ):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_only_the_boundary_module_uses_mlflow_internals():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert BOUNDARY in modules and len(modules) > 20
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in modules
        if path != BOUNDARY and (found := mlflow_internals(path.read_text(), str(path)))
    }
    assert not offenders, f"MLflow internals outside mlflow_fullmodel/_mlflow.py (move them there): {offenders}"


@pytest.mark.parametrize("source", [
    "from mlflow.models.utils import _save_example",
    "from mlflow.utils.environment import (\n    _PythonEnv,\n)",
    "from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS",
    "import mlflow.tracking._model_registry",
    "import mlflow.utils._private as p",
    "def f():\n    from mlflow.pyfunc import scoring_server\n    return scoring_server._SERVER_MODEL_PATH",
    "import mlflow\nmlflow.tracking.artifact_utils._download_artifact_from_uri('runs:/x')",
    "import os\nos.environ['__pyfunc_model_path__'] = '.'",
])
def test_the_check_finds_each_kind_of_reach_into_mlflow(source):
    assert mlflow_internals(source)


@pytest.mark.parametrize("source", [
    "from mlflow.models import Model\nfrom mlflow.exceptions import MlflowException",
    "import mlflow\nmlflow.__version__",
    "from mlflow_fullmodel._mlflow import save_input_example",
    "from ._mlflow import save_input_example",
    "from mlflow_fullmodel import _mlflow\n_mlflow.PREDICT_ECHO",
    "class A:\n    def f(self):\n        return self._private",
])
def test_the_check_passes_public_mlflow_and_our_own_names(source):
    assert mlflow_internals(source) == []


def test_the_boundary_module_imports_what_it_names():
    missing = [name for name in _mlflow.__all__ if not hasattr(_mlflow, name)]
    assert not missing


def test_the_scoring_server_sets_the_variables_we_read():
    from mlflow.pyfunc import scoring_server

    assert scoring_server._SERVER_MODEL_PATH == _mlflow.SERVER_MODEL_PATH_VARIABLE
    assert "os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = \"true\"" in inspect.getsource(scoring_server)
    assert _mlflow.SERVING_ENVIRONMENT_VARIABLE == "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"


def test_mlflow_still_echoes_the_request_as_the_patterns_expect():
    from mlflow import pyfunc
    from mlflow.pyfunc import scoring_server

    server = inspect.getsource(scoring_server)
    assert "e.message = f\"Failed to predict data '{data}'. \\nError: {e.message}\"" in server
    data, inner = "   a\n\n0  'x'  Error: ", "the model's message"
    assert _mlflow.PREDICT_ECHO.sub("", f"Failed to predict data '{data}'. \nError: {inner}") == inner
    assert "f\"Failed to enforce schema of data '{data}' \"" in inspect.getsource(pyfunc)
    assert "f\"with schema '{input_schema}'. \"" in inspect.getsource(pyfunc)
    message = f"Failed to enforce schema of data '{data} with schema ' x' with schema '['text': string]'. Error: {inner}"
    match = _mlflow.SCHEMA_ECHO.match(message)
    assert match and match["schema"] == "['text': string]" and message[match.end():] == inner


def test_the_scoring_server_runs_requests_on_asyncios_default_executor():
    from mlflow.pyfunc import scoring_server

    assert "await asyncio.to_thread(invocations," in inspect.getsource(scoring_server)
    cores = os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()
    with ThreadPoolExecutor() as executor:  # what asyncio's default executor is made as
        assert executor._max_workers == _mlflow.scoring_server_threads(cores or 1)
    assert [_mlflow.scoring_server_threads(c) for c in (1, 4, 28, 64)] == [5, 8, 32, 32]


def test_an_unrewritten_message_keeps_its_text():
    error = _mlflow.UnrewrittenMessage("too many rows", 1)
    error.message = f"Failed to predict data '{'x' * 1000}'. \nError: {error.message}"
    assert error.message == "too many rows" and str(error) == "too many rows"


def test_a_loaded_pyfunc_model_holds_what_the_flavor_returned(registered_reviews):
    """``pyfunc_implementation`` (how the Ray Serve deployment reaches the ServedModel to batch with
    ``@serve.batch``) is the object the flavor's ``_load_pyfunc`` returned."""
    import mlflow

    from mlflow_fullmodel.serving import ServedModel

    loaded = mlflow.pyfunc.load_model(registered_reviews.model_uri)
    assert isinstance(_mlflow.pyfunc_implementation(loaded), ServedModel)
