"""The configuration contract every saved step keeps, as a helper the step tests share."""

from __future__ import annotations

import copy
import json
import pickle
import tempfile
from pathlib import Path

import mlflow_fullmodel as fm
from mlflow_fullmodel.storage.folder import _decode_config, _encode_config, _Plan, _VerifiedFiles
from mlflow_fullmodel.storage.integrity import Manifest


def round_trip(step: fm.transform.Configurable, folder: str | Path | None = None) -> fm.transform.Configurable:
    """The step rebuilt from its saved JSON configuration, as loading a model does: artifacts are
    copied into ``folder`` (a new temporary one by default) and re-pointed there."""
    folder = Path(folder or tempfile.mkdtemp(prefix="round-trip-"))
    plan = _Plan(spec={})
    encoded = json.loads(json.dumps(_encode_config(step, "stage[0]", plan)))
    for source, dest in plan.artifacts:
        (folder / dest).parent.mkdir(parents=True, exist_ok=True)
        (folder / dest).write_bytes(Path(source).read_bytes())
    files = _VerifiedFiles(str(folder), "", Manifest.of_folder(str(folder), skip_bytecode=True).files)
    return type(step)(**_decode_config(encoded, files, "stage[0]"))


def plain_config(step: fm.transform.Configurable) -> dict:
    """The configuration without artifact paths (which a round trip re-points)."""
    return {k: v for k, v in step.get_config().items() if not isinstance(v, fm.Artifact)}


def copies(step: fm.transform.Configurable) -> list[fm.transform.Configurable]:
    """The step copied, deep-copied and pickled, as users and DataLoader workers copy it."""
    return [copy.copy(step), copy.deepcopy(step), pickle.loads(pickle.dumps(step))]
