"""The saved-model folder: a readable JSON spec, module archives, artifacts, captured code and a
golden example. Nothing is pickled.

::

    fullmodel.json           format version, steps (import target + JSON config), modules, params,
                             batching, requirements
    modules/<name>.pt|.pt2   TorchScript archive or torch.export program
    artifacts/<step>/<arg>/  the files Artifact arguments pointed to
    code/                    the user's processing code, as source, package layout kept
    golden.json              example inputs, params, and the outputs the saving process produced
    MANIFEST.json            the sha256 of every file (in a bare folder; an MLflow model has one
                             manifest at its root, covering this folder too)

A folder is untrusted input when it is loaded: the manifest is checked before anything else is read,
every path in the spec must stay inside the folder, and every step must be a step class of the
model's captured code or of mlflow_fullmodel (see ``imports.import_steps``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd
import torch

from mlflow_fullmodel import __version__
from mlflow_fullmodel.collate import Collate
from mlflow_fullmodel.compiled import DEFAULT_RTOL, CompiledProgram, Target
from mlflow_fullmodel.exceptions import ConfigError, FullModelError, IntegrityError, ModelFormatError
from mlflow_fullmodel.forward import ForwardStrategy
from mlflow_fullmodel.modules import load_module, resolve_device, save_module
from mlflow_fullmodel.optimize import quiet_import
from mlflow_fullmodel.pipeline import FullModel, step_label
from mlflow_fullmodel.storage.capture import CodeCapture
from mlflow_fullmodel.storage.imports import import_steps
from mlflow_fullmodel.storage.integrity import Manifest, confined_path, read_verified, verify_manifest, write_manifest
from mlflow_fullmodel.transform import Artifact, Configurable, Param, Transform

__all__ = ["ARTIFACT_MARKER", "FORMAT_VERSION", "GOLDEN_FILE", "PARAM_MARKER", "SPEC_FILE", "TUPLE_MARKER", "Golden",
           "VerifiedFiles", "encode_value", "encoded_config", "load_fullmodel", "make_golden", "other_value",
           "read_spec", "rebuilt_step", "save_fullmodel", "step_specs"]

FORMAT_VERSION = 2
SPEC_FILE = "fullmodel.json"
GOLDEN_FILE = "golden.json"
CODE_DIR = "code"
MODULES_DIR = "modules"
ARTIFACTS_DIR = "artifacts"

#: The spec's markers for configuration values JSON has no type for (read by inspection too).
ARTIFACT_MARKER, PARAM_MARKER, TUPLE_MARKER, _BYTES = "$artifact", "$param", "$tuple", "$bytes"

_logger = logging.getLogger(__name__)


def _frame_to_json(frame: pd.DataFrame) -> dict[str, Any]:
    return {"columns": list(frame.columns), "data": encode_value(frame.values.tolist())}


def _frame_from_json(data: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(decode_value(data["data"]), columns=data["columns"])


@dataclass
class Golden:
    """Example inputs and params with the outputs the saving process produced for them, and for
    each runtime parameter the outputs with one other value of it (``variants``)."""

    inputs: list[Any]
    params: dict[str, Any]
    outputs: pd.DataFrame
    variants: list[tuple[dict[str, Any], pd.DataFrame]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [encode_value(v) for v in self.inputs],
            "params": self.params,
            "outputs": _frame_to_json(self.outputs),
            "variants": [{"params": p, "outputs": _frame_to_json(o)} for p, o in self.variants],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Golden:
        variants = [(dict(v["params"]), _frame_from_json(v["outputs"])) for v in data.get("variants", [])]
        return cls([decode_value(v) for v in data["inputs"]], dict(data["params"]), _frame_from_json(data["outputs"]),
                   variants)


@dataclass
class _Plan:
    """Everything to write, computed and checked before the folder is touched."""

    spec: dict[str, Any]
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (source path, relative dest)
    code: dict[str, str] = field(default_factory=dict)


def encode_value(value: Any) -> Any:
    """JSON form of inputs and outputs: bytes become ``{"$bytes": base64}``."""
    if isinstance(value, bytes):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: encode_value(v) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item() if getattr(value, "ndim", 0) == 0 else encode_value(value.tolist())
    return value


def decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES}:
            return base64.b64decode(value[_BYTES])
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def _slug(label: str, step: Configurable) -> str:
    return label.replace("[", "-").replace("]", "") + "-" + type(step).__name__


def _encode_config(step: Configurable, label: str, plan: _Plan) -> dict[str, Any]:
    step.check_attributes()
    encoded: dict[str, Any] = {}
    for name, value in step.get_config().items():
        where = f"{label} {type(step).__name__}, argument '{name}'"
        if isinstance(value, Artifact):
            if not os.path.exists(value.path):
                raise ConfigError(f"{where}: the artifact {value.path!r} does not exist.")
            dest = f"{ARTIFACTS_DIR}/{_slug(label, step)}/{name}/{os.path.basename(os.path.normpath(value.path))}"
            plan.artifacts.append((value.path, dest))
            encoded[name] = {ARTIFACT_MARKER: dest}
        elif isinstance(value, Param):
            encoded[name] = {PARAM_MARKER: value.to_dict()}
        else:
            encoded[name] = _encode_plain(value, where)
    return encoded


def _encode_plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} cannot be stored in JSON; use a finite number.")
        return value
    if isinstance(value, list):
        return [_encode_plain(v, where) for v in value]
    if isinstance(value, tuple):
        return {TUPLE_MARKER: [_encode_plain(v, where) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode_plain(v, where) for k, v in value.items()}
    raise ConfigError(
        f"{where}: a value of type {type(value).__name__} cannot be saved as JSON. Configuration "
        "must be numbers, strings, booleans, None, or lists/tuples/dicts of them; pass files as "
        "Artifact(path) and compute tensors inside the transform from such values."
    )


def _decode_config(config: Mapping[str, Any], files: VerifiedFiles, label: str) -> dict[str, Any]:
    return {name: _decode_plain(value, files, f"{label}, argument '{name}'") for name, value in config.items()}


def encoded_config(step: Configurable, label: str = "step") -> dict[str, Any]:
    """The configuration of ``step`` as the spec saves it (JSON values; files as artifact markers),
    or the ``ConfigError`` saving it would raise."""
    return _encode_config(step, label, _Plan(spec={}))


def _copy_artifacts(plan: _Plan, folder: str) -> None:
    """Copy the plan's artifact files and folders to their places under ``folder``."""
    for source, dest in plan.artifacts:
        target = os.path.join(folder, dest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(source):
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)


