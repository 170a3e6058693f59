"""The parity check: a saved model, loaded in a fresh Python process, must reproduce its golden
example.

The fresh process runs with ``python -I`` (no working directory, no PYTHONPATH, no user site on the
import path) from an empty directory, and imports mlflow_fullmodel only from the runtime embedded in
the model, so a transform that still depends on the training project, a missing artifact or a
non-deterministic step shows up at save time instead of in production.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from mlflow_fullmodel._hashing import hash_tensor
from mlflow_fullmodel.compiled import Target
from mlflow_fullmodel.exceptions import FullModelError, ParityError
from mlflow_fullmodel.pipeline import FullModel, apply_step, records_frame, step_label
from mlflow_fullmodel.storage import Golden, load_fullmodel, read_golden, read_spec

__all__ = ["batch_invariance_problems", "check_parity", "compare_outputs", "golden_problems", "preprocess_digests"]

_logger = logging.getLogger(__name__)

REL_TOL = 1e-5
ABS_TOL = 1e-6

# Runs in the child process: only the standard library may be imported before the runtime path is
# fixed, and the installed mlflow_fullmodel (if any) must not be the one found.
_CHILD = r"""
import importlib.machinery, json, sys
runtime, folder, root = sys.argv[1], sys.argv[2], sys.argv[3]
expected = json.loads(sys.stdin.read())  # on stdin: one argv element holds at most 128 KiB

class _EmbeddedRuntimeOnly:
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow_fullmodel":
            spec = importlib.machinery.PathFinder.find_spec(name, [runtime])
            if spec is None:
                raise ModuleNotFoundError("mlflow_fullmodel is not embedded in " + runtime)
            return spec
        return None

sys.meta_path.insert(0, _EmbeddedRuntimeOnly())
sys.dont_write_bytecode = True
try:
    from mlflow_fullmodel.parity import _child_report
    report = _child_report(folder, expected, root)
except BaseException as error:
    report = {"error": type(error).__name__ + ": " + str(error)}
