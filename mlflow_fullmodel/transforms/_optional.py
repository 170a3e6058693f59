"""Optional packages of the built-in steps: imported inside the steps that need them, and checked
when such a step is built (also when a saved model is loaded), so that a missing package is named
at once, with the extra that installs it, rather than at the first request."""

from __future__ import annotations

import importlib.util

from mlflow_fullmodel.exceptions import ConfigError


def require(step: str, module: str, package: str, extra: str) -> None:
    """Raise ``ConfigError`` naming ``package`` and ``mlflow-fullmodel[extra]`` when ``module`` cannot be
    imported."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{step} needs the {package} package, which is not installed: pip install {package} "
            f"(or pip install 'mlflow-fullmodel[{extra}]')."
        )
