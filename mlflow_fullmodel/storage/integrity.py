"""sha256 of every file of a saved model, and the check that nothing changed since saving."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from mlflow_fullmodel.exceptions import IntegrityError

__all__ = ["hash_files", "verify_files"]

_IGNORED_DIRS = {"__pycache__"}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: str, exclude: set[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` except ``exclude``."""
    hashes = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative not in exclude:
                hashes[relative] = _sha256(os.path.join(root, name))
    return hashes


def verify_files(folder: str, expected: Mapping[str, str], exclude: set[str]) -> None:
    """Raise ``IntegrityError`` naming every file that is missing, changed or not in the spec."""
    actual = hash_files(folder, exclude)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    problems = []
    if changed:
        problems.append(f"changed since saving: {changed}")
    if missing:
        problems.append(f"missing: {missing}")
    if extra:
        problems.append(f"not part of the saved model: {extra}")
    if problems:
        raise IntegrityError(
            f"The model folder {folder} does not match the sha256 hashes recorded in its spec; "
            + "; ".join(problems)
            + ". Restore the model from its source (re-download it) rather than editing its files."
        )
