"""SHA-256 helpers below every other module: a file read and checked in one go, which
``transform`` (``Artifact.read_bytes``) and ``storage.integrity`` (the model's files) share."""

from __future__ import annotations

import hashlib

from mlflow_fullmodel.exceptions import IntegrityError

__all__ = ["RESTORE", "read_verified"]

#: The fix for a model whose files no longer match their hashes.
RESTORE = "Restore the model from its source (download it again) instead of editing its files."


def read_verified(path: str, sha256: str | None) -> bytes:
    """The bytes of ``path``, after checking them against ``sha256`` (when it is not None): read
    once, then used, so the file cannot change between the check and its use.

    Raises:
        IntegrityError: The bytes do not have that hash.
    """
    with open(path, "rb") as f:
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(
            f"{path} changed after the model's files were checked: its sha256 no longer matches the "
            f"manifest. {RESTORE}"
        )
    return data

