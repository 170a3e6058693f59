"""The ``fullmodel`` MLflow flavor: ``save_model``, ``log_model``, ``load_model`` and the pyfunc
loader, in the shape of MLflow's own flavors.

An MLflow model written here holds, beside MLflow's own files::

    fullmodel/               the saved FullModel (spec, modules, artifacts, captured code, golden)
    code/mlflow_fullmodel/   this runtime, so the model loads where mlflow_fullmodel is not installed
    MODEL_CARD.md            what the model is, its data path, params, example, how to call it
    pipeline.svg             a picture of the data path (both shown in the MLflow UI)
    MANIFEST.json            the sha256 of every file of the MLflow model, checked on every load;
                             its digest is recorded as a tag of the logged model and model version

Example::

    import mlflow
    import mlflow_fullmodel as fm

    with mlflow.start_run():
        info = fm.log_model(model, name="model", input_example=["What a film!"],
                            registered_model_name="reviews")
    fm.load_model(info.model_uri).predict(["What a film!"])
    mlflow.pyfunc.load_model("models:/reviews/1").predict(pd.DataFrame({"text": ["Dull."]}))
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

import pandas as pd
import yaml
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

import mlflow_fullmodel
from mlflow_fullmodel._mlflow import (
    CONDA_ENV_FILE,
    CONSTRAINTS_FILE,
    DEFAULT_AWAIT_REGISTRATION_S,
    PYTHON_ENV_FILE,
    REQUIREMENTS_FILE,
    PythonEnv,
    copy_code_paths,
    download_artifacts,
    get_flavor_configuration,
    infer_schema,
    prepare_save_path,
    process_conda_env,
    process_pip_requirements,
    save_input_example,
    validate_env_arguments,
    write_text,
)
from mlflow_fullmodel.card import CARD_FILE, PIPELINE_FILE, render_card, render_pipeline, summary
from mlflow_fullmodel.compiled import DEFAULT_RTOL
from mlflow_fullmodel.exceptions import ConfigError, DriftError, FullModelError, ModelFormatError
from mlflow_fullmodel.export import export_eager_modules
from mlflow_fullmodel.inspection import describe_model
from mlflow_fullmodel.modules import EAGER
from mlflow_fullmodel.optimize import QUANTIZED_RTOL, check_options, compile_modules, drift, quantize_modules
from mlflow_fullmodel.parity import check_parity, preprocess_digests
from mlflow_fullmodel.pipeline import FullModel
from mlflow_fullmodel.registry import record_digest
from mlflow_fullmodel.serving import ServedModel, serve, set_thread_count
from mlflow_fullmodel.settings import ServingSettings
from mlflow_fullmodel.storage import FORMAT_VERSION, load_fullmodel, make_golden, save_fullmodel
from mlflow_fullmodel.storage.capture import pinned as _pinned
from mlflow_fullmodel.storage.integrity import Manifest, confined_path, verify_manifest, write_manifest

__all__ = ["FLAVOR_NAME", "get_default_pip_requirements", "load_model", "log_model", "save_model"]

_logger = logging.getLogger(__name__)
#: What log_model tells its user, through MLflow's own log handler (INFO, on stderr, by default).
_announce = logging.getLogger("mlflow.fullmodel")

FLAVOR_NAME = "fullmodel"
_DATA_SUBPATH = "fullmodel"
_CODE_SUBPATH = "code"


_SCHEMA_TYPES = {str: "string", bytes: "binary", bool: "boolean", int: "long", float: "double"}



class _Saved(NamedTuple):
    manifest: Manifest
    summary: str


# What save_model wrote, handed to the log_model call around it (MLflow's Model.log sits in between
# and returns only its ModelInfo), so that the digest is recorded from what was written rather than
# read back from the artifact store.
_SAVED: ContextVar[list[_Saved] | None] = ContextVar("_SAVED", default=None)


def get_default_pip_requirements() -> list[str]:
    """The pip requirements every fullmodel model has: MLflow, torch, numpy and pandas, pinned to
    the installed versions. Step requirements (sentencepiece, ...) are added per model."""
    return [_pinned(name) for name in ("mlflow", "torch", "numpy", "pandas")]


def save_model(
    fullmodel: FullModel,
    path: str,
    conda_env: dict[str, Any] | str | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | Literal[False] | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    check_parity: bool = True,
    compile: Literal["aoti"] | None = None,
    compile_rtol: float = DEFAULT_RTOL,
    quantize: Literal["int8"] | None = None,
    max_drift: float | None = None,
) -> None:
    """Save a FullModel as an MLflow model in the local folder ``path``.

    Args:
        fullmodel: The FullModel to save.
        path: A missing or empty local folder.
        conda_env: A conda environment (dict or YAML file) replacing the generated one.
        code_paths: Extra local files or folders to copy into the model's ``code`` folder. The
            processing code of the steps is captured without this.
        mlflow_model: The ``mlflow.models.Model`` this flavor is added to (used by ``log_model``).
        signature: The model signature; inferred from ``input_example`` when None (inputs, outputs
            and the runtime parameters with their defaults); False for none.
        input_example: Example rows (a list of raw values, a list of dicts or a DataFrame), or a
            ``(rows, params)`` tuple. Saved as MLflow's input example and as the golden example.
        pip_requirements: Requirements replacing the generated ones.
        extra_pip_requirements: Requirements added to the generated ones.
        metadata: Custom metadata written into the MLmodel file.
        check_parity: Reload the saved model in a clean Python process and require it to
            reproduce the input example's outputs. It needs ``input_example``.
        compile: ``"aoti"``: compile each module (a plain ``nn.Module`` or an ``ExportedProgram``)
            with AOTInductor into a package stored beside its portable program. It runs where torch's
            version, the CPU architecture and instruction sets and the device match the saving
            machine's; elsewhere the portable program runs. Needs a C++ compiler.
        compile_rtol: How far (relative) the compiled package's outputs may be from the golden ones
            in the parity check, which checks the portable program exactly as without ``compile``.
            With ``quantize``, at least the quantization's tolerance (1e-2).
        quantize: ``"int8"``: quantize the ``nn.Linear`` layers of each plain module to int8
            (torchao: dynamic int8 activations, int8 weights) before it is exported. The golden
            example is the quantized model's; its drift from the float model (label agreement,
            largest difference of a number) is recorded in the model card and ``inspect``. A row's
            answer may move by about 1e-3 with the rows batched beside it (float rounding crosses an
            int8 step): the parity check's batch comparison allows 1e-2 (relative) for an int8 model.
            On a CPU the int8 program pays with ``compile="aoti"``.
        max_drift: With ``quantize``: refuse the model when a number of its golden outputs (a
            probability) moves further than this from the float model's, or a label changes.

    Raises:
        ConfigError: A step's configuration cannot be saved, ``input_example`` is missing, or a
            module cannot be compiled or quantized as asked.
        CodeCaptureError: A step's source code cannot be captured.
        ParityError: The reloaded model does not reproduce the outputs.
        DriftError: The quantized model drifts further than ``max_drift`` from the float one.

    Example::

        fm.save_model(model, "reviews_model", input_example=["What a film!", "Dull."])
        fm.save_model(model, "reviews_fast", input_example=["What a film!"], compile="aoti", quantize="int8")
    """
    validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    if not isinstance(fullmodel, FullModel):
        raise TypeError(f"save_model expects a FullModel, got {type(fullmodel).__name__}.")
    rows, example_params = _split_example(fullmodel, input_example)
    if check_parity and rows is None:
        raise ConfigError(
            "The parity check needs an input_example to compare the saved model against; pass "
            "input_example=[...] (a few raw inputs), or check_parity=False to skip the check."
        )
    check_options(fullmodel, compile, quantize, compile_rtol, max_drift)
    if rows is None and (EAGER in fullmodel.module.formats.values() or compile or quantize):
        raise ConfigError(
            "A plain nn.Module is exported with torch.export from the input_example (and compiled and quantized "
            "modules are checked on it); pass input_example=[...] (a few raw inputs), or script (fm.script) or "
            "export the module yourself."
        )
    golden = make_golden(fullmodel, rows, example_params) if rows is not None else None
    quantization = None
    if quantize is not None:
        assert rows is not None and golden is not None
        fullmodel, quantization = quantize_modules(fullmodel)
        float_golden, golden = golden, make_golden(fullmodel, rows, example_params)
        quantization["drift"] = drift(float_golden.outputs, golden.outputs)
        _check_drift(quantization["drift"], max_drift)
    if EAGER in fullmodel.module.formats.values():
        assert rows is not None
        # Outputs of the module as given are the golden ones: the parity check compares the program.
        fullmodel = export_eager_modules(fullmodel, rows, example_params)
    if compile is not None:
        # An int8 program compiled: the compiler's rounding crosses int8 steps as batching does.
        fullmodel = compile_modules(fullmodel, compile_rtol if quantize is None else max(compile_rtol, QUANTIZED_RTOL))

    prepare_save_path(path)
    try:
        _write_model(
            fullmodel, path, golden, conda_env, code_paths, mlflow_model, signature,
            pip_requirements, extra_pip_requirements, metadata, quantization,
        )
        if check_parity:
            assert rows is not None  # refused above: the check needs an input example
            started = time.perf_counter()
            compiled = check_parity_of(path, preprocess_digests(fullmodel, rows))
            _announce.info(
                "Parity check passed in %.1f s: the saved model, reloaded in a clean process, reproduces its %d "
                "example row(s)%s%s.", time.perf_counter() - started, len(rows),
                "" if fullmodel.batch_size == 1 else ", alone and in padded batches",  # batch_size=1 never batches
                f"; {compiled}" if compiled else "",
            )
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _write_model(
    fullmodel: FullModel,
    path: str,
    golden: Any,
    conda_env: Any,
    code_paths: list[str] | None,
    mlflow_model: Model | None,
    signature: ModelSignature | Literal[False] | None,
    pip_requirements: Any,
    extra_pip_requirements: Any,
    metadata: dict[str, Any] | None,
    quantization: dict[str, Any] | None,
) -> None:
    spec = save_fullmodel(fullmodel, os.path.join(path, _DATA_SUBPATH), golden, manifest=False,
                          quantization=quantization)
    copy_code_paths(code_paths, path)
    _embed_runtime(os.path.join(path, _CODE_SUBPATH))

    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    if golden is not None:
        example = pd.DataFrame(_records(fullmodel, golden.inputs))
        with warnings.catch_warnings():
            # MLflow compares the example's column names with a range, which pandas 3 deprecates:
            # a warning about MLflow's internals that nobody saving a model can act on.
            warnings.filterwarnings("ignore", message="Operation with range is deprecated")
            save_input_example(mlflow_model, (example, golden.params) if golden.params else example, path)
    if signature is None and golden is not None:
        signature = _infer_signature(fullmodel, golden)
    if signature:
        if signature.params is None and fullmodel.params:
            signature = ModelSignature(signature.inputs, signature.outputs, _param_schema(fullmodel))
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata

    pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        data=_DATA_SUBPATH,
        code=_CODE_SUBPATH,
        conda_env=CONDA_ENV_FILE,
        python_env=PYTHON_ENV_FILE,
        # Declared so that MLflow passes load-time overrides through (it drops unknown keys);
        # None means: the MLFLOW_FULLMODEL_* environment variable, else the default.
        model_config=dict.fromkeys(ServingSettings.names()),
        # pyfunc's predict_stream reaches ServedModel.predict_stream; a model whose forward strategy
        # cannot stream says so there, naming its strategy, rather than MLflow "does not support" it.
        streamable=True,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        data=_DATA_SUBPATH,
        code=_CODE_SUBPATH,
        format_version=FORMAT_VERSION,
        mlflow_fullmodel_version=mlflow_fullmodel.__version__,
        modules={name: entry["format"] for name, entry in spec["modules"].items()},
        **_forward_facts(spec),
    )
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        defaults = None
        if pip_requirements is None:
            step_requirements = [r if "==" in r else _pinned(r) for r in spec["requirements"]]
            defaults = sorted(set(get_default_pip_requirements()) | set(step_requirements))
        conda_env, pip_requirements, pip_constraints = process_pip_requirements(
            defaults, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = process_conda_env(conda_env)
    with open(os.path.join(path, CONDA_ENV_FILE), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_text(os.path.join(path, CONSTRAINTS_FILE), "\n".join(pip_constraints))
    write_text(os.path.join(path, REQUIREMENTS_FILE), "\n".join(pip_requirements))
    PythonEnv.current().to_yaml(os.path.join(path, PYTHON_ENV_FILE))
    facts = describe_model(path, _DATA_SUBPATH)
    write_text(os.path.join(path, CARD_FILE), render_card(facts))
    write_text(os.path.join(path, PIPELINE_FILE), render_pipeline(facts))
    manifest = write_manifest(path)  # last: it covers every file above
    saved = _SAVED.get()
    if saved is not None:
        saved.append(_Saved(manifest, summary(facts)))


def _check_drift(measured: Mapping[str, Any], max_drift: float | None) -> None:
    if max_drift is None:
        return
    if measured["largest_difference"] > max_drift or measured["agreement"] < 1:
        raise DriftError(
            f"The int8 model drifts from the float one on the golden example more than max_drift={max_drift} allows: "
            f"labels agree on {measured['agreement']:.0%} of {measured['rows']} row(s), the largest difference of an "
            f"output number is {measured['largest_difference']:.3g}. Save it unquantized, or raise max_drift if that "
            "drift is acceptable."
        )


def _forward_facts(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What the MLmodel file's flavor block says of a compiled or quantized forward pass."""
    facts: dict[str, Any] = {}
    compiled = {name: {"compiler": entry["compiled"]["compiler"], **entry["compiled"]["target"]}
                for name, entry in spec["modules"].items() if "compiled" in entry}
    if compiled:
        facts["compiled"] = compiled
    if "quantization" in spec:
        facts["quantized"] = {key: spec["quantization"][key] for key in ("scheme", "library")}
    return facts


