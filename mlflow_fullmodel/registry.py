"""The model digest in the tracking store, where whoever can write the artifact store cannot change it.

``log_model`` records the digest of the manifest it wrote as a tag of the logged model, of the run
(``fullmodel.digest.<name>``) and, when it registers the model, of the model version, together with
the manifest itself so that a later check can name the files that differ. ``recorded_digest`` finds
that record again for a model URI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_fullmodel.storage.integrity import Manifest

__all__ = ["DIGEST_TAG", "MANIFEST_TAG", "Record", "record_digest", "recorded_digest", "registered_version"]

_logger = logging.getLogger(__name__)

DIGEST_TAG = "fullmodel.digest"
MANIFEST_TAG = "fullmodel.manifest"
# A model version tag holds up to 100,000 characters; a manifest of a few hundred files fits.
_MAX_TAG_VALUE = 100_000


@dataclass(frozen=True)
class Record:
    """A digest recorded in the tracking store, where it was found, and the manifest if recorded."""

    digest: str
    source: str
    manifest: Manifest | None = None


def _run_tag(name: str) -> str:
    return f"{DIGEST_TAG}.{name}"


def record_digest(
    info: Any, manifest: Manifest, registered_model_name: str | None = None, description: str | None = None
) -> None:
    """Tag the logged model, its run and its registered version with ``manifest``'s digest; give
    the version ``description`` unless it has one."""
    client = MlflowClient()
    client.set_logged_model_tags(info.model_id, {DIGEST_TAG: manifest.digest})
    if info.run_id:
        client.set_tag(info.run_id, _run_tag(info.name), manifest.digest)
    if registered_model_name is not None and info.registered_model_version is not None:
        version = str(info.registered_model_version)
        tag_version(registered_model_name, version, manifest)
        if description and not client.get_model_version(registered_model_name, version).description:
            client.update_model_version(registered_model_name, version, description=description)


def tag_version(name: str, version: str, manifest: Manifest) -> None:
    """Record ``manifest`` on a model version: its digest, and the manifest where it fits."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, DIGEST_TAG, manifest.digest)
    text = manifest.to_json()
    if len(text) <= _MAX_TAG_VALUE:
        client.set_model_version_tag(name, version, MANIFEST_TAG, text)
    else:
        _logger.info("The manifest of %s/%s (%d characters) is too long for a tag; only its digest is recorded.",
                     name, version, len(text))


def recorded_digest(model_uri: str) -> Record | None:
    """The digest the tracking store holds for ``model_uri``, or None where it holds none (a local
    path, or a model logged without this flavor's ``log_model``).

    ``models:/name/version`` and ``models:/name@alias`` look at the model version, then at the
    logged model it came from, then at its run; ``models:/<model_id>`` at the logged model;
    ``runs:/<run_id>/<name>`` at the run.
    """
    client = MlflowClient()
    if model_uri.startswith("models:/"):
        version = registered_version(model_uri)
        if version is None:
            reference = model_uri[len("models:/"):].strip("/")
            return None if "/" in reference else _logged_model_record(client, reference)
        where = f"model version {version.name}/{version.version}"
        if DIGEST_TAG in version.tags:
            manifest_text = version.tags.get(MANIFEST_TAG)
            manifest = (Manifest.from_json(manifest_text, f"the {MANIFEST_TAG} tag of {where}") if manifest_text
                        else None)
            return Record(version.tags[DIGEST_TAG], where, manifest)
        # Over REST a version names its logged model only in its source, models:/<model_id>.
        model_id = getattr(version, "model_id", None) or (
            version.source[len("models:/"):] if (version.source or "").startswith("models:/") else None)
        if model_id:
            record = _logged_model_record(client, model_id)
            if record is not None:
                return record
        if version.run_id and (version.source or "").startswith("runs:/"):
            return _run_record(client, version.run_id, version.source.rstrip("/").rsplit("/", 1)[-1])
        return None
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri[len("runs:/"):].strip("/").partition("/")
        return _run_record(client, run_id, name)
    return None


def registered_version(model_uri: str) -> Any:
    """The model version a ``models:/name/version`` or ``models:/name@alias`` URI names, or None
    for any other URI (a logged model's ``models:/<model_id>``, a stage, a run, a path)."""
    if not model_uri.startswith("models:/"):
        return None
    reference = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in reference:
        return client.get_model_version_by_alias(*reference.split("@", 1))
    name, _, number = reference.partition("/")
    # No number: a logged model's id; a word: a stage ("Production"), deprecated, left to MLflow.
    return client.get_model_version(name, number) if number.isdigit() else None


def _logged_model_record(client: MlflowClient, model_id: str) -> Record | None:
    try:
        tags = client.get_logged_model(model_id).tags
    except MlflowException:
        return None
    return Record(tags[DIGEST_TAG], f"logged model {model_id}") if DIGEST_TAG in tags else None


def _run_record(client: MlflowClient, run_id: str, name: str) -> Record | None:
    digest = client.get_run(run_id).data.tags.get(_run_tag(name))
    return Record(digest, f"run {run_id} (tag {_run_tag(name)})") if digest else None
