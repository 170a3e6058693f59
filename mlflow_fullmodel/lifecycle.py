"""After ``log_model``: inspect a model, see what changed between two, promote a version by alias
only once it is verified, and roll an alias back.

``promote`` is the registry's gate: it verifies the version with the installed mlflow_fullmodel
(``verification.verify_model``), records the result on the version as tags, and only then moves
the alias. A failure leaves every alias where it was. Each attempt, passed or refused, is an event
of the registry's audit trail (``audit``); ``rollback`` moves an alias back to the version it held
before, through the same gate.
"""

from __future__ import annotations

import datetime
import difflib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mlflow_fullmodel
from mlflow_fullmodel.audit import AuditEvent, new_event, record_event, rollback_target, stage_results
from mlflow_fullmodel.exceptions import AuditError, FullModelError
from mlflow_fullmodel.flavor import flavor_configuration
from mlflow_fullmodel.inspection import config_text, describe_model
from mlflow_fullmodel.modules import load_module, named_tensors
from mlflow_fullmodel.registry import recorded_digest, registered_version
from mlflow_fullmodel.storage.integrity import confined_path, read_verified
from mlflow_fullmodel.verification import Verification, download_model, gate_stages, verify_model

__all__ = ["VERIFICATION_TAG", "Promotion", "diff_models", "inspect_model", "promote", "rollback"]

#: Prefix of the tags ``promote`` writes on a model version.
VERIFICATION_TAG = "fullmodel.verification"


def inspect_model(model_uri: str) -> dict[str, Any]:
    """Everything about a model without running it: ``describe_model``'s facts, the digest recorded
    in the registry and the verification tags of a registered version.

    Example::

        facts = inspect_model("models:/reviews@champion")
        [step["target"] for step in facts["steps"]]
    """
    return _inspect(model_uri)[0]


def _inspect(model_uri: str) -> tuple[dict[str, Any], str]:
    """``inspect_model``'s facts and the local FullModel folder they describe (for ``diff``)."""
    path = download_model(model_uri)
    data = flavor_configuration(path)["data"]
    facts = describe_model(path, data)
    record = recorded_digest(model_uri)
    facts["model_uri"] = model_uri
    facts["recorded_digest"] = None if record is None else {"digest": record.digest, "source": record.source}
    facts["verification"] = _verification_tags(model_uri)
    return facts, os.path.join(path, data)


def _verification_tags(model_uri: str) -> dict[str, str]:
    version = registered_version(model_uri)
    if version is None:
        return {}
    return {k[len(VERIFICATION_TAG) + 1:]: v for k, v in version.tags.items() if k.startswith(VERIFICATION_TAG + ".")}


# -- diff ---------------------------------------------------------------------------------------