def check_parity_of(model_path: str, digests: list[list[str]] | None = None) -> str | None:
    """Run the parity check on the local MLflow model at ``model_path`` with its embedded runtime;
    return what it found of compiled modules (``parity.check_parity``).

    Raises:
        ParityError: The model, loaded in a clean process, does not reproduce its golden example.
    """
    flavor = flavor_configuration(model_path)
    return check_parity(
        os.path.join(model_path, flavor["data"]),
        runtime_dir=os.path.join(model_path, flavor["code"]),
        digests=digests,
        root=model_path,
    )


def flavor_configuration(model_path: str) -> dict[str, Any]:
    """The fullmodel flavor block of the MLflow model at ``model_path``, with its format version
    and folders checked.

    Raises:
        ModelFormatError: The model has no fullmodel flavor, or one of another format version.
        IntegrityError: Its folders are not inside the model.
    """
    try:
        flavor = get_flavor_configuration(model_path, FLAVOR_NAME)
    except MlflowException as error:
        raise ModelFormatError(f"{model_path} is not a fullmodel MLflow model: {error.message}") from None
    version = flavor.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"The fullmodel flavor of {model_path} has format version {version!r}; this mlflow_fullmodel "
            f"reads version {FORMAT_VERSION}. Load it with the release that saved it (the runtime "
            "embedded in the model's code folder), or save it again."
        )
    for key in ("data", "code"):
        confined_path(flavor.get(key), f"the fullmodel flavor's '{key}' folder")
    return flavor


