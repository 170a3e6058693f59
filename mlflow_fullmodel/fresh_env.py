"""The parity check in a new virtual environment built from the model's own ``requirements.txt``.

This is what a deployment does: install what the model says it needs (mlflow-fullmodel is not among
it: the runtime travels inside the model), load it, answer. Environments are cached by the sha256
of the requirements, under ``MLFLOW_FULLMODEL_ENV_CACHE`` (default ``~/.cache/mlflow-fullmodel/envs``),
so a second check of the same requirements installs nothing; ``env_cache`` lists and prunes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys

from mlflow_fullmodel.env_cache import ENV_CACHE_VARIABLE, READY_MARKER, REQUIREMENTS_RECORD, cache_dir, mark_used
from mlflow_fullmodel.exceptions import ParityError
from mlflow_fullmodel.parity import check_parity

__all__ = ["ENV_CACHE_VARIABLE", "check_parity_in_fresh_env", "fresh_env", "named_requirements"]

_logger = logging.getLogger(__name__)


#: What pip takes for a local archive to build and install when a requirement's name ends with it.
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")


def named_requirements(text: str, source: str = "requirements.txt") -> list[str]:
    """The requirements of a model's ``requirements.txt``, each a named package with an optional
    version and environment marker (``torch==2.13.0``, ``tokenizers>=0.15; python_version>='3.10'``).

    A model folder is untrusted input: pip reads options from the file (``--index-url``, ``-e``,
    ``-r``, ``--trusted-host``) and installs paths and URLs by running their build scripts, so any
    line but a named requirement is refused, naming it.

    Raises:
        ParityError: With ``stage`` "install", naming the line that is not a named requirement.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    named = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if not entry:
            continue
        problem = None
        if entry.startswith("-"):
            problem = "a pip option"
        else:
            try:
                requirement = Requirement(entry)
            except InvalidRequirement:
                problem = "not a named requirement (a path, a URL, or malformed)"
            else:
                if requirement.url is not None:
                    problem = "a direct reference (name @ URL)"
                elif requirement.name.lower().endswith(_ARCHIVES):
                    problem = "a file name (pip installs a local archive of that name)"
        if problem is not None:
            raise ParityError(f"{source} line {number} ({entry[:200]!r}) is {problem}; a model's requirements may only "
                              "name packages (with versions and markers), so that installing them runs no code of the "
                              "model's choosing.", stage="install")
        named.append(entry)
    return named


def fresh_env(requirements_file: str, timeout: float = 1800, allow_builds: bool = False) -> str:
    """The Python interpreter of a virtual environment with exactly ``requirements_file`` installed,
    built on first use and cached by the requirements' sha256.

    Only named requirements are installed (``named_requirements``), and only as wheels unless
    ``allow_builds``: building a source distribution runs its ``setup.py``.

    Raises:
        ParityError: With ``stage`` "install", naming what pip said, when installing fails, or the
            line of the file that is not a named requirement.
    """
    with open(requirements_file, "rb") as f:
        requirements = f.read()
    named = named_requirements(requirements.decode("utf-8", errors="replace"), requirements_file)
    key = hashlib.sha256(requirements).hexdigest()[:16]
    env = os.path.join(cache_dir(), key)
    python = os.path.join(env, "bin", "python")
    if os.path.exists(os.path.join(env, READY_MARKER)):
        _logger.info("Reusing the environment %s for %s", env, requirements_file)
        mark_used(env)  # what `mlflow-fullmodel envs prune --older-than` goes by
        return python
    shutil.rmtree(env, ignore_errors=True)  # a half-built one from an interrupted run
    os.makedirs(env)
    with open(os.path.join(env, REQUIREMENTS_RECORD), "wb") as f:  # so `envs list` can say what it holds
        f.write(requirements)
    _logger.info("Building an environment from %s in %s (minutes the first time)", requirements_file, env)
    steps = [[sys.executable, "-m", "venv", env]]
    if named:  # pip refuses to install nothing
        # Compiled below on every core: pip compiles the modules (torch alone has thousands) one
        # after another, which took longer than the rest of the install.
        steps.append([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                      *([] if allow_builds else ["--only-binary", ":all:"]), "--", *named])
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            said = (result.stderr or result.stdout).strip().splitlines()
            raise ParityError(
                f"Installing the model's requirements ({requirements_file}) into a new environment "
                f"failed: {' / '.join(said[-3:])}",
                stage="install",
            )
    # Its status is not checked, as pip does not check its own compiling: packages ship modules
    # for other Python versions (torch has one in the syntax of 3.12), refused only if imported.
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", os.path.join(env, "lib")],
                   capture_output=True, timeout=timeout)
    with open(os.path.join(env, READY_MARKER), "w") as f:
        f.write(requirements_file + "\n")
    return python


def check_parity_in_fresh_env(folder: str, runtime_dir: str, root: str, allow_builds: bool = False) -> str | None:
    """The parity check of the MLflow model at ``root`` in an environment built from its
    ``requirements.txt`` (wheels only unless ``allow_builds``).

    Raises:
        ParityError: ``stage`` says what failed: "install", "import" or "outputs".
    """
    python = fresh_env(os.path.join(root, "requirements.txt"), allow_builds=allow_builds)
    try:
        return check_parity(folder, runtime_dir=runtime_dir, root=root, python=python)
    except ParityError as error:
        raise ParityError(f"In a fresh environment from the model's requirements ({error.stage}): {error}",
                          stage=error.stage) from None