def diff_models(uri_a: str, uri_b: str) -> dict[str, Any]:
    """What changed from model A to model B, section by section; empty sections are left out.

    A module whose archive changed is loaded on both sides (from the bytes that were hashed, as
    a model loads it) to compare its parameters and buffers; a folder artifact is compared by its
    digest and by the file hashes under it.

    Returns:
        ``{section: [change, ...]}`` for ``steps``, ``params``, ``artifacts``, ``modules``,
        ``requirements``, ``signature`` and ``inputs``; ``code``: a unified diff of the captured
        processing code; ``tensors``: for each module whose archive changed, the same tensor
        changes as the ``modules`` lines, as data (``parameters``: the parameter count before and
        after; ``added``/``removed``: name, kind, shape, dtype; ``changed``: shape and dtype
        changes; ``values``: of the same-named same-shaped tensors, how many were ``compared``,
        how many ``changed`` and their ``max_abs_diff`` in ``name``; ``left_out``: how many
        entries the lists leave out; or ``error`` when an archive cannot be read). An empty
        dict means no differences.

    Example::

        diff_models("models:/digits/1", "models:/digits/2")["steps"]
    """
    (a, folder_a), (b, folder_b) = _inspect(uri_a), _inspect(uri_b)
    tensors = {name: _tensor_changes(folder_a, old, folder_b, new) for name, old, new in _changed_modules(a, b)}
    sections = {
        "inputs": _changed_values({"input columns": a["inputs"], "batch size": a["batch_size"]},
                                  {"input columns": b["inputs"], "batch size": b["batch_size"]}),
        "steps": _step_changes(a["steps"], b["steps"]),
        "params": _keyed_changes(a["params"], b["params"], "name", ("type", "default", "minimum", "maximum",
                                                                    "choices", "step")),
        "artifacts": _keyed_changes(a["artifacts"], b["artifacts"], _artifact_key, ("path", "size", "sha256"))
        + _folder_changes(a["artifacts"], b["artifacts"]),
        "modules": _keyed_changes(a["modules"], b["modules"], "name", ("format", "methods", "size", "sha256"))
        + [f"{name}: {line}" for name, change in tensors.items() for line in _tensor_lines(change)],
        "requirements": [f"- {r}" for r in a["requirements"] if r not in b["requirements"]]
        + [f"+ {r}" for r in b["requirements"] if r not in a["requirements"]],
        "signature": _changed_values(a["signature"] or {}, b["signature"] or {}),
    }
    result: dict[str, Any] = {name: changes for name, changes in sections.items() if changes}
    code = _code_diff(a["code"], b["code"])
    if code:
        result["code"] = code
    if tensors:
        result["tensors"] = tensors
    return result