def _embed_runtime(code_dir: str) -> None:
    source = os.path.dirname(os.path.abspath(mlflow_fullmodel.__file__))
    shutil.copytree(
        source,
        os.path.join(code_dir, "mlflow_fullmodel"),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


def _split_example(fullmodel: FullModel, input_example: Any) -> tuple[list[Any] | None, dict[str, Any]]:
    if input_example is None:
        return None, {}
    params: dict[str, Any] = {}
    if isinstance(input_example, tuple) and len(input_example) == 2 and isinstance(input_example[1], Mapping):
        input_example, params = input_example[0], dict(input_example[1])
    rows = fullmodel._rows(input_example)
    if not rows:
        raise ConfigError("input_example has no rows; give at least one raw input.")
    return rows, params


def _records(fullmodel: FullModel, rows: list[Any]) -> list[dict[str, Any]]:
    if len(fullmodel.input_columns) == 1:
        return [{fullmodel.input_columns[0]: row} for row in rows]
    return list(rows)


def _infer_signature(fullmodel: FullModel, golden: Any) -> ModelSignature:
    records = _records(fullmodel, golden.inputs)
    columns: list[ColSpec | TensorSpec] = []
    for column in fullmodel.input_columns:
        kind = type(records[0][column])
        if kind not in _SCHEMA_TYPES:
            raise ConfigError(
                f"input_example column '{column}' holds {kind.__name__} values; raw inputs must be "
                f"one of {[t.__name__ for t in _SCHEMA_TYPES]}, or pass signature= explicitly."
            )
        columns.append(ColSpec(_SCHEMA_TYPES[kind], column))
    inputs, outputs = Schema(columns), infer_schema(golden.outputs)
    if fullmodel.params:
        return ModelSignature(inputs, outputs, _param_schema(fullmodel))
    return ModelSignature(inputs, outputs)


def _param_schema(fullmodel: FullModel) -> ParamSchema:
    return ParamSchema(
        [ParamSpec(name, _SCHEMA_TYPES[param.type], param.default) for name, param in fullmodel.params.items()]
    )


def log_model(
    fullmodel: FullModel,
    artifact_path: str | None = None,
    conda_env: dict[str, Any] | str | None = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | Literal[False] | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for: int = DEFAULT_AWAIT_REGISTRATION_S,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    check_parity: bool = True,
    compile: Literal["aoti"] | None = None,
    compile_rtol: float = DEFAULT_RTOL,
    quantize: Literal["int8"] | None = None,
    max_drift: float | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Log a FullModel to the current MLflow run (or as a logged model) and optionally register it.

    The digest of the model's manifest is recorded in the tracking store, where write access to the
    artifact store cannot change it: tag ``fullmodel.digest`` of the logged model and of the model
    version (which also gets the manifest, ``fullmodel.manifest``), ``fullmodel.digest.<name>`` of
    the run. ``mlflow-fullmodel verify`` checks downloaded files against it. A registered version
    without a description gets the model card's summary as its description.

    Args:
        fullmodel: The FullModel to log.
        artifact_path: Deprecated by MLflow; use ``name``.
        conda_env, code_paths, signature, input_example, pip_requirements,
        extra_pip_requirements, metadata, check_parity, compile, compile_rtol, quantize,
        max_drift: As for ``save_model``.
        registered_model_name: Register the model under this name (created if missing).
        await_registration_for: Seconds to wait for the model version to become ready.
        params, tags, model_type, step, model_id: Passed to ``mlflow.models.Model.log``.
        name: The model's name in the run.

    Returns:
        MLflow's ``ModelInfo`` for the logged model (``model_uri``, ``signature``, ...).

    Example::

        with mlflow.start_run():
            info = fm.log_model(model, name="model", input_example=["What a film!"],
                                registered_model_name="reviews")
        loaded = mlflow.pyfunc.load_model(info.model_uri)
    """
    saved: list[_Saved] = []
    token = _SAVED.set(saved)
    try:
        info = Model.log(
            artifact_path=artifact_path,
            name=name,
            flavor=sys.modules[__name__],
            fullmodel=fullmodel,
            conda_env=conda_env,
            code_paths=code_paths,
            registered_model_name=registered_model_name,
            signature=signature,
            input_example=input_example,
            await_registration_for=await_registration_for,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            metadata=metadata,
            check_parity=check_parity,
            compile=compile,
            compile_rtol=compile_rtol,
            quantize=quantize,
            max_drift=max_drift,
            params=params,
            tags=tags,
            model_type=model_type,
            step=step,
            model_id=model_id,
            **kwargs,
        )
    finally:
        _SAVED.reset(token)
    record_digest(info, saved[-1].manifest, registered_model_name, description=saved[-1].summary)
    _announce.info("Model card: %s/%s (shown in the MLflow UI with the logged model's artifacts).",
                   info.model_uri, CARD_FILE)
    return info


def load_model(model_uri: str, dst_path: str | None = None, device: str = "cpu", compiled: bool = True) -> FullModel:
    """Load a fullmodel MLflow model as a ``FullModel``, after checking every file against the
    model's manifest, the flavor's format version, and the spec's paths and steps.

    Args:
        model_uri: ``runs:/<run_id>/<name>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
            ``models:/<model_id>`` or a local path.
        dst_path: A local folder to download the model into; a temporary one by default.
        device: Where the forward pass runs: ``"cpu"`` or ``"cuda[:index]"``.
        compiled: Run a module's AOTInductor package (``save_model(compile="aoti")``) where it was
            compiled for this machine and ``device`` (else its portable program, with a log line
            saying why); False: always the portable program.

    Raises:
        IntegrityError: A file of the model was changed, removed or added since it was saved, or
            its spec names a path outside the model or a step that is not the model's own.
        ModelFormatError: The model was saved in another format version.

    Example::

        model = fm.load_model("models:/reviews@champion")
        model.predict(["What a film!"], params={"k": 2})
    """
    return _load_checked(download_artifacts(model_uri, output_path=dst_path), device, compiled)


def _load_checked(model_path: str, device: str, compiled: bool = True) -> FullModel:
    """The FullModel of the local MLflow model at ``model_path``: every file checked against the
    manifest first, then the flavor block (read only once it is known intact), then the spec."""
    manifest = verify_manifest(model_path)
    flavor = flavor_configuration(model_path)
    return load_fullmodel(os.path.join(model_path, flavor["data"]), device, root=model_path, manifest=manifest,
                          compiled=compiled)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ServedModel:
    """Called by ``mlflow.pyfunc.load_model``. ``model_config`` (or, for ``mlflow models serve``,
    the ``MLFLOW_FULLMODEL_*`` environment variables) sets the serving settings of
    ``settings.ServingSettings``."""
    try:
        settings = ServingSettings.resolve(model_config)
    except ConfigError as error:
        raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
    root = os.path.dirname(os.path.normpath(path))
    try:
        fullmodel = _load_checked(root, settings.device)
    except FullModelError as error:
        raise MlflowException(str(error)) from error
    set_thread_count(settings)  # process-wide: only for a model that passed its checks
    signature = Model.load(os.path.join(root, MLMODEL_FILE_NAME)).signature
    outputs = signature.outputs.input_names() if signature is not None and signature.outputs is not None else []
    inputs = signature.inputs.inputs if signature is not None and signature.inputs is not None else []
    types = {str(c.name): c.type.name for c in inputs if isinstance(getattr(c, "type", None), DataType)}
    return serve(fullmodel, settings, [str(name) for name in outputs], types)
