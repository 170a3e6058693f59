"""The cache of the environments that ``verify --fresh-env`` builds: where it is, what it holds, and
removing what is no longer used.

Each environment is a folder of the cache named by the first 16 hex digits of its requirements'
sha256: a virtual environment (1.7-1.8 GB with torch), the requirements it was built from, and a
ready marker written once the install succeeded. The marker's mtime is the environment's last use:
``fresh_env`` touches it each time it reuses the environment. An environment without the marker is
half-built (an interrupted or failed build, or one under way); its last use is its last write.

Only folders named like a requirements hash are environments: anything else in the cache folder,
and any symlink there, is left alone, so a cache variable pointed at the wrong folder cannot empty it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from dataclasses import dataclass

from mlflow_fullmodel.exceptions import FullModelError

__all__ = ["ENV_CACHE_VARIABLE", "CachedEnv", "PruneResult", "cache_dir", "list_envs", "mark_used", "prune_envs"]

ENV_CACHE_VARIABLE = "MLFLOW_FULLMODEL_ENV_CACHE"
#: Written last when building, so its presence means "installed"; its mtime is the last use.
READY_MARKER = ".fullmodel-env-ready"
#: The requirements text the environment was built from, byte for byte (what its name hashes).
REQUIREMENTS_RECORD = ".fullmodel-requirements.txt"
_KEY = re.compile(r"[0-9a-f]{16}")
_DAY = 86400.0


@dataclass(frozen=True)
class CachedEnv:
    """One cached environment. ``last_used`` is in seconds since the epoch; ``requirements`` is the
    text it was built from, or None for one built before the text was recorded."""

    key: str
    path: str
    size: int
    last_used: float
    ready: bool
    requirements: str | None


@dataclass(frozen=True)
class PruneResult:
    """What ``prune_envs`` removed (or, with ``dry_run``, would remove) and the bytes it freed."""

    removed: list[CachedEnv]
    freed: int
    dry_run: bool


def cache_dir() -> str:
    """The folder of the cached environments: ``$MLFLOW_FULLMODEL_ENV_CACHE``, by default
    ``~/.cache/mlflow-fullmodel/envs``. It may not exist yet."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "mlflow-fullmodel", "envs")
    return os.environ.get(ENV_CACHE_VARIABLE) or default


def mark_used(env: str) -> None:
    """Record now as the last use of the environment folder ``env`` (the ready marker's mtime)."""
    try:
        os.utime(os.path.join(env, READY_MARKER))
    except OSError:
        pass  # a read-only cache still serves; only its "last use" goes stale


def _walk(path: str) -> tuple[int, float]:
    """The apparent size of the files under ``path`` and the newest mtime there, without following
    symlinks (a venv's ``bin/python`` points at the system interpreter) or counting a hard link twice."""
    size, newest, seen = 0, os.lstat(path).st_mtime, set()
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # unreadable: counted as empty rather than failing the whole listing
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            newest = max(newest, info.st_mtime)
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            elif (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                size += info.st_size
    return size, newest


def _describe(key: str, path: str) -> CachedEnv:
    size, newest = _walk(path)
    marker = os.path.join(path, READY_MARKER)
    ready = os.path.isfile(marker) and not os.path.islink(marker)
    try:
        with open(os.path.join(path, REQUIREMENTS_RECORD), encoding="utf-8", errors="replace") as f:
            requirements: str | None = f.read()
    except OSError:
        requirements = None
    return CachedEnv(key=key, path=path, size=size, last_used=os.lstat(marker).st_mtime if ready else newest,
                     ready=ready, requirements=requirements)


def list_envs() -> list[CachedEnv]:
    """The cached environments, most recently used first. An empty list when the cache folder does
    not exist."""
    root = cache_dir()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise FullModelError(f"Cannot read the environment cache {root}: {error.strerror}") from None
    envs = [_describe(entry.name, entry.path) for entry in entries
            if _KEY.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
    return sorted(envs, key=lambda env: (-env.last_used, env.key))


def _inside(root: str, path: str) -> bool:
    """Whether ``path``, resolved, is a direct child of ``root``, resolved: the only thing pruning
    may delete."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(root)


def prune_envs(older_than_days: float | None = None, *, remove_all: bool = False, dry_run: bool = False,
               now: float | None = None) -> PruneResult:
    """Remove the cached environments last used more than ``older_than_days`` days before ``now``
    (default: the current time), or all of them with ``remove_all``. One last used exactly
    ``older_than_days`` ago is kept. With ``dry_run`` nothing is removed: the result says what would be.

    Raises:
        FullModelError: When neither or both of ``older_than_days`` and ``remove_all`` are given,
            ``older_than_days`` is negative, or an environment cannot be removed.
    """
    if (older_than_days is None) == (not remove_all):
        raise FullModelError("Give either older_than_days or remove_all=True, not both and not neither.")
    if older_than_days is not None and older_than_days < 0:
        raise FullModelError(f"older_than_days must be 0 or more, got {older_than_days}.")
    root = cache_dir()
    cutoff = (time.time() if now is None else now) - (older_than_days or 0.0) * _DAY
    chosen = [env for env in list_envs() if remove_all or env.last_used < cutoff]
    removed: list[CachedEnv] = []
    for env in chosen:
        if os.path.islink(env.path) or not _inside(root, env.path):
            continue  # replaced by a symlink since it was listed: never delete outside the cache
        if not dry_run:
            try:
                # The marker first: a removal stopped halfway leaves a half-built environment, which
                # fresh_env rebuilds, never a broken one it would reuse.
                if env.ready:
                    os.unlink(os.path.join(env.path, READY_MARKER))
                shutil.rmtree(env.path)
            except OSError as error:
                done = f" (removed before it: {', '.join(e.key for e in removed)})" if removed else ""
                raise FullModelError(f"Cannot remove the environment {env.path}: {error.strerror or error}"
                                     f"{done}. Check its permissions, or delete it by hand.") from None
        removed.append(env)
    return PruneResult(removed=removed, freed=sum(env.size for env in removed), dry_run=dry_run)
