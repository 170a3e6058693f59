"""The saved-model folder: a readable JSON spec, module archives, artifacts, captured code and a
golden example. Nothing is pickled.

::

    fullmodel.json           format version, steps (import target + JSON config), modules, params,
                             batching, requirements and the sha256 of every other file
    modules/<name>.pt|.pt2   TorchScript archive or torch.export program
    artifacts/<step>/<arg>/  the files Artifact arguments pointed to
    code/                    the user's processing code, as source, package layout kept
    golden.json              example inputs, params, and the outputs the saving process produced
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mlflow_fullmodel import __version__
from mlflow_fullmodel.exceptions import ConfigError, ModelFormatError
from mlflow_fullmodel.modules import load_module, save_module
from mlflow_fullmodel.pipeline import FullModel
from mlflow_fullmodel.storage.capture import CodeCapture
from mlflow_fullmodel.storage.imports import import_targets
from mlflow_fullmodel.storage.integrity import hash_files, verify_files
from mlflow_fullmodel.transform import Artifact, Configurable, Param

__all__ = ["FORMAT_VERSION", "SPEC_FILE", "GOLDEN_FILE", "Golden", "load_fullmodel", "read_spec", "save_fullmodel"]

FORMAT_VERSION = 1
SPEC_FILE = "fullmodel.json"
GOLDEN_FILE = "golden.json"
CODE_DIR = "code"
MODULES_DIR = "modules"
ARTIFACTS_DIR = "artifacts"

_ARTIFACT, _PARAM, _TUPLE, _BYTES = "$artifact", "$param", "$tuple", "$bytes"


@dataclass
class Golden:
    """Example inputs and params with the outputs the saving process produced for them."""

    inputs: list[Any]
    params: dict[str, Any]
    outputs: pd.DataFrame

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [encode_value(v) for v in self.inputs],
            "params": self.params,
            "outputs": {"columns": list(self.outputs.columns), "data": encode_value(self.outputs.values.tolist())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Golden:
        outputs = pd.DataFrame(decode_value(data["outputs"]["data"]), columns=data["outputs"]["columns"])
        return cls([decode_value(v) for v in data["inputs"]], dict(data["params"]), outputs)


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
    encoded = {}
    for name, value in step.get_config().items():
        where = f"{label} {type(step).__name__}, argument '{name}'"
        if isinstance(value, Artifact):
            if not os.path.exists(value.path):
                raise ConfigError(f"{where}: the artifact {value.path!r} does not exist.")
            dest = f"{ARTIFACTS_DIR}/{_slug(label, step)}/{name}/{os.path.basename(os.path.normpath(value.path))}"
            plan.artifacts.append((value.path, dest))
            encoded[name] = {_ARTIFACT: dest}
        elif isinstance(value, Param):
            encoded[name] = {_PARAM: value.to_dict()}
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
        return {_TUPLE: [_encode_plain(v, where) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode_plain(v, where) for k, v in value.items()}
    raise ConfigError(
        f"{where}: a value of type {type(value).__name__} cannot be saved as JSON. Configuration "
        "must be numbers, strings, booleans, None, or lists/tuples/dicts of them; pass files as "
        "Artifact(path) and compute tensors inside the transform from such values."
    )


def _decode_config(config: Mapping[str, Any], folder: str) -> dict[str, Any]:
    return {name: _decode_plain(value, folder) for name, value in config.items()}


def _decode_plain(value: Any, folder: str) -> Any:
    if isinstance(value, list):
        return [_decode_plain(v, folder) for v in value]
    if isinstance(value, dict):
        if set(value) == {_ARTIFACT}:
            return Artifact(os.path.join(folder, value[_ARTIFACT]))
        if set(value) == {_PARAM}:
            return Param.from_dict(value[_PARAM])
        if set(value) == {_TUPLE}:
            return tuple(_decode_plain(v, folder) for v in value[_TUPLE])
        return {k: _decode_plain(v, folder) for k, v in value.items()}
    return value


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
    plan.spec = {
        "format_version": FORMAT_VERSION,
        "mlflow_fullmodel_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "input_columns": model.input_columns,
        "batch_size": model.batch_size,
        "preprocess": [steps[f"preprocess[{i}]"] for i in range(len(model.preprocess_steps))],
        "collate": steps["collate"],
        "forward": steps["forward"],
        "postprocess": [steps[f"postprocess[{i}]"] for i in range(len(model.postprocess_steps))],
        "modules": {},
        "params": {
            name: {**param.to_dict(), "type": param.type.__name__, "step": owner}
            for name, (owner, param) in model._param_owner.items()
        },
        "code": sorted(f"{CODE_DIR}/{p}" for p in plan.code),
        "requirements": sorted(requirements),
    }
    return plan


def save_fullmodel(model: FullModel, folder: str, golden: Golden | None = None) -> dict[str, Any]:
    """Write ``model`` into the empty or missing ``folder`` and return its spec.

    Everything that can be checked (configuration as JSON, code capture) is checked before anything
    is written; if writing fails, the folder is removed again.
    """
    if not isinstance(model, FullModel):
        raise TypeError(f"Expected a FullModel, got {type(model).__name__}.")
    plan = _plan(model)
    if os.path.exists(folder) and os.listdir(folder):
        raise ConfigError(f"Path '{folder}' already exists and is not empty.")
    try:
        os.makedirs(os.path.join(folder, MODULES_DIR), exist_ok=True)
        for name, module in model.modules.items():
            filename, kind = save_module(module, os.path.join(folder, MODULES_DIR), name)
            plan.spec["modules"][name] = {"file": f"{MODULES_DIR}/{filename}", "format": kind}
        for source, dest in plan.artifacts:
            target = os.path.join(folder, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copyfile(source, target)
        for relative, source in plan.code.items():
            target = os.path.join(folder, CODE_DIR, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(source)
        if golden is not None:
            _write_json(os.path.join(folder, GOLDEN_FILE), golden.to_json())
        plan.spec["files"] = hash_files(folder, exclude={SPEC_FILE})
        _write_json(os.path.join(folder, SPEC_FILE), plan.spec)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return plan.spec


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")


def read_spec(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, SPEC_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ModelFormatError(f"{folder} is not a saved FullModel: it has no {SPEC_FILE}.") from None
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{path} is not valid JSON: {error}.") from None
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION}. "
            "Load it with the mlflow_fullmodel runtime embedded in the MLflow model."
        )
    return spec


def read_golden(folder: str) -> Golden | None:
    path = os.path.join(folder, GOLDEN_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return Golden.from_json(json.load(f))


def load_fullmodel(folder: str, device: str | torch.device = "cpu") -> FullModel:
    """Load the FullModel saved in ``folder``, after checking every file against its sha256."""
    spec = read_spec(folder)
    verify_files(folder, spec["files"], exclude={SPEC_FILE})
    step_specs = [*spec["preprocess"], spec["collate"], spec["forward"], *spec["postprocess"]]
    classes = import_targets([s["target"] for s in step_specs], os.path.join(folder, CODE_DIR))

    def build(step_spec: Mapping[str, Any]) -> Any:
        return classes[step_spec["target"]](**_decode_config(step_spec["config"], folder))

    modules = {
        name: load_module(os.path.join(folder, entry["file"]), entry["format"])
        for name, entry in spec["modules"].items()
    }
    return FullModel(
        [build(s) for s in spec["preprocess"]],
        modules,
        [build(s) for s in spec["postprocess"]],
        forward=build(spec["forward"]),
        collate=build(spec["collate"]),
        input_columns=spec["input_columns"],
        batch_size=spec["batch_size"],
        device=device,
    )


def make_golden(model: FullModel, inputs: list[Any], params: Mapping[str, Any] | None) -> Golden:
    params = dict(params or {})
    return Golden(inputs=list(inputs), params=params, outputs=model.predict(inputs, params=params))
