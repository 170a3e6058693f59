"""What several test modules share besides fixtures: sample texts, the example projects' names
and how they are trained, and pointing this process's MLflow client somewhere for a while."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

EXAMPLE_TEXTS = ["What a GREAT film!", "Dull  and boring.", "The plot was superb, the actor wonderful"]

#: The special tokens of ``hf_tokenizer_path``, by id: the pad id is not 0, so that padding the
#: ids and padding the attention mask take different values.
HF_SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]

EXAMPLES = Path(__file__).resolve().parents[1] / "example_projects"
#: The registered names of the example models trained once per test session.
TEXT_EXAMPLE, IMAGE_EXAMPLE, TRANSLATOR_EXAMPLE = "example-text", "example-images", "example-translator"


def train_example(project: str, tracking_uri: str, workdir: Path, *arguments: str) -> str:
    """One tiny training run of an example project, as a user runs it: a script in its own process;
    returns what it printed."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / project / "train.py"), "--tiny", "--tracking-uri", tracking_uri, *arguments],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=""),  # the script must find its own modules by itself
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def latest_run(experiment: str) -> mlflow.entities.Run:
    return mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id], order_by=["start_time DESC"]
    )[0]


@contextmanager
def tracking_uri(uri: str, experiment: str = "tests") -> Iterator[None]:
    """Point this process's MLflow client at ``uri`` (and its experiment ``experiment``) for a while."""
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
              mlflow.tracking.fluent._get_experiment_id())
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment)
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before[0]
        mlflow.set_tracking_uri(before[1])
        mlflow.set_registry_uri(before[2])
        if before[3] is not None:
            mlflow.set_experiment(experiment_id=before[3])


def signing_keys(folder: Path) -> dict[str, str]:
    """Two elliptic-curve key pairs, "signer" and "other", as PEM files in ``folder``: the private
    key's path under its name, the public key's under ``name + ".pub"``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = {}
    for name in ("signer", "other"):
        private = ec.generate_private_key(ec.SECP256R1())
        (folder / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.pub").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        paths[name], paths[f"{name}.pub"] = str(folder / f"{name}.pem"), str(folder / f"{name}.pub")
    return paths
