"""The manifest of a saved model: a sha256 for every file, and one digest for all of them.

A model folder (the MLflow model's root, or a bare FullModel folder) holds ``MANIFEST.json``, written
last at save time::

    {"algorithm": "sha256", "files": {"MLmodel": "<hex>", "code/mlflow_fullmodel/flavor.py": ...},
     "manifest_version": 1}

The model digest is ``sha256:`` + the sha256 of the manifest's canonical JSON (the file as written),
so ``sha256sum MANIFEST.json`` shows it too. A manifest inside the folder only catches accidents:
whoever can rewrite the files can rewrite it. The digest recorded where the artifact store cannot
change it (the registry) is what makes it a check against tampering.

What is not hashed: the manifest itself, the few files MLflow adds to a model folder after it was
saved (``ADDED_AFTER_SAVING``), and, when a model is loaded (not when it is verified), Python's
``__pycache__`` folders, which importing the embedded runtime may write. A symlink anywhere in the
folder is refused: a saved model has none, and one could point outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mlflow_fullmodel._hashing import RESTORE as _FIX
from mlflow_fullmodel._hashing import read_verified
from mlflow_fullmodel.exceptions import IntegrityError

__all__ = [
    "ADDED_AFTER_SAVING",
    "MANIFEST_FILE",
    "Manifest",
    "confined_path",
    "folder_digest",
    "folder_hashes",
    "read_verified",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_VERSION = 1
SIGNATURE_FILE = "model.sig"

#: Files that may appear in a model folder after saving, none of them read by the model: MLflow's
#: note on the registered version it downloaded, the names of environment variables it saw the
#: model read while validating its serving example, and a signature (made after the manifest).
ADDED_AFTER_SAVING = frozenset({"registered_model_meta", "environment_variables.txt", SIGNATURE_FILE})

_BYTECODE_DIR = "__pycache__"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(hashes: Mapping[str, str]) -> str:
    """One sha256 (hex) for a folder: over its files' ``"<sha256>  <relative path>\\n"`` lines,
    sorted by path (``/`` as separator), as ``sha256sum`` prints them.

    It depends on the files' paths and contents only, so it can be derived from the manifest's
    entries under the folder as well as from the files themselves; a changed file of the same size
    changes it, as a renamed, added or removed file does.
    """
    digest = hashlib.sha256()
    for relative in sorted(hashes):
        digest.update(f"{hashes[relative]}  {relative}\n".encode())
    return digest.hexdigest()


def folder_hashes(root: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the files under ``root``, walked as a manifest walks them
    (sorted, ``__pycache__`` left out, a symlink refused), so that ``folder_digest`` of a saved
    folder equals the digest derived from its manifest entries."""
    return {relative: sha256_file(os.path.join(root, *relative.split("/")))
            for relative in _walk(root, skip_bytecode=True, model_root=False)}


def _mlmodel_digest(path: str) -> str:
    # MLflow rewrites MLmodel after the flavor saved it in one case: to add ``env_vars``, the names
    # of API-key variables the model read while MLflow validated its serving example. Everything
    # else in the file is covered.
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    if isinstance(content, dict):
        content.pop("env_vars", None)
    canonical = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()


_DIGESTS: Mapping[str, Callable[[str], str]] = {"MLmodel": _mlmodel_digest}