print("\n@@parity@@" + json.dumps(report))
"""


def preprocess_digests(model: FullModel, inputs: Sequence[Any]) -> list[list[str]]:
    """For each input row, a digest of the output of each pre-processing step (run as ``predict``
    runs them, with the saved defaults)."""
    values = model._resolve_params(None)
    examples = model._rows(inputs)
    ids = list(range(len(examples)))
    digests: list[list[str]] = [[] for _ in examples]
    for index, step in enumerate(model.preprocess):
        ids, examples = apply_step(step, step_label("preprocess", index), ids, examples, values)
        for row, example in zip(ids, examples):
            digests[row].append(_digest(example))
    return digests


def _digest(value: Any) -> str:
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            hash_tensor(digest, v)
        elif isinstance(v, dict):
            for k in v:
                digest.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            digest.update(repr(v).encode())

    feed(value)
    return digest.hexdigest()[:16]


def compare_outputs(
    expected: pd.DataFrame, actual: pd.DataFrame, names: tuple[str, str] = ("expected", "got"),
    rel_tol: float = REL_TOL,
) -> list[str]:
    """Differences between two prediction frames: exact for strings and integers, ``rel_tol`` for
    floats (and an absolute tolerance of ``rel_tol / 100``, at least ``ABS_TOL``, for values near
    zero). An empty list means they agree; ``names`` says which is which in the messages."""
    if list(expected.columns) != list(actual.columns):
        return [f"output columns differ: expected {list(expected.columns)}, got {list(actual.columns)}"]
    if len(expected) != len(actual):
        return [f"expected {len(expected)} rows, got {len(actual)}"]
    problems = []
    for column in expected.columns:
        for row, (want, got) in enumerate(zip(expected[column].tolist(), actual[column].tolist())):
            if not _close(want, got, rel_tol):
                problems.append(f"row {row}, column '{column}': {names[0]} {want!r}, {names[1]} {got!r}")
    return problems


def _close(want: Any, got: Any, rel_tol: float) -> bool:
    if hasattr(want, "tolist"):
        want = want.tolist()
    if hasattr(got, "tolist"):
        got = got.tolist()
    if isinstance(want, float) or isinstance(got, float):
        if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(want, bool):
            return math.isclose(want, got, rel_tol=rel_tol, abs_tol=max(ABS_TOL, rel_tol / 100)) or (
                math.isnan(want) and math.isnan(got))
        return False
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(want) == len(got) and all(_close(w, g, rel_tol) for w, g in zip(want, got))
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(_close(want[k], got[k], rel_tol) for k in want)
    return type(want) is type(got) and want == got


def tolerance(model: FullModel) -> float:
    """The relative tolerance ``model``'s outputs are held to against its golden ones: ``REL_TOL``,
    or the larger one its compiled modules were saved with (AOTInductor reorders floating-point
    sums)."""
    return max([REL_TOL, *(module.rtol for module in model.module.compiled.values())])


def batch_tolerance(model: FullModel, spec: Mapping[str, Any]) -> float:
    """The relative tolerance of the batch check of ``model``, saved with ``spec``: ``tolerance``, or
    an int8 model's quantization tolerance: the other rows of a batch change float rounding
    before a layer's activations are quantized, and a value that crosses an int8 step moves the
    outputs by about 1e-3, far more than any rounding of a float model."""
    quantization = spec.get("quantization")
    rtol = quantization.get("rtol") if isinstance(quantization, Mapping) else None
    return max(tolerance(model), float(rtol) if isinstance(rtol, (int, float)) else REL_TOL)


def batch_invariance_problems(
    model: FullModel, inputs: Sequence[Any], params: Mapping[str, Any] | None = None, rel_tol: float | None = None,
) -> list[str]:
    """Where ``model`` answers a row differently alone and inside a batch; empty if nowhere.

    Each row is answered on its own (a batch of one), then all rows together in reverse order in
    batches as full as ``batch_size`` allows, padded to the longest row of each batch. A module
    that reads its padding (a mean over the padded length, no mask) or its neighbours passes the
    golden check row by row and still answers differently under load; this finds it. A model with
    ``batch_size=1`` never batches and passes. ``rel_tol`` is ``tolerance(model)`` by default; an
    int8 model's is its quantization's (``batch_tolerance``).
    """
    if model.batch_size == 1:
        return []
    expected = records_frame([model.predict_records([row], params)[0] for row in inputs])

    def reversed_full_batches(examples: list[Any], values: Mapping[str, Any]) -> list[Any]:
        order = list(range(len(examples)))[::-1]
        batches = [order[start : start + model.batch_size] for start in range(0, len(order), model.batch_size)]
        return model._forward_examples(examples, values, batches=batches)

    batched = records_frame(model._predict_records(list(inputs), params, forward_examples=reversed_full_batches))
    return compare_outputs(expected, batched, names=("alone", "in a padded batch"),
                           rel_tol=tolerance(model) if rel_tol is None else rel_tol)


def golden_problems(model: FullModel, folder: str) -> list[str]:
    """Where ``model`` (as loaded by whichever runtime runs this) does not reproduce the golden
    example saved in ``folder``, with the saved params and each variant's; empty if nowhere. A
    compiled model is held to its compiled modules' tolerance (``tolerance``)."""
    golden = read_golden(folder)
    if golden is None:
        return ["the model has no golden example to check"]
    rel_tol = tolerance(model)
    problems = compare_outputs(golden.outputs, model.predict(golden.inputs, golden.params), rel_tol=rel_tol)
    for params, outputs in golden.variants:
        try:
            differences = compare_outputs(outputs, model.predict(golden.inputs, params), rel_tol=rel_tol)
        except FullModelError as error:
            differences = [f"{type(error).__name__}: {error}"]
        problems += [f"with params {params}: {difference}" for difference in differences]
    return problems


def _child_report(folder: str, expected_digests: list[list[str]] | None, root: str) -> dict[str, Any]:
    import mlflow_fullmodel

    model = load_fullmodel(folder, root=root, compiled=False)
    spec = read_spec(folder)  # checked against the manifest by load_fullmodel
    golden = read_golden(folder)
    if golden is None:
        return {"error": "the model has no golden example to check"}
    report: dict[str, Any] = {"runtime": os.path.dirname(mlflow_fullmodel.__file__)}
    report["problems"] = golden_problems(model, folder)
    report["batch_problems"] = batch_invariance_problems(model, golden.inputs, golden.params,
                                                         batch_tolerance(model, spec))
    if report["problems"] and expected_digests is not None:
        actual = preprocess_digests(model, golden.inputs)
        for row, (want, got) in enumerate(zip(expected_digests, actual)):
            for index, (w, g) in enumerate(zip(want, got)):
                if w != g:
                    step = type(model.preprocess[index]).__name__
                    label = step_label("preprocess", index)
                    report["problems"].insert(0, f"row {row}: the output of {label} {step} differs")
                    break
    if any("compiled" in entry for entry in spec["modules"].values()):
        report["compiled"] = _compiled_report(folder, root, golden, spec)
    return report


