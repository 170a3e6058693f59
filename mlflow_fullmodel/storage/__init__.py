"""Saving a FullModel to a folder and loading it back, without MLflow and without pickle."""

from mlflow_fullmodel.storage.folder import (
    FORMAT_VERSION,
    GOLDEN_FILE,
    SPEC_FILE,
    Golden,
    load_fullmodel,
    make_golden,
    read_golden,
    read_spec,
    save_fullmodel,
    step_specs,
)

__all__ = [
    "FORMAT_VERSION",
    "GOLDEN_FILE",
    "SPEC_FILE",
    "Golden",
    "load_fullmodel",
    "make_golden",
    "read_golden",
    "read_spec",
    "save_fullmodel",
    "step_specs",
]