@dataclass(frozen=True)
class Manifest:
    """``{relative path: sha256}`` of every file of a model folder."""

    files: dict[str, str]

    def to_json(self) -> str:
        data = {"algorithm": "sha256", "files": self.files, "manifest_version": MANIFEST_VERSION}
        return json.dumps(data, sort_keys=True, indent=1) + "\n"

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical manifest: one value that stands for every file."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise IntegrityError(f"{where} is not valid JSON ({error}). {_FIX}") from None
        if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
            version = data.get("manifest_version") if isinstance(data, dict) else None
            raise IntegrityError(
                f"{where} has manifest version {version!r}; this mlflow_fullmodel reads version "
                f"{MANIFEST_VERSION}. Verify it with the mlflow_fullmodel release that saved it."
            )
        files = data.get("files")
        if data.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise IntegrityError(f"{where} does not list sha256 hashes of files. {_FIX}")
        return cls({str(k): str(v) for k, v in files.items()})

    @classmethod
    def of_folder(cls, root: str, *, skip_bytecode: bool) -> Manifest:
        """Hash the files of ``root`` as they are now."""
        files = {}
        for relative in _walk(root, skip_bytecode=skip_bytecode):
            path = os.path.join(root, *relative.split("/"))
            files[relative] = _DIGESTS.get(relative, sha256_file)(path)
        return cls(files)

    def differences(self, actual: Manifest) -> list[str]:
        """What ``actual`` has that this manifest does not say: changed, missing and extra files."""
        missing = sorted(set(self.files) - set(actual.files))
        extra = sorted(set(actual.files) - set(self.files))
        changed = sorted(p for p in set(self.files) & set(actual.files) if self.files[p] != actual.files[p])
        problems = []
        if changed:
            problems.append(f"changed since saving: {changed}")
        if missing:
            problems.append(f"missing: {missing}")
        if extra:
            problems.append(f"not part of the saved model: {extra}")
        return problems


def _walk(root: str, *, skip_bytecode: bool, model_root: bool = True) -> list[str]:
    """Relative paths (with ``/``) of the files under ``root`` that a manifest covers; with
    ``model_root=False`` (a folder inside a model) a ``MANIFEST.json`` in it is a file like any other."""
    found = []
    for folder, dirs, files in os.walk(root):
        relative_folder = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if relative_folder == "." else relative_folder + "/"
        for name in [*dirs, *files]:
            if os.path.islink(os.path.join(folder, name)):
                raise IntegrityError(
                    f"{prefix}{name} in the model folder {root} is a symlink (to "
                    f"{os.readlink(os.path.join(folder, name))!r}); a saved model holds none. {_FIX}"
                )
        if skip_bytecode:
            dirs[:] = [d for d in dirs if d != _BYTECODE_DIR]
        dirs.sort()
        for name in sorted(files):
            relative = prefix + name
            if not model_root or (relative != MANIFEST_FILE and relative not in ADDED_AFTER_SAVING):
                found.append(relative)
    return found


def write_manifest(root: str) -> Manifest:
    """Hash every file under ``root`` into ``root/MANIFEST.json``; return the manifest."""
    manifest = Manifest.of_folder(root, skip_bytecode=True)
    with open(os.path.join(root, MANIFEST_FILE), "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    return manifest


def read_manifest(root: str) -> Manifest:
    path = os.path.join(root, MANIFEST_FILE)
    if os.path.islink(path) or not os.path.isfile(path):
        raise IntegrityError(
            f"The model folder {root} has no {MANIFEST_FILE}, so its files cannot be checked. It is "
            "not a saved fullmodel model, or it was saved by a release without manifests: save it again."
        )
    with open(path, encoding="utf-8") as f:
        return Manifest.from_json(f.read(), path)


def verify_manifest(root: str, *, strict: bool = False, actual: Manifest | None = None) -> Manifest:
    """Check every file under ``root`` against its manifest and return the manifest.

    Args:
        root: The model folder.
        strict: Also refuse ``__pycache__`` folders (a verification of downloaded files, not a load).
        actual: The folder's hashes, already computed by the caller as ``strict`` asks: a large
            model is then not hashed again.

    Raises:
        IntegrityError: Naming every file that is changed, missing or not part of the model.
    """
    expected = read_manifest(root)
    problems = expected.differences(actual or Manifest.of_folder(root, skip_bytecode=not strict))
    if problems:
        raise IntegrityError(
            f"The model folder {root} does not match the sha256 hashes of its {MANIFEST_FILE}; "
            + "; ".join(problems) + f". {_FIX}"
        )
    return expected


def confined_path(relative: Any, what: str) -> str:
    """``relative`` if it is a normalised relative path that stays inside its folder, else raise.

    Checked before anything is opened, so that an edited spec cannot point outside the model.
    """
    if (
        not isinstance(relative, str)
        or not relative
        or "\\" in relative
        or "\x00" in relative
        or posixpath.isabs(relative)
        or posixpath.normpath(relative) != relative
        or relative.split("/")[0] == ".."
    ):
        raise IntegrityError(
            f"{what}: the path {relative!r} is not a relative path inside the model folder; a saved "
            f"model only refers to its own files. {_FIX}"
        )
    return relative