def _changed_values(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{key}: {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _step_changes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    changes = []
    targets_a, targets_b = [s["target"] for s in a], [s["target"] for s in b]
    if sorted(targets_a) == sorted(targets_b) and targets_a != targets_b:
        changes.append(f"reordered: {targets_a} -> {targets_b}")
    matcher = difflib.SequenceMatcher(a=targets_a, b=targets_b, autojunk=False)
    for operation, a0, a1, b0, b1 in matcher.get_opcodes():
        if operation == "equal":
            for old, new in zip(a[a0:a1], b[b0:b1]):
                changes += [f"{new['step']} {new['target']}: {change}" for change in _config_changes(old, new)]
            continue
        changes += [f"removed {s['step']} {s['target']}" for s in a[a0:a1]]
        changes += [f"added {s['step']} {s['target']}({_config(s)})" for s in b[b0:b1]]
    return changes


def _config(step: dict[str, Any]) -> str:
    return ", ".join(f"{k}={config_text(v)}" for k, v in step["config"].items())


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = old["config"], new["config"]
    def shown(values: dict[str, Any], key: str) -> str:
        return config_text(values[key]) if key in values else "(unset)"

    return [f"{key} {shown(a, key)} -> {shown(b, key)}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _keyed_changes(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str | Callable[[dict[str, Any]], str],
                   fields: tuple[str, ...]) -> list[str]:
    name: Callable[[dict[str, Any]], str] = key if callable(key) else (lambda item: item[key])
    by_a, by_b = {name(x): x for x in a}, {name(x): x for x in b}
    changes = [f"removed {k}" for k in by_a if k not in by_b] + [f"added {k}" for k in by_b if k not in by_a]
    for k in by_a.keys() & by_b.keys():
        changes += [f"{k}: {field} {json.dumps(by_a[k].get(field))} -> {json.dumps(by_b[k].get(field))}"
                    for field in fields if by_a[k].get(field) != by_b[k].get(field)]
    return sorted(changes)


def _artifact_key(artifact: dict[str, Any]) -> str:
    return f"{artifact['step']} {artifact['argument']}"


#: The most entries a list of a diff shows; the rest are counted (a network can have thousands).
_SHOWN = 20


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _folder_changes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    """The files that differ inside a folder artifact present in both models."""
    by_b = {_artifact_key(x): x for x in b}
    changes = []
    for old in a:
        new = by_b.get(_artifact_key(old))
        if new is None or old.get("files") is None or new.get("files") is None or old["sha256"] == new["sha256"]:
            continue
        files_a, files_b = old["files"], new["files"]
        for what, names in (
            ("changed", sorted(p for p in files_a.keys() & files_b.keys() if files_a[p] != files_b[p])),
            ("added", sorted(files_b.keys() - files_a.keys())),
            ("removed", sorted(files_a.keys() - files_b.keys())),
        ):
            if names:
                changes.append(f"{_artifact_key(new)}: files {what}: {_shown(names)}")
    return changes


def _changed_modules(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    by_b = {m["name"]: m for m in b["modules"]}
    return [(m["name"], m, by_b[m["name"]]) for m in a["modules"]
            if m["name"] in by_b and m["sha256"] != by_b[m["name"]]["sha256"]]


def _read_tensors(folder: str, module: dict[str, Any]) -> dict[str, tuple[str, torch.Tensor]]:
    """The module's tensors, loaded as a model loads its archive: the bytes whose sha256 the facts
    show, through ``torch.jit.load`` / ``torch.export.load`` (no pickle), from a path confined to
    the model."""
    relative = confined_path(module["file"], f"module '{module['name']}'")
    data = read_verified(os.path.join(folder, *relative.split("/")), module["sha256"])
    return named_tensors(load_module(io.BytesIO(data), module["format"]))


def _tensor_changes(folder_a: str, old: dict[str, Any], folder_b: str, new: dict[str, Any]) -> dict[str, Any]:
    try:
        return _compare_tensors(_read_tensors(folder_a, old), _read_tensors(folder_b, new))
    except Exception as error:  # noqa: BLE001 - an unreadable archive is one line of the diff, not a failed diff
        first_line = (str(error).strip().splitlines() or [""])[0]
        return {"error": f"{type(error).__name__}: {first_line}"}


def _compare_tensors(a: dict[str, tuple[str, torch.Tensor]], b: dict[str, tuple[str, torch.Tensor]]) -> dict[str, Any]:
    def fact(name: str, kind: str, tensor: torch.Tensor) -> dict[str, Any]:
        return {"name": name, "kind": kind, "shape": list(tensor.shape), "dtype": _dtype(tensor)}

    added = [fact(n, *b[n]) for n in b if n not in a]
    removed = [fact(n, *a[n]) for n in a if n not in b]
    changed, compared, differing = [], 0, []
    for name in [n for n in a if n in b]:
        (kind, x), (_, y) = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            changed.append({"name": name, "kind": kind, "shape": [list(x.shape), list(y.shape)],
                            "dtype": [_dtype(x), _dtype(y)]})
        if x.shape == y.shape:
            compared += 1
            largest = _max_abs_diff(x, y)
            if largest != 0:
                differing.append((name, largest))
    # The largest difference overall; NaN (a value NaN on one side only) outranks any number.
    top = max(differing, key=lambda item: (math.isnan(item[1]), item[1]), default=None)
    result: dict[str, Any] = {
        "parameters": [_parameter_count(a), _parameter_count(b)],
        "added": added[:_SHOWN], "removed": removed[:_SHOWN], "changed": changed[:_SHOWN],
        "values": {"compared": compared, "changed": len(differing),
                   "max_abs_diff": None if top is None else _number(top[1]), "name": None if top is None else top[0]},
    }
    left_out = {k: len(v) - _SHOWN for k, v in (("added", added), ("removed", removed), ("changed", changed))
                if len(v) > _SHOWN}
    if left_out:
        result["left_out"] = left_out
    return result


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _parameter_count(tensors: dict[str, tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() for kind, t in tensors.values() if kind == "parameter")


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |y - x| of two same-shaped tensors: in their own dtype when it is a floating one (so it
    is exactly what subtracting the two state_dicts' tensors gives), else in float64."""
    if x.numel() == 0:
        return 0.0
    common = torch.promote_types(x.dtype, y.dtype)
    if not (common.is_floating_point or common.is_complex):
        common = torch.float64  # bools cannot be subtracted; ints could overflow
    x, y = x.detach().to(common), y.detach().to(common)
    # Equal values (infinities included) and NaN on both sides are no change.
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    return float(torch.where(same, 0, (y - x).abs()).max().item())


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN or Infinity


def _tensor_lines(change: dict[str, Any]) -> list[str]:
    if "error" in change:
        return [f"parameters cannot be compared: {change['error']}"]
    before, after = change["parameters"]
    lines = [f"parameter count {before} -> {after}" if before != after else f"parameter count {before} (unchanged)"]
    left_out = change.get("left_out", {})
    for what in ("added", "removed"):
        lines += [f"{what} {t['kind']} {t['name']} {t['shape']} {t['dtype']}" for t in change[what]]
        if left_out.get(what):
            lines.append(f"... and {left_out[what]} more {what}")
    for t in change["changed"]:
        parts = [f"{field} {old} -> {new}" for field in ("shape", "dtype")
                 for old, new in [t[field]] if old != new]
        lines.append(f"{t['kind']} {t['name']}: {', '.join(parts)}")
    if left_out.get("changed"):
        lines.append(f"... and {left_out['changed']} more changed in shape or dtype")
    values = change["values"]
    if values["changed"]:
        largest = values["max_abs_diff"]
        shown = f"{largest:.6g}" if isinstance(largest, float) else largest
        lines.append(f"values changed in {values['changed']} of {values['compared']} same-shaped tensors, largest "
                     f"absolute difference {shown} ({values['name']})")
    elif not (change["added"] or change["removed"] or change["changed"]):
        lines.append(f"parameters and buffers unchanged ({values['compared']} tensors)")
    return lines


def _code_diff(a: dict[str, str], b: dict[str, str]) -> str:
    lines: list[str] = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines += difflib.unified_diff(
                (a.get(path) or "").splitlines(keepends=True), (b.get(path) or "").splitlines(keepends=True),
                fromfile=f"a/code/{path}" if path in a else "/dev/null",
                tofile=f"b/code/{path}" if path in b else "/dev/null",
            )
    return "".join(lines)


# -- promotion ----------------------------------------------------------------------------------


@dataclass
class Promotion:
    """A version verified and given an alias (by a dry run: verified only). ``event`` is what the
    audit trail recorded; None for a dry run, which records nothing."""

    name: str
    version: str
    alias: str
    previous: str | None
    verification: Verification
    event: AuditEvent | None = None


def promote(
    name: str,
    version: str | None = None,
    *,
    alias: str,
    from_alias: str | None = None,
    fresh_env: bool = False,
    public_key: str | None = None,
    allow_builds: bool = False,
    dry_run: bool = False,
) -> Promotion:
    """Verify a registered version, record the result on it as tags, then give it ``alias``; the
    attempt, passed or refused, is an event of the model's audit trail (``audit.history``).

    Args:
        name: The registered model.
        version: The version to promote; or give ``from_alias`` to promote the version an alias
            holds (``from_alias="challenger", alias="champion"``).
        alias: The alias to set.
        from_alias: The alias whose version is promoted, instead of ``version``.
        fresh_env: Also check parity in an environment built from the model's requirements.
        public_key: Require a signature made with this public key's private half.
        allow_builds: Let the fresh environment build source distributions (wheels only by default).
        dry_run: Verify only: move no alias, record nothing (no tag on the version or the model),
            and raise as a real attempt would.

    Returns:
        What was promoted, the version the alias held before, the verification and the event.

    Raises:
        FullModelError: Verification failed (``IntegrityError``, ``SignatureError``,
            ``ParityError``, ...); every alias is left as it was, and the failure is recorded
            (unless ``dry_run``).
        MlflowException: The model, version or alias does not exist, or the registry is unreachable.

    Example::

        promote("reviews", "3", alias="champion")
        promote("reviews", from_alias="challenger", alias="champion", fresh_env=True)
        promote("reviews", "4", alias="champion", dry_run=True).previous  # '3': the version it would replace
    """
    client = MlflowClient()
    if version is not None and from_alias is None:
        target = client.get_model_version(name, version)
    elif from_alias is not None and version is None:
        target = client.get_model_version_by_alias(name, from_alias)
    else:
        raise ValueError("promote needs exactly one of version and from_alias.")
    version = str(target.version)
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # the alias is not set yet
        previous = None
    return _gate(client, "promote", name, version, alias, previous, fresh_env=fresh_env, public_key=public_key,
                 allow_builds=allow_builds, dry_run=dry_run)


def rollback(
    name: str,
    *,
    alias: str,
    fresh_env: bool = False,
    public_key: str | None = None,
    allow_builds: bool = False,
    dry_run: bool = False,
) -> Promotion:
    """Move ``alias`` back to the version it held before its latest audited promotion, once that
    version passes the same gate as ``promote`` again; recorded as a "rollback" event.

    Rolling back again goes one more promotion back (``audit.rollback_target``). The arguments
    after ``alias`` are ``promote``'s.

    Returns:
        The version rolled back to (``version``), the one the alias left (``previous``), the
        verification and the event.

    Raises:
        AuditError: The alias is not set, or the audit trail has no version it held before (it was
            set outside ``promote``, or its first audited version holds it).
        FullModelError: The earlier version fails verification now (a refusal is recorded unless
            ``dry_run``); the alias stays where it is.
        MlflowException: The model does not exist, or the registry is unreachable.

    Example::

        rollback("reviews", alias="champion").version  # '3', after promote("reviews", "4", alias="champion")
    """
    current, previous = rollback_target(name, alias)
    client = MlflowClient()
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise AuditError(f"Version {previous} of {name}, which @{alias} held before version {current}, no longer "
                         "exists: there is nothing to roll back to. Promote another version with: "
                         f"mlflow-fullmodel promote {name} VERSION --alias {alias}") from None
    return _gate(client, "rollback", name, previous, alias, current, fresh_env=fresh_env, public_key=public_key,
                 allow_builds=allow_builds, dry_run=dry_run)


def _gate(client: MlflowClient, action: str, name: str, version: str, alias: str, previous: str | None, *,
          fresh_env: bool, public_key: str | None, allow_builds: bool, dry_run: bool) -> Promotion:
    """Verify ``version``; unless ``dry_run``, record the result and the audit event and, once it
    passed, move ``alias`` to it."""
    stages = gate_stages(public_key=public_key is not None, fresh_env=fresh_env)
    try:
        verification = verify_model(f"models:/{name}/{version}", public_key=public_key, fresh_env=fresh_env,
                                    allow_builds=allow_builds, require_record=True, keep_download=False)
    except FullModelError as error:  # recorded with the checks that passed before it, and no more
        if not dry_run:
            message = f"{type(error).__name__}: {error}"
            _record(client, name, version, "failed", list(error.checks_passed), None, message)
            record_event(name, new_event(action, alias, previous, version,
                                         stage_results(stages, error.checks_passed, refused=True), error=message))
        raise
    if dry_run:
        return Promotion(name, version, alias, previous, verification)
    _record(client, name, version, "passed", verification.checks, verification.digest, None)
    client.set_registered_model_alias(name, alias, version)
    event = new_event(action, alias, previous, version, stage_results(stages, verification.checks, refused=False),
                      digest=verification.digest)
    record_event(name, event)
    return Promotion(name, version, alias, previous, verification, event)


def _record(client: MlflowClient, name: str, version: str, result: str, checks: list[str], digest: str | None,
            error: str | None) -> None:
    tags = {
        "result": result,
        "checks": ",".join(checks),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mlflow_fullmodel_version": mlflow_fullmodel.__version__,
    }
    if digest:
        tags["digest"] = digest
    if error:
        tags["error"] = error[:4000]
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{VERIFICATION_TAG}.{key}", value)
    stale = f"{VERIFICATION_TAG}.error"  # from an earlier failed attempt
    if error is None and stale in client.get_model_version(name, version).tags:
        client.delete_model_version_tag(name, version, stale)