def rebuilt_step(step: Configurable, folder: str) -> Configurable:
    """``step`` rebuilt from its saved configuration, as loading a model rebuilds it: its JSON
    round trip, with its artifacts copied into ``folder`` and the step pointed at the copies, read
    through the same hash checks a loaded model's are. The unit of the save-and-load contract every
    step keeps (``tests/contract.py``)."""
    plan = _Plan(spec={})
    encoded = json.loads(json.dumps(_encode_config(step, "step", plan)))
    _copy_artifacts(plan, folder)
    files = VerifiedFiles(folder, "", Manifest.of_folder(folder, skip_bytecode=True).files)
    return type(step)(**_decode_config(encoded, files, "step"))


def _decode_plain(value: Any, files: VerifiedFiles, where: str) -> Any:
    if isinstance(value, list):
        return [_decode_plain(v, files, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {ARTIFACT_MARKER}:
            return files.artifact(value[ARTIFACT_MARKER], where)
        if set(value) == {PARAM_MARKER}:
            return Param.from_dict(value[PARAM_MARKER])
        if set(value) == {TUPLE_MARKER}:
            return tuple(_decode_plain(v, files, where) for v in value[TUPLE_MARKER])
        return {k: _decode_plain(v, files, where) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class VerifiedFiles:
    """The files of a loaded model, checked against its manifest; the spec's paths resolve here."""

    root: str
    folder: str  # the FullModel folder, relative to root with a trailing "/" ("" when it is root)
    hashes: Mapping[str, str]

    def _key(self, relative: Any, what: str) -> str:
        return self.folder + confined_path(relative, what)

    def path(self, relative: Any, what: str) -> str:
        """The local path of a file of the model."""
        key = self._key(relative, what)
        if key not in self.hashes:
            raise IntegrityError(f"{what}: {relative!r} is not a file of the model (not in its manifest).")
        return os.path.join(self.root, *key.split("/"))

    def read(self, relative: Any, what: str) -> bytes:
        path = self.path(relative, what)
        return read_verified(path, self.hashes[self._key(relative, what)])

    def artifact(self, relative: Any, what: str) -> Artifact:
        """A file artifact carries its hash, so it is checked again when it is read."""
        key = self._key(relative, what)
        if key in self.hashes:
            return Artifact(self.path(relative, what), sha256=self.hashes[key])
        if not any(k.startswith(key + "/") for k in self.hashes):
            raise IntegrityError(f"{what}: the artifact {relative!r} is not part of the model (not in its manifest).")
        return Artifact(os.path.join(self.root, *key.split("/")))


def _plan(model: FullModel) -> _Plan:
    plan = _Plan(spec={})
    capture = CodeCapture()
    steps = {}
    for label, step in model.steps():
        steps[label] = {"target": capture.add(type(step), label), "config": _encode_config(step, label, plan)}
    capture.finish()
    plan.code = capture.files
    requirements = set(capture.requirements)
    for _, step in model.steps():
        requirements.update(getattr(step, "requirements", ()))
    owners = {name: label for label, step in model.steps() for name in step.params()}  # on_error: the model's
    plan.spec = {
        "format_version": FORMAT_VERSION,
        "mlflow_fullmodel_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "input_columns": model.input_columns,
        "batch_size": model.batch_size,
        "preprocess": [steps[step_label("preprocess", i)] for i in range(len(model.preprocess))],
        "collate": steps["collate"],
        "forward": steps["forward"],
        "postprocess": [steps[step_label("postprocess", i)] for i in range(len(model.postprocess))],
        "modules": {},
        "params": {
            name: {**param.to_dict(), "type": param.type.__name__, "step": owners.get(name, "model")}
            for name, param in model.params.items()
        },
        "code": sorted(f"{CODE_DIR}/{p}" for p in plan.code),
        "requirements": sorted(requirements),
    }
    return plan


def save_fullmodel(
    model: FullModel, folder: str, golden: Golden | None = None, *, manifest: bool = True,
    quantization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` into the empty or missing ``folder`` and return its spec.

    ``quantization`` says how the modules were quantized (``optimize.quantize_modules``), with the
    drift measured; the library it names becomes a requirement of the model.

    Everything that can be checked (configuration as JSON, code capture) is checked before anything
    is written; if writing fails, the folder is removed again. With ``manifest=False`` the caller
    writes the manifest, in a folder around this one (the MLflow model's root).
    """
    if not isinstance(model, FullModel):
        raise TypeError(f"Expected a FullModel, got {type(model).__name__}.")
    plan = _plan(model)
    if quantization is not None:
        plan.spec["quantization"] = dict(quantization)
        plan.spec["requirements"] = sorted({*plan.spec["requirements"], quantization["requirement"]})
    if os.path.exists(folder) and os.listdir(folder):
        raise ConfigError(f"Path '{folder}' already exists and is not empty.")
    try:
        os.makedirs(os.path.join(folder, MODULES_DIR), exist_ok=True)
        for name, module in model.module.items():
            entry = save_module(module, os.path.join(folder, MODULES_DIR), name)
            entry["file"] = f"{MODULES_DIR}/{entry['file']}"
            if "compiled" in entry:
                entry["compiled"]["file"] = f"{MODULES_DIR}/{entry['compiled']['file']}"
            plan.spec["modules"][name] = entry
        _copy_artifacts(plan, folder)
        for relative, source in plan.code.items():
            target = os.path.join(folder, CODE_DIR, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(source)
        if golden is not None:
            _write_json(os.path.join(folder, GOLDEN_FILE), golden.to_json())
        _write_json(os.path.join(folder, SPEC_FILE), plan.spec)
        if manifest:
            write_manifest(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return plan.spec


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")


def read_spec(folder: str) -> dict[str, Any]:
    """The spec of the FullModel saved in ``folder``, with its format version checked."""
    path = os.path.join(folder, SPEC_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ModelFormatError(f"{folder} is not a saved FullModel: it has no {SPEC_FILE}.") from None
    return _parse_spec(text, path)


def _parse_spec(text: str, path: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{path} is not valid JSON: {error}.") from None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ModelFormatError(
            f"{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION}. "
            + ("Upgrade mlflow-fullmodel to load it." if newer else
               "Load it with the mlflow_fullmodel runtime embedded in the MLflow model, or save it again.")
        )
    return spec


def step_specs(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The spec's steps in data-path order, by label: ``preprocess[0]``, ..., ``collate``,
    ``forward``, ``postprocess[0]``, ..."""
    steps = {step_label("preprocess", i): s for i, s in enumerate(spec["preprocess"])}
    steps.update(collate=spec["collate"], forward=spec["forward"])
    steps.update({step_label("postprocess", i): s for i, s in enumerate(spec["postprocess"])})
    return steps


def read_golden(folder: str) -> Golden | None:
    path = os.path.join(folder, GOLDEN_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return Golden.from_json(json.load(f))


def load_fullmodel(
    folder: str, device: str | torch.device = "cpu", root: str | None = None, manifest: Manifest | None = None,
    compiled: bool = True,
) -> FullModel:
    """Load the FullModel saved in ``folder``, treating the folder as untrusted input.

    Before anything of the model is used, every file is checked against the manifest of ``root``;
    then every path in the spec must name a file of that manifest, and every step must be a step
    class of the model's captured code or of mlflow_fullmodel. Only then is captured code imported.
    The spec and the module archives are used as the bytes that were checked.

    Args:
        folder: The FullModel folder.
        device: Where the forward pass runs.
        root: The folder whose manifest covers ``folder``: the MLflow model's root for an MLflow
            model; ``folder`` itself by default.
        manifest: The manifest of ``root`` as ``verify_manifest`` just returned it, when the caller
            checked the files itself (to read the MLmodel file first); checked here otherwise.
        compiled: Run a module's AOTInductor package where it was compiled for this machine and
            ``device``; False: always the portable program.

    Raises:
        IntegrityError: A file is changed, missing or extra, or the spec names something outside the
            model.
        ModelFormatError: The spec has another format version or cannot be read.
    """
    root = folder if root is None else root
    inside = os.path.relpath(folder, root).replace(os.sep, "/")
    prefix = "" if inside == "." else confined_path(inside, "the FullModel folder") + "/"
    files = VerifiedFiles(root, prefix, (manifest or verify_manifest(root)).files)
    spec = _parse_spec(files.read(SPEC_FILE, "the spec").decode("utf-8"), os.path.join(folder, SPEC_FILE))

    if isinstance(spec.get("quantization"), Mapping):  # its weights are torchao's tensors
        quiet_import("torchao", "This model, quantized with torchao,")
    specs = step_specs(spec)
    classes = import_steps({label: s["target"] for label, s in specs.items()}, os.path.join(folder, CODE_DIR))
    steps = {label: classes[label](**_decode_config(s["config"], files, label)) for label, s in specs.items()}

    device = resolve_device(device)
    modules = {name: _load_module(name, entry, files, device if compiled else None)
               for name, entry in spec["modules"].items()}
    return FullModel(
        [_step_of(steps, step_label("preprocess", i), Transform) for i in range(len(spec["preprocess"]))],
        modules,
        [_step_of(steps, step_label("postprocess", i), Transform) for i in range(len(spec["postprocess"]))],
        forward=_step_of(steps, "forward", ForwardStrategy),
        collate=_step_of(steps, "collate", Collate),
        input_columns=spec["input_columns"],
        batch_size=spec["batch_size"],
        device=device,
    )


def _load_module(name: str, entry: Mapping[str, Any], files: VerifiedFiles, device: torch.device | None) -> Any:
    """The module of spec ``entry``; with its AOTInductor package when it has one that runs on
    ``device`` here (None: the portable program in any case)."""
    module = load_module(io.BytesIO(files.read(entry["file"], f"module '{name}'")), entry["format"])
    package = entry.get("compiled")
    if not isinstance(package, Mapping) or device is None:
        return module
    target = Target.from_json(package.get("target") or {})
    reason = target.mismatch(Target.here(device.type))
    if reason is None:
        rtol = package.get("rtol")
        compiled = CompiledProgram(module, files.read(package.get("file"), f"the AOTInductor package of module "
                                                      f"'{name}'"), target,
                                   float(rtol) if isinstance(rtol, (int, float)) else DEFAULT_RTOL)
        try:
            compiled.runner()  # loaded now, so that a package that cannot load falls back here, not in serving
        except Exception as error:
            reason = f"its package did not load: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
        else:
            return compiled
    _logger.warning("Module '%s' runs its portable torch.export program, not its AOTInductor package: %s.",
                    name, reason)
    return module


def make_golden(model: FullModel, inputs: list[Any], params: Mapping[str, Any] | None) -> Golden:
    """The golden example: ``model``'s outputs for ``inputs`` with ``params``, and with each runtime
    parameter set to another value within its bounds (one variant per parameter, so a parameter
    that a reloaded model ignores or applies differently shows up in the parity check)."""
    params = dict(params or {})
    golden = Golden(inputs=list(inputs), params=params, outputs=model.predict(inputs, params=params))
    for name, param in model.params.items():
        value = other_value(param, params.get(name, param.default))
        if value is None:
            continue
        variant = {**params, name: value}
        try:
            golden.variants.append((variant, model.predict(inputs, params=variant)))
        except FullModelError as error:  # a value the model refuses with these inputs: no variant
            _logger.info("No golden variant with %s=%r: %s", name, value, error)
    return golden


def other_value(param: Param, current: Any) -> bool | int | float | str | None:
    """A value of ``param`` other than ``current`` that its type, bounds and choices accept, or None."""
    if param.choices is not None:
        return next((c for c in param.choices if c != current), None)
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        candidates: list[Any] = [current + 1, current - 1]
    elif isinstance(current, float):
        candidates = [(current + bound) / 2 for bound in (param.maximum, param.minimum) if bound is not None]
        candidates += [current * 2 if current else 1.0]
    else:
        return None  # a free string: no other value can be guessed
    for value in candidates:
        if value != current and (param.minimum is None or value >= param.minimum) and (
            param.maximum is None or value <= param.maximum
        ):
            return value
    return None


_Step = TypeVar("_Step", bound=Configurable)


def _step_of(steps: Mapping[str, Configurable], label: str, kind: type[_Step]) -> _Step:
    """The loaded step ``label``, which must be a ``kind`` (a Transform, ForwardStrategy or Collate)."""
    step = steps[label]
    if not isinstance(step, kind):
        raise ModelFormatError(
            f"The spec's {label} step is a {type(step).__name__}, not a {kind.__name__}; the model's "
            "spec does not describe a FullModel this version can build."
        )
    return step