def _compiled_report(folder: str, root: str, golden: Golden, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The compiled modules' part of the check: the model loaded as it will be served (its
    AOTInductor packages where they run here), against the golden outputs within its tolerance."""
    model = load_fullmodel(folder, root=root)
    if not model.module.compiled:
        reasons = [Target.from_json(entry["compiled"]["target"]).mismatch(Target.here("cpu")) or "it did not load"
                   for entry in spec["modules"].values() if "compiled" in entry]
        return {"ran": False, "reason": "; ".join(reasons)}
    return {"ran": True, "modules": sorted(model.module.compiled), "rtol": tolerance(model),
            "problems": golden_problems(model, folder),
            "batch_problems": batch_invariance_problems(model, golden.inputs, golden.params,
                                                        batch_tolerance(model, spec))}


def check_parity(
    folder: str,
    runtime_dir: str | None = None,
    digests: list[list[str]] | None = None,
    timeout: float = 600,
    root: str | None = None,
    python: str | None = None,
) -> str | None:
    """Load the model in ``folder`` in a fresh process and compare its golden outputs: the portable
    modules exactly, then, for a model with AOTInductor packages, the model as it is served (the
    packages that run on this machine) within their tolerance. Returns what was found of the
    compiled modules (checked, or why they cannot run here), None for a model without.

    Args:
        folder: A saved FullModel folder with a ``golden.json``.
        runtime_dir: The folder holding the ``mlflow_fullmodel`` package to load with (the MLflow
            model's ``code`` folder); by default the package this process runs.
        digests: What ``preprocess_digests`` gave in the saving process; when given, a
            mismatch also names the first pre-processing step whose output differs.
        timeout: Seconds the child process may take.
        root: The folder whose manifest covers ``folder`` (the MLflow model's root); ``folder``
            itself by default.
        python: The interpreter of the fresh process (one of another environment); this one's
            by default.

    Raises:
        ParityError: The model failed to load in the fresh process (``stage`` "import"), its
            outputs differ (``stage`` "outputs"), or a row's outputs change inside a padded batch
            (``stage`` "batch", see ``batch_invariance_problems``).
    """
    import mlflow_fullmodel

    runtime_dir = runtime_dir or os.path.dirname(os.path.dirname(mlflow_fullmodel.__file__))
    with tempfile.TemporaryDirectory(prefix="fullmodel-parity-") as cwd:
        try:
            result = subprocess.run(
                [python or sys.executable, "-I", "-c", _CHILD, os.path.abspath(runtime_dir), os.path.abspath(folder),
                 os.path.abspath(root or folder)],
                input=json.dumps(digests),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise ParityError(f"The parity check of {folder} did not finish within {timeout:.0f} s: loading the model "
                              "or answering its golden example in a clean process takes longer than that.",
                              stage="timeout") from None
    marker = result.stdout.rfind("@@parity@@")
    if marker < 0:
        raise ParityError(
            f"The parity check process for {folder} exited with code {result.returncode} without a "
            f"report:\n{result.stderr[-3000:]}",
            stage="import",
        )
    report = json.loads(result.stdout[marker + len("@@parity@@") :])
    if "error" in report:
        raise ParityError(
            f"The saved model failed to load or predict in a clean process (no training code on the "
            f"import path): {report['error']}",
            stage="import",
        )
    if report["problems"]:
        shown = "\n  ".join(report["problems"][:10])
        raise ParityError(
            f"The saved model, reloaded in a clean process, does not reproduce the outputs of the "
            f"training process:\n  {shown}\nA pre-processing step may depend on state that is not "
            "saved (a global, a random generator without a seed, a file outside an Artifact)."
        )
    if report["batch_problems"]:
        shown = "\n  ".join(report["batch_problems"][:10])
        raise ParityError(
            f"The model is batch-sensitive: a golden row answers differently alone and inside a padded batch of "
            f"other rows:\n  {shown}\nThe module probably reads its padding (a mean or sum over the padded "
            "length, attention without a mask): mask the padded positions with the batch's lengths. Or, if the "
            "model must see one row at a time, set batch_size=1 explicitly on the FullModel.",
            stage="batch",
        )
    compiled = report.get("compiled")
    if compiled and compiled["ran"] and (compiled["problems"] or compiled["batch_problems"]):
        shown = "\n  ".join((compiled["problems"] + compiled["batch_problems"])[:10])
        raise ParityError(
            f"The AOTInductor package of module(s) {compiled['modules']} answers further from the golden outputs than "
            f"its relative tolerance {compiled['rtol']:g} (the portable program reproduces them):\n  {shown}\n"
            "Raise compile_rtol if the difference is acceptable, or save without compile.",
            stage="compiled",
        )
    _logger.info("Parity check passed for %s (runtime %s).", folder, report["runtime"])
    if not compiled:
        return None
    if not compiled["ran"]:
        _logger.warning("The parity check ran the portable program only; the AOTInductor package cannot run here: %s.",
                        compiled["reason"])
        return f"compiled forward not run here ({compiled['reason']})"
    return f"compiled forward within rtol {compiled['rtol']:g}"
