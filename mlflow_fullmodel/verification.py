"""Verifying a model: its files and signature with the installed mlflow_fullmodel, its answers
with the runtime embedded in it (as a scoring server will load it).

``verify_model`` downloads the model and checks, in order: every file against the digest recorded
in the tracking store (what an attacker of the artifact store cannot rewrite), every file against
the folder's own manifest, no Python bytecode or symlinks, the signature when a public key is given
(before any of the model's code is imported), the flavor's format version, the spec's paths and
step targets (which imports the model's captured code), and last the parity check: the
model, loaded by its embedded runtime in a clean process, must reproduce its golden example (and,
when asked, the same in a new environment built from the model's requirements).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException

from mlflow_fullmodel._mlflow import download_artifacts, store_beside_model
from mlflow_fullmodel.exceptions import FullModelError, IntegrityError, ModelFormatError
from mlflow_fullmodel.flavor import check_parity_of, flavor_configuration
from mlflow_fullmodel.fresh_env import check_parity_in_fresh_env
from mlflow_fullmodel.registry import Record, recorded_digest
from mlflow_fullmodel.signing import SIGNATURE_FILE, sign_folder, verify_signature
from mlflow_fullmodel.storage import load_fullmodel, read_golden
from mlflow_fullmodel.storage.integrity import Manifest, verify_manifest

__all__ = ["STAGES", "Verification", "download_model", "gate_stages", "sign_model", "stage_of", "verify_model"]

#: The stages of ``verify_model`` in the order it runs them, by the names ``stage_of`` gives the
#: entries of ``Verification.checks``.
STAGES = ("digest", "manifest", "signature", "spec", "parity", "fresh-env")


@dataclass
class Verification:
    """What ``verify_model`` checked, for a report or for tags on a model version."""

    model_uri: str
    digest: str
    record: Record | None
    local_path: str  # the downloaded copy that was checked
    checks: list[str] = field(default_factory=list)
    download_dir: str | None = None  # where it was downloaded, kept with keep_download: remove it after use


def download_model(model_uri: str, dst_path: str | None = None) -> str:
    """Download ``model_uri`` to a local folder (or return a local path as it is).

    Raises:
        ModelFormatError: The URI does not resolve to a model MLflow can download.
    """
    try:
        return download_artifacts(model_uri, output_path=dst_path)
    except (MlflowException, OSError) as error:
        message = error.message if isinstance(error, MlflowException) else str(error)
        raise ModelFormatError(f"Cannot download {model_uri}: {message}") from None


def verify_model(
    model_uri: str, *, public_key: str | None = None, parity: bool = True, fresh_env: bool = False,
    allow_builds: bool = False, require_record: bool = False, keep_download: bool = True,
) -> Verification:
    """Check a model before it is served or promoted.

    Args:
        model_uri: ``models:/name/version``, ``models:/name@alias``, ``runs:/id/name``, a path, ...
        public_key: A PEM public key; the model must then carry a valid signature made with its
            private key (``sign_model``).
        parity: Run the parity check in a clean process (it needs the golden example).
        fresh_env: Also run it in a new virtual environment built from the model's own
            ``requirements.txt`` (cached by their hash; see ``fresh_env``), after every other check.
        allow_builds: Let that environment build source distributions (running their
            ``setup.py``); by default it installs wheels only.
        require_record: Fail when no digest of the model is recorded in the registry (a version
            whose logging stopped before recording it): what ``promote`` requires.
        keep_download: Keep the downloaded copy (``Verification.local_path``, e.g. to serve it);
            otherwise a download is removed once checked.

    Returns:
        What was checked, with the model's digest.

    Raises:
        IntegrityError: A file differs from the recorded digest or the manifest, or the spec names
            something outside the model; ``SignatureError`` for a missing or bad signature.
        ModelFormatError: The URI is not a fullmodel model of this format version.
        ParityError: The model does not reproduce its golden example; its ``stage`` says whether
            the environment could not be installed, the model not imported, or its outputs differ.

    Example::

        report = verify_model("models:/reviews/3", public_key="signing-key.pub")
        print(report.digest, report.checks)
    """
    scratch = None if os.path.isdir(model_uri) else tempfile.mkdtemp(prefix="fullmodel-verify-")
    try:
        path = model_uri if scratch is None else download_model(model_uri, scratch)
        record = recorded_digest(model_uri)
        if record is None and require_record:
            raise IntegrityError(f"No digest of {model_uri} is recorded in the registry: it was not logged with "
                                 "mlflow_fullmodel.log_model, or its logging stopped before the digest was recorded. "
                                 "Log it again; only a model with a recorded digest can be promoted.")
        actual = Manifest.of_folder(path, skip_bytecode=False)
        report = Verification(model_uri, actual.digest, record, path, download_dir=scratch if keep_download else None)
        try:
            _run_checks(report, actual, public_key, parity, fresh_env, allow_builds)
        except FullModelError as error:
            error.checks_passed = tuple(report.checks)
            raise
    except BaseException:
        keep_download = False
        raise
    finally:
        if scratch is not None and not keep_download:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def stage_of(check: str) -> str:
    """The stage an entry of ``Verification.checks`` (or of ``FullModelError.checks_passed``) names:
    "digest recorded in model version reviews/3" is the "digest" stage, "parity (compiled forward
    within rtol 0.0001)" the "parity" stage: each is its first word."""
    return check.split(" ", 1)[0]


