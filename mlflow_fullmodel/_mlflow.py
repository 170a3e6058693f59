"""The one boundary to MLflow's internals.

Every private MLflow name the package uses, and every assumption about MLflow's behaviour that no
public API promises (environment variables its scoring server sets, the wording of its messages,
the size of its request thread pool, how its artifact repositories resolve a URI), is here and
nowhere else; the rest of the package imports them from this module under its own names.
MLflow's public API (``mlflow.pyfunc``, ``mlflow.models.Model``, ``MlflowClient``,
``MlflowException``, ``mlflow.types``) is imported where it is used.

The supported MLflow range is declared in ``setup.cfg``; ``make test`` runs the fast tests with
its oldest and its newest version. ``tests/test_mlflow_boundary.py`` fails when another module
imports a private MLflow name, and checks the assumptions below against the installed MLflow.
"""

from __future__ import annotations

import re
from typing import Any

from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.tracking.context.default_context import DefaultRunContext
from mlflow.types.utils import _infer_schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.mlflow_tags import MLFLOW_USER
from mlflow.utils.model_utils import (
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

__all__ = [
    "CONDA_ENV_FILE", "CONSTRAINTS_FILE", "DEFAULT_AWAIT_REGISTRATION_S", "PREDICT_ECHO", "PYTHON_ENV_FILE",
    "PythonEnv", "REQUIREMENTS_FILE", "SCHEMA_ECHO", "SERVER_MODEL_PATH_VARIABLE", "SERVING_ENVIRONMENT_VARIABLE",
    "UnrewrittenMessage", "copy_code_paths", "download_artifacts", "get_flavor_configuration", "infer_schema",
    "load_served_model", "mlflow_user", "prepare_save_path", "process_conda_env", "process_pip_requirements",
    "pyfunc_implementation", "save_input_example", "scoring_app", "scoring_server_threads", "store_beside_model",
    "validate_env_arguments", "write_text",
    # The scoring server's parsing of a request, for the event stream (streaming.py).
    "InvocationRefused", "parse_invocation",
]

# --- Saving a model: the helpers every MLflow flavor's save_model uses. ---

#: Writes the input example (with its params) into the model folder and records it in the MLmodel.
save_input_example = _save_example
#: Infers an MLflow schema (columns or tensors) from the golden outputs, as ``infer_signature`` does.
infer_schema = _infer_schema
#: Refuses a combination of conda_env / pip_requirements / extra_pip_requirements MLflow cannot honour.
validate_env_arguments = _validate_env_arguments
#: Refuses an existing non-empty target folder, and creates the folder.
prepare_save_path = _validate_and_prepare_target_save_path
#: Copies the user's ``code_paths`` into the model's ``code/`` folder, where pyfunc puts them on sys.path.
copy_code_paths = _validate_and_copy_code_paths
#: Merges default and user pip requirements into (conda env, requirements, constraints).
process_pip_requirements = _process_pip_requirements
#: Splits a user's conda env into (conda env, pip requirements, pip constraints).
process_conda_env = _process_conda_env
#: The Python version and build tools of this process, written as the model's python_env.yaml.
PythonEnv = _PythonEnv
#: Writes a text file (MLflow's own helper, so that the files match what other flavors write).
write_text = write_to
#: The file names MLflow's environment managers (``--env-manager conda/virtualenv``) look for.
CONDA_ENV_FILE = _CONDA_ENV_FILE_NAME
CONSTRAINTS_FILE = _CONSTRAINTS_FILE_NAME
PYTHON_ENV_FILE = _PYTHON_ENV_FILE_NAME
REQUIREMENTS_FILE = _REQUIREMENTS_FILE_NAME

# --- Loading and registering. ---

#: Reads one flavor's block of a local model's MLmodel; an MlflowException when it has none.
get_flavor_configuration = _get_flavor_configuration
#: Downloads a model URI (runs:/, models:/, a store's URI) to a local folder; a local path is returned as it is.
download_artifacts = _download_artifact_from_uri
#: The default of ``log_model(await_registration_for=...)``, as every MLflow flavor has it.
DEFAULT_AWAIT_REGISTRATION_S: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS


def store_beside_model(model_uri: str, local_file: str) -> str:
    """Upload ``local_file`` into the artifact folder of a logged or registered model and return that
    folder's URI. Depends on the artifact repositories resolving ``models:/`` and ``runs:/`` URIs to
    the store's own URI with ``get_underlying_uri``, and on ``get_artifact_repository`` for that URI."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    location = model_uri
    while location.startswith(("models:/", "runs:/")):
        repository = ModelsArtifactRepository if location.startswith("models:/") else RunsArtifactRepository
        location = repository.get_underlying_uri(location)
    get_artifact_repository(location).log_artifact(local_file)
    return location


def mlflow_user() -> str:
    """Who MLflow says is acting: the user it records as a new run's ``mlflow.user`` tag, i.e. the
    tracking username of its credentials (``MLFLOW_TRACKING_USERNAME``, or ``~/.mlflow/credentials``)
    or else the operating system's user. Depends on ``DefaultRunContext`` making that tag; where the
    system has no name for the user (a container's uid without a passwd entry), "unknown", as MLflow
    says when it cannot ask."""
    try:
        return str(DefaultRunContext().tags()[MLFLOW_USER])
    except (KeyError, OSError):  # getpass.getuser(): no LOGNAME/USER and no passwd entry
        return "unknown"


# --- The scoring server (``mlflow models serve``). ---

#: Set by the scoring server to the model's path before it loads the model: "we are in a scoring
#: server" (``scoring_server._SERVER_MODEL_PATH``; written out so that checking it does not import
#: the server's web framework).
SERVER_MODEL_PATH_VARIABLE = "__pyfunc_model_path__"
#: Set to "true" by the scoring server before it serves: it turns a DataFrame answer into records.
SERVING_ENVIRONMENT_VARIABLE: str = _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name

#: The scoring server prefixes an MlflowException's message with
#: "Failed to predict data '<the request>'. \nError: " (``scoring_server.invocations``).
PREDICT_ECHO = re.compile(r"^Failed to predict data .*?\nError: ", re.DOTALL)
#: ... and pyfunc's schema check with "Failed to enforce schema of data '<the request's frame>' with
#: schema '<the signature>'. Error: " (greedy: the frame may hold the same words).
SCHEMA_ECHO = re.compile(r"^Failed to enforce schema of data '.*' with schema '(?P<schema>.*?)'\. ?Error: ",
                         re.DOTALL)


class UnrewrittenMessage(MlflowException):
    """An MlflowException whose message stays as made: the scoring server assigns
    ``error.message = f"Failed to predict data '{data}'. \\nError: {error.message}"`` (echoing the
    whole request, however large), and this class ignores the assignment."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message, error_code=error_code)
        self._kept_message = message

    @property
    def message(self) -> str:
        return self.__dict__.get("_kept_message", "")

    @message.setter
    def message(self, value: str) -> None:
        pass  # keep ours


def scoring_server_threads(cores: int) -> int:
    """How many requests the scoring server runs at once on ``cores`` cores: it runs each in
    ``asyncio.to_thread``, i.e. asyncio's default executor, ``min(32, cores + 4)`` threads."""
    return min(32, cores + 4)


def load_served_model(model_path: str) -> Any:
    """The pyfunc model as ``mlflow models serve`` loads it (with its ``model_config``)."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.load_model_with_mlflow_config(model_path)


def scoring_app(model: Any) -> Any:
    """The scoring server's ASGI app for a loaded pyfunc model, as ``mlflow models serve`` runs it."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(model)


def pyfunc_implementation(model: Any) -> Any:
    """What the flavor's ``_load_pyfunc`` returned (for a fullmodel model, its ``serving.ServedModel``),
    inside the loaded ``PyFuncModel`` MLflow wraps around it: its ``_model_impl``, which no public
    API gives."""
    return model._model_impl


class _Parsed(BaseException):
    """How ``parse_invocation`` gets the request back out of the scoring server's ``invocations``:
    not an Exception, so that it passes its ``except`` clauses untouched (the one for an
    MlflowException formats the whole parsed DataFrame into the message)."""

    def __init__(self, data: Any, params: dict[str, Any] | None) -> None:
        super().__init__("parsed")
        self.data, self.params = data, params


class _Parser:
    """A stand-in for the model in ``invocations``: it has the model's metadata, and its predict
    hands back what it was given."""

    def __init__(self, model: Any) -> None:
        self.metadata = model.metadata

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        raise _Parsed(data, params)


class InvocationRefused(Exception):
    """The scoring server answers a request with ``status`` and ``text`` before parsing it (415:
    a content type or charset it does not read)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def parse_invocation(body: bytes, content_type: str, model: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(data, params)`` of a ``POST /invocations`` body, parsed exactly as the scoring server parses
    it for ``model`` before calling its predict: its ``invocations`` function runs with a stand-in
    model (``_Parser``). Depends on ``invocations(data, content_type, model, input_schema)`` calling
    ``model.predict(data, params=params)`` once it has parsed, and letting a BaseException through.

    Raises:
        InvocationRefused: The server would answer before parsing (an unsupported content type).
        MlflowException: The body is malformed (the server's own message and status).
    """
    from mlflow.pyfunc import scoring_server

    try:
        response = scoring_server.invocations(body, content_type, _Parser(model), model.metadata.get_input_schema())
    except _Parsed as parsed:
        return parsed.data, parsed.params
    raise InvocationRefused(int(response.status), str(response.response))
