"""After ``log_model``: inspect a model, see what changed between two, promote a version by alias
only once it is verified.

``promote`` is the registry's gate: it verifies the version with the installed mlflow_fullmodel
(``verification.verify_model``), records the result on the version as tags, and only then moves
the alias. A failure leaves every alias where it was.
"""

from __future__ import annotations

import datetime
import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mlflow_fullmodel
from mlflow_fullmodel.exceptions import FullModelError
from mlflow_fullmodel.flavor import flavor_configuration
from mlflow_fullmodel.inspection import config_text, describe_model
from mlflow_fullmodel.registry import recorded_digest, registered_version
from mlflow_fullmodel.verification import Verification, download_model, verify_model

__all__ = ["VERIFICATION_TAG", "Promotion", "diff_models", "inspect_model", "promote"]

#: Prefix of the tags ``promote`` writes on a model version.
VERIFICATION_TAG = "fullmodel.verification"


def inspect_model(model_uri: str) -> dict[str, Any]:
    """Everything about a model without running it: ``describe_model``'s facts, the digest recorded
    in the registry and the verification tags of a registered version.

    Example::

        facts = inspect_model("models:/reviews@champion")
        [step["target"] for step in facts["steps"]]
    """
    path = download_model(model_uri)
    facts = describe_model(path, flavor_configuration(path)["data"])
    record = recorded_digest(model_uri)
    facts["model_uri"] = model_uri
    facts["recorded_digest"] = None if record is None else {"digest": record.digest, "source": record.source}
    facts["verification"] = _verification_tags(model_uri)
    return facts


def _verification_tags(model_uri: str) -> dict[str, str]:
    version = registered_version(model_uri)
    if version is None:
        return {}
    return {k[len(VERIFICATION_TAG) + 1:]: v for k, v in version.tags.items() if k.startswith(VERIFICATION_TAG + ".")}


# -- diff ---------------------------------------------------------------------------------------


def diff_models(uri_a: str, uri_b: str) -> dict[str, Any]:
    """What changed from model A to model B, section by section; empty sections are left out.

    Returns:
        ``{section: [change, ...]}`` for ``steps``, ``params``, ``artifacts``, ``modules``,
        ``requirements``, ``signature`` and ``inputs``, and ``code``: a unified diff of the
        captured processing code. An empty dict means no differences.

    Example::

        diff_models("models:/digits/1", "models:/digits/2")["steps"]
    """
    a, b = inspect_model(uri_a), inspect_model(uri_b)
    sections = {
        "inputs": _changed_values({"input columns": a["inputs"], "batch size": a["batch_size"]},
                                  {"input columns": b["inputs"], "batch size": b["batch_size"]}),
        "steps": _step_changes(a["steps"], b["steps"]),
        "params": _keyed_changes(a["params"], b["params"], "name", ("type", "default", "minimum", "maximum",
                                                                    "choices", "step")),
        "artifacts": _keyed_changes(a["artifacts"], b["artifacts"], lambda x: f"{x['step']} {x['argument']}",
                                    ("path", "size", "sha256")),
        "modules": _keyed_changes(a["modules"], b["modules"], "name", ("format", "methods", "size", "sha256")),
        "requirements": [f"- {r}" for r in a["requirements"] if r not in b["requirements"]]
        + [f"+ {r}" for r in b["requirements"] if r not in a["requirements"]],
        "signature": _changed_values(a["signature"] or {}, b["signature"] or {}),
    }
    result: dict[str, Any] = {name: changes for name, changes in sections.items() if changes}
    code = _code_diff(a["code"], b["code"])
    if code:
        result["code"] = code
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
    return [f"{key} {config_text(a[key]) if key in a else '(unset)'} -> {config_text(b[key]) if key in b else '(unset)'}"
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


def _code_diff(a: dict[str, str], b: dict[str, str]) -> str:
    lines: list[str] = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines += difflib.unified_diff(
                (a.get(path) or "").splitlines(keepends=True), (b.get(path) or "").splitlines(keepends=True),
                fromfile=f"a/code/{path}" if path in a else "/dev/null", tofile=f"b/code/{path}" if path in b else "/dev/null",
            )
    return "".join(lines)


# -- promotion ----------------------------------------------------------------------------------


@dataclass
class Promotion:
    """A version verified and given an alias."""

    name: str
    version: str
    alias: str
    previous: str | None
    verification: Verification


def promote(
    name: str,
    version: str | None = None,
    *,
    alias: str,
    from_alias: str | None = None,
    fresh_env: bool = False,
    public_key: str | None = None,
) -> Promotion:
    """Verify a registered version, record the result on it as tags, then give it ``alias``.

    Args:
        name: The registered model.
        version: The version to promote; or give ``from_alias`` to promote the version an alias
            holds (``from_alias="challenger", alias="champion"``).
        alias: The alias to set.
        from_alias: The alias whose version is promoted, instead of ``version``.
        fresh_env: Also check parity in an environment built from the model's requirements.
        public_key: Require a signature made with this public key's private half.

    Returns:
        What was promoted, the version the alias held before, and the verification.

    Raises:
        FullModelError: Verification failed (``IntegrityError``, ``SignatureError``,
            ``ParityError``, ...); every alias is left as it was, and the failure is recorded.
        MlflowException: The model, version or alias does not exist, or the registry is unreachable.

    Example::

        promote("reviews", "3", alias="champion")
        promote("reviews", from_alias="challenger", alias="champion", fresh_env=True)
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
    checked = ["digest", "manifest", "spec"] + (["signature"] if public_key else []) + ["parity"] \
        + (["fresh-env"] if fresh_env else [])
    try:
        verification = verify_model(f"models:/{name}/{version}", public_key=public_key, fresh_env=fresh_env)
    except FullModelError as error:
        _record(client, name, version, "failed", checked, None, f"{type(error).__name__}: {error}")
        raise
    _record(client, name, version, "passed", verification.checks, verification.digest, None)
    client.set_registered_model_alias(name, alias, version)
    return Promotion(name, version, alias, previous, verification)


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
