"""The configuration contract every saved step keeps, as a helper the step tests share."""

from __future__ import annotations

import copy
import pickle
import tempfile
from pathlib import Path

import mlflow_fullmodel as fm
from mlflow_fullmodel.storage.folder import rebuilt_step


def round_trip(step: fm.transform.Configurable, folder: str | Path | None = None) -> fm.transform.Configurable:
    """The step rebuilt from its saved JSON configuration, as loading a model does: artifacts are
    copied into ``folder`` (a new temporary one by default) and re-pointed there."""
    return rebuilt_step(step, str(folder or tempfile.mkdtemp(prefix="round-trip-")))


def plain_config(step: fm.transform.Configurable) -> dict:
    """The configuration without artifact paths (which a round trip re-points)."""
    return {k: v for k, v in step.get_config().items() if not isinstance(v, fm.Artifact)}


def copies(step: fm.transform.Configurable) -> list[fm.transform.Configurable]:
    """The step copied, deep-copied and pickled, as users and DataLoader workers copy it."""
    return [copy.copy(step), copy.deepcopy(step), pickle.loads(pickle.dumps(step))]
