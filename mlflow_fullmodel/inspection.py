"""What a saved MLflow model holds, as plain data: for ``inspect``, ``diff`` and the model card.

``describe_model`` reads the files only (the spec, MLmodel, requirements, the golden example); it
imports none of the model's code and loads no module archive.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from mlflow_fullmodel.compiled import Target
from mlflow_fullmodel.storage import read_golden, read_spec, step_specs
from mlflow_fullmodel.storage.folder import ARTIFACT_MARKER, CODE_DIR, PARAM_MARKER, TUPLE_MARKER, encode_value
from mlflow_fullmodel.storage.integrity import MANIFEST_FILE, folder_digest, folder_hashes, read_manifest, sha256_file
from mlflow_fullmodel.transform import param_text

__all__ = ["config_text", "describe_model"]



def describe_model(model_path: str, data: str = "fullmodel") -> dict[str, Any]:
    """The facts of the MLflow model at ``model_path`` (its FullModel in the ``data`` folder).

    Returns a dict with ``inputs``, ``outputs``, ``steps`` (label, target, config), ``artifacts``
    (step, argument, path, size, sha256; a folder's sha256 is its ``folder_digest``, and it has
    ``files``: the sha256 of each file by relative path), ``modules`` (name, file, format, size,
    sha256, methods; ``compiled`` for a module with an AOTInductor package: its file, size, sha256,
    target, tolerance, native libraries, and whether it ``runs_here`` on this machine's CPU, else
    ``why_not``), ``quantization`` (how the modules were quantized, and their drift; None if they
    were not), ``params`` (name, type, default, bounds, choices, step), ``signature``, ``requirements``,
    ``golden`` (inputs, params, outputs, variants), ``code`` (captured sources by path) and
    ``digest`` (None before the manifest is written).
    """
    folder = os.path.join(model_path, data)
    spec = read_spec(folder)
    steps = [{"step": label, "target": s["target"], "config": s["config"]} for label, s in step_specs(spec).items()]
    signature = Model.load(os.path.join(model_path, MLMODEL_FILE_NAME)).signature
    golden = read_golden(folder)
    return {
        "format_version": spec["format_version"],
        "mlflow_fullmodel_version": spec.get("mlflow_fullmodel_version"),
        "torch_version": spec.get("torch_version"),
        "inputs": spec["input_columns"],
        "outputs": [c["name"] for c in signature.outputs.to_dict()] if signature and signature.outputs else [],
        "batch_size": spec["batch_size"],
        "steps": steps,
        "artifacts": [_artifact(folder, step, argument, path) for step, argument, path in _artifacts(steps)],
        "modules": [
            {"name": name, "file": entry["file"], "format": entry["format"], "methods": entry.get("methods", []),
             **_file_facts(os.path.join(folder, entry["file"])),
             **({"compiled": _compiled(folder, entry["compiled"])} if "compiled" in entry else {})}
            for name, entry in spec["modules"].items()
        ],
        "quantization": spec.get("quantization"),
        "params": [{"name": name, **param} for name, param in spec["params"].items()],
        "signature": signature.to_dict() if signature else None,
        "requirements": _requirements(model_path),
        "golden": None if golden is None else {
            "inputs": encode_value(golden.inputs),
            "params": golden.params,
            "outputs": _records(golden.outputs),
            "variants": [{"params": p, "outputs": _records(o)} for p, o in golden.variants],
        },
        "code": _sources(os.path.join(folder, CODE_DIR)),
        "digest": read_manifest(model_path).digest if os.path.exists(os.path.join(model_path, MANIFEST_FILE)) else None,
    }


def _compiled(folder: str, entry: dict[str, Any]) -> dict[str, Any]:
    target = Target.from_json(entry["target"])
    why_not = target.mismatch(Target.here("cpu"))
    return {"file": entry["file"], **_file_facts(os.path.join(folder, entry["file"])), "compiler": entry["compiler"],
            "target": entry["target"], "target_text": str(target), "rtol": entry["rtol"],
            "native": entry.get("native", {}), "runs_here": why_not is None, "why_not": why_not}


def config_text(value: Any) -> str:
    """A spec config value as a person reads it: ``Artifact(path)``, ``Param(1, maximum=3)``, JSON."""
    if isinstance(value, dict):
        if set(value) == {ARTIFACT_MARKER}:
            return f"Artifact({os.path.basename(value[ARTIFACT_MARKER])!r})"
        if set(value) == {PARAM_MARKER}:
            return param_text(value[PARAM_MARKER])
        if set(value) == {TUPLE_MARKER}:
            items = [config_text(v) for v in value[TUPLE_MARKER]]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "{" + ", ".join(f"{k!r}: {config_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(config_text(v) for v in value) + "]"
    return repr(value)


def _artifacts(steps: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            if set(value) == {ARTIFACT_MARKER}:
                yield value[ARTIFACT_MARKER]
            else:
                for item in value.values():
                    yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    for step in steps:
        for argument, value in step["config"].items():
            for path in walk(value):
                yield step["step"], argument, path


def _artifact(folder: str, step: str, argument: str, path: str) -> dict[str, Any]:
    return {"step": step, "argument": argument, "path": path, **_file_facts(os.path.join(folder, path))}


def _file_facts(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        # Hashed from the files, as a file artifact is, with the manifest's walk: for a saved model
        # the digest equals the one derived from its manifest entries under the folder.
        hashes = folder_hashes(path)
        size = sum(os.path.getsize(os.path.join(path, *relative.split("/"))) for relative in hashes)
        return {"size": size, "sha256": folder_digest(hashes), "files": hashes}
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def _requirements(model_path: str) -> list[str]:
    path = os.path.join(model_path, "requirements.txt")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _records(frame: Any) -> list[dict[str, Any]]:
    return [dict(zip(frame.columns, encode_value(row))) for row in frame.values.tolist()]


def _sources(code_dir: str) -> dict[str, str]:
    sources = {}
    for root, dirs, names in os.walk(code_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                sources[os.path.relpath(path, code_dir).replace(os.sep, "/")] = f.read()
    return sources