def gate_stages(*, public_key: bool, fresh_env: bool) -> list[str]:
    """The stages ``verify_model(..., require_record=True)``, the registry's gate, runs: with a
    public key the signature, with ``fresh_env`` the fresh environment's parity check too.

    Example:

    >>> gate_stages(public_key=False, fresh_env=False)
    ['digest', 'manifest', 'spec', 'parity']
    """
    chosen = {"signature": public_key, "fresh-env": fresh_env}
    return [stage for stage in STAGES if chosen.get(stage, True)]


def _run_checks(report: Verification, actual: Manifest, public_key: str | None, parity: bool, fresh_env: bool,
                allow_builds: bool) -> None:
    """``verify_model``'s checks, in order, each named in ``report.checks`` once it passed."""
    model_uri, path, record = report.model_uri, report.local_path, report.record
    if record is not None:
        _check_record(model_uri, record, actual)
        report.checks.append(f"digest recorded in {record.source}")
    # Hashed once (``actual``): the manifest check and the spec check reuse it; files read later
    # are checked against it as they are read.
    manifest = verify_manifest(path, strict=True, actual=actual)
    report.checks.append("manifest")
    # Before anything of the model is read as more than bytes: the spec check below imports its
    # captured code, which must not run unless it is the code that was signed.
    if public_key is not None:
        verify_signature(path, public_key)
        report.checks.append("signature")
    flavor = flavor_configuration(path)
    folder = os.path.join(path, flavor["data"])
    load_fullmodel(folder, root=path, manifest=manifest)  # the spec's paths and step targets, by this runtime's rules
    report.checks.append("spec")
    if parity:
        if read_golden(folder) is None:
            raise ModelFormatError(f"{model_uri} has no golden example to check (it was saved with "
                                   "check_parity=False).")
        compiled = check_parity_of(path)
        report.checks.append("parity" + (f" ({compiled})" if compiled else ""))
    if fresh_env:
        compiled = check_parity_in_fresh_env(folder, os.path.join(path, flavor["code"]), path,
                                             allow_builds=allow_builds)
        report.checks.append("fresh-env" + (f" ({compiled})" if compiled else ""))


def _check_record(model_uri: str, record: Record, actual: Manifest) -> None:
    if actual.digest == record.digest:
        return
    if record.manifest is not None:
        differences = "; ".join(record.manifest.differences(actual)) or "the manifest's own format"
    else:
        differences = "the files that differ cannot be named: only the digest was recorded"
    raise IntegrityError(
        f"The files of {model_uri} do not match the digest recorded in {record.source} "
        f"({record.digest}; the files give {actual.digest}): {differences}. The model was changed in "
        "the artifact store after it was logged; do not serve it, and log it again from its source."
    )


def sign_model(model_uri: str, private_key: str, password: str | None = None) -> str:
    """Sign a model with an elliptic-curve private key (PEM) and store the signature with it: in
    the folder for a local path, in the artifact store for a logged or registered model.

    Returns:
        Where the signature was stored.

    Example::

        sign_model("models:/reviews/3", "signing-key.pem")
        verify_model("models:/reviews/3", public_key="signing-key.pub")
    """
    local = os.path.isdir(model_uri)
    path = model_uri if local else download_model(model_uri)
    verify_manifest(path, strict=True)  # sign only what is intact
    signature = sign_folder(path, private_key, password)
    if local:
        return signature
    location = store_beside_model(model_uri, signature)
    return f"{location.rstrip('/')}/{SIGNATURE_FILE}"
