"""Signing a model folder with a key, and checking the signature, through OpenSSF ``model-signing``.

The signature (``model.sig``, a Sigstore bundle) covers every file of the MLflow model, manifest
included, except the files MLflow adds after saving (``environment_variables.txt`` is signed: it
says what the model reads from its environment). It is made with an elliptic-curve private key
(PEM) and checked with its public key, with no network. Install with
``pip install mlflow-fullmodel[signing]``.
"""

from __future__ import annotations

import os
from typing import Any

from mlflow_fullmodel.exceptions import ConfigError, SignatureError
from mlflow_fullmodel.storage.integrity import ADDED_AFTER_SAVING, SIGNATURE_FILE

__all__ = ["SIGNATURE_FILE", "sign_folder", "verify_signature"]


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as error:
        raise ConfigError(
            f"Signing needs the model-signing package ({error}); install it with "
            "pip install 'mlflow-fullmodel[signing]'."
        ) from None
    return model_signing


def _hashing_config(model_signing: Any, folder: str) -> Any:
    ignored = [os.path.join(folder, name) for name in ADDED_AFTER_SAVING - {"environment_variables.txt"}]
    return model_signing.hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)


def sign_folder(folder: str, private_key: str, password: str | None = None) -> str:
    """Sign the model in the local ``folder`` with an elliptic-curve private key (PEM file) and
    return the path of the signature written into it.

    Example::

        sign_folder("reviews_model", "signing-key.pem")
    """
    model_signing = _model_signing()
    folder = os.path.abspath(folder)
    signature = os.path.join(folder, SIGNATURE_FILE)
    (
        model_signing.signing.Config()
        .use_elliptic_key_signer(private_key=private_key, password=password)
        .set_hashing_config(_hashing_config(model_signing, folder))
        .sign(folder, signature)
    )
    return signature


def verify_signature(folder: str, public_key: str) -> None:
    """Check that the model in ``folder`` is signed by the key whose public half is ``public_key``.

    Raises:
        SignatureError: The model is not signed, signed by another key, or changed since signing.
    """
    model_signing = _model_signing()
    folder = os.path.abspath(folder)
    signature = os.path.join(folder, SIGNATURE_FILE)
    if not os.path.isfile(signature):
        raise SignatureError(
            f"The model {folder} is not signed (it has no {SIGNATURE_FILE}) and a public key was given "
            "to check it with. Sign it with: mlflow-fullmodel sign MODEL_URI --key KEY"
        )
    try:
        (
            model_signing.verifying.Config()
            .use_elliptic_key_verifier(public_key=public_key)
            .set_hashing_config(_hashing_config(model_signing, folder))
            .verify(folder, signature)
        )
    except ValueError as error:
        raise SignatureError(f"The signature of the model {folder} does not verify with {public_key}: "
                             f"{error}") from None
