"""SHA-256 helpers below every other module: a file read and checked in one go, and a tensor fed
to a hash. ``transform`` (``Artifact.read_bytes``) and ``storage.integrity`` (the model's files)
share the first; parity's digests and ``RandomCrops``' crop positions the second."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from mlflow_fullmodel.exceptions import IntegrityError

if TYPE_CHECKING:
    import torch

__all__ = ["RESTORE", "hash_tensor", "read_verified"]

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


def hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor`` to ``digest`` (a ``hashlib`` hash) as its dtype, its shape and its bytes, so
    that equal values of another dtype or shape hash apart."""
    digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
