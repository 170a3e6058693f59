"""The cache of fresh environments: `mlflow-fullmodel envs list` and `envs prune`, and the last use
that `fresh_env` records when it reuses an environment.

The environments here are real folders in a temporary cache, with files of known sizes, a ready
marker (or none, for a half-built one) and mtimes set with os.utime; one test builds a real
(empty) virtual environment through `fresh_env`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_fullmodel.cli import main
from mlflow_fullmodel.env_cache import (
    ENV_CACHE_VARIABLE,
    READY_MARKER,
    REQUIREMENTS_RECORD,
    list_envs,
    prune_envs,
)
from mlflow_fullmodel.exceptions import FullModelError
from mlflow_fullmodel.fresh_env import fresh_env

DAY = 86400
NOW = 1_750_000_000  # a fixed "now" for the boundary tests, in whole seconds
REQUIREMENTS = "torch==2.13.0\nmlflow>=3.0\n# a comment\n\nnumpy>=1.24\npandas>=2.0\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "envs"
    folder.mkdir()
    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(folder))
    return folder


def make_env(cache: Path, key: str, last_used: float, sizes: dict[str, int], *, ready: bool = True,
             requirements: str | None = REQUIREMENTS) -> int:
    """An environment folder ``key`` with files of the given sizes; returns its size in bytes.
    A ready one's last use is its marker's mtime; a half-built one's is its newest write, so every
    entry of it gets ``last_used`` as mtime."""
    env = cache / key
    env.mkdir()
    size = 0
    for name, n in sizes.items():
        (env / name).parent.mkdir(parents=True, exist_ok=True)
        (env / name).write_bytes(b"x" * n)
        size += n
    if requirements is not None:
        (env / REQUIREMENTS_RECORD).write_text(requirements)
        size += len(requirements.encode())
    if ready:
        (env / READY_MARKER).write_text("requirements.txt\n")
        size += len("requirements.txt\n")
        os.utime(env / READY_MARKER, (last_used, last_used))
    else:
        for path in sorted(env.rglob("*"), reverse=True) + [env]:
            os.utime(path, (last_used, last_used), follow_symlinks=False)
    return size


def keys(envs) -> list[str]:
    return [env.key for env in envs]


# --- listing ---------------------------------------------------------------------------------------

def test_list_gives_each_environment_its_size_last_use_state_and_requirements_most_recent_first(cache):
    old = make_env(cache, "a" * 16, NOW - 40 * DAY, {"lib/torch.so": 1_500_000, "bin/python3": 2_000})
    recent = make_env(cache, "b" * 16, NOW - 1 * DAY, {"lib/x.py": 3_000})
    half = make_env(cache, "c" * 16, NOW - 5 * DAY, {"lib/partial.whl": 700}, ready=False, requirements=None)
    envs = list_envs()
    assert keys(envs) == ["b" * 16, "c" * 16, "a" * 16]
    assert [env.size for env in envs] == [recent, half, old]
    assert [env.last_used for env in envs] == [NOW - 1 * DAY, NOW - 5 * DAY, NOW - 40 * DAY]
    assert [env.ready for env in envs] == [True, False, True]
    assert envs[0].requirements == REQUIREMENTS and envs[1].requirements is None
    assert envs[2].path == str(cache / ("a" * 16))


def test_list_of_a_cache_that_does_not_exist_yet_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(tmp_path / "never-made"))
    assert list_envs() == []
    result = CliRunner().invoke(main, ["envs", "list"])
    assert result.exit_code == 0, result.output
    assert result.output == f"No cached environments in {tmp_path / 'never-made'} (set ${ENV_CACHE_VARIABLE} " \
                            "to keep them elsewhere).\n"


def test_envs_list_prints_a_table_with_human_sizes_last_use_and_a_summary_of_the_requirements(cache):
    make_env(cache, "a" * 16, time.time() - 40 * DAY, {"lib/torch.so": 1_600_000})
    make_env(cache, "b" * 16, time.time() - 3 * 3600, {"lib/x.py": 1_900}, requirements="torch==2.13.0\n")
    make_env(cache, "c" * 16, time.time() - 2 * DAY, {"lib/partial": 10}, ready=False, requirements=None)
    result = CliRunner().invoke(main, ["envs", "list"])
    assert result.exit_code == 0, result.output
    header, *rows, footer = result.output.splitlines()
    assert header.split() == ["hash", "size", "last", "use", "requirements"]
    assert [row.split()[0] for row in rows] == ["b" * 16, "c" * 16, "a" * 16]
    b, c, a = rows
    assert "1.9 kB" in b and "(3 h ago)" in b and b.endswith("torch==2.13.0")
    assert "(2 days ago)" in c and c.endswith("incomplete build; requirements not recorded")
    assert "1.6 MB" in a and "(40 days ago)" in a and a.endswith("torch==2.13.0, mlflow>=3.0, numpy>=1.24, +1 more")
    assert time.strftime("%Y-%m-%d", time.localtime(time.time() - 40 * DAY)) in a
    assert footer.startswith(f"3 environments, 1.6 MB in total, in {cache} (set ${ENV_CACHE_VARIABLE}")


def test_envs_list_json_has_exact_sizes_times_and_requirement_lines(cache):
    old = make_env(cache, "a" * 16, NOW - 40 * DAY, {"lib/torch.so": 1_500_000})
    half = make_env(cache, "c" * 16, NOW, {"lib/partial": 10}, ready=False)
    result = CliRunner().invoke(main, ["envs", "list", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["cache"] == str(cache) and facts["total_bytes"] == old + half
    assert [e["key"] for e in facts["envs"]] == ["c" * 16, "a" * 16]
    half_facts, old_facts = facts["envs"]
    assert old_facts == {
        "key": "a" * 16, "path": str(cache / ("a" * 16)), "size_bytes": old, "ready": True,
        "last_used": datetime.fromtimestamp(NOW - 40 * DAY, timezone.utc).isoformat(timespec="seconds"),
        "last_used_timestamp": NOW - 40 * DAY,
        "requirements": ["torch==2.13.0", "mlflow>=3.0", "numpy>=1.24", "pandas>=2.0"],
    }
    assert half_facts["ready"] is False and half_facts["size_bytes"] == half


def test_envs_list_runs_as_a_real_command(cache):
    size = make_env(cache, "d" * 16, time.time() - 10 * DAY, {"lib/torch.so": 2_500_000})
    env = {**os.environ, ENV_CACHE_VARIABLE: str(cache)}
    result = subprocess.run([sys.executable, "-m", "mlflow_fullmodel.cli", "envs", "list"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("d" * 16) and "2.5 MB" in lines[1]
    assert "(10 days ago)" in lines[1]
    assert lines[2].startswith(f"1 environment, 2.5 MB in total, in {cache}")
    assert size == 2_500_000 + len(REQUIREMENTS) + len("requirements.txt\n")


# --- pruning ---------------------------------------------------------------------------------------

def test_prune_older_than_keeps_an_environment_used_exactly_at_the_boundary_and_removes_one_second_past_it(cache):
    make_env(cache, "a" * 16, NOW - 30 * DAY, {"f": 10})  # exactly 30 days: not older than 30 days
    make_env(cache, "b" * 16, NOW - 30 * DAY + 1, {"f": 20})  # just inside
    past = make_env(cache, "c" * 16, NOW - 30 * DAY - 1, {"f": 40})  # just outside
    result = prune_envs(30, now=NOW)
    assert keys(result.removed) == ["c" * 16] and result.freed == past and not result.dry_run
    assert sorted(p.name for p in cache.iterdir()) == ["a" * 16, "b" * 16]
    # Fractional days, the same rule: "a" exactly half a day old is kept, one second older it goes.
    assert keys(prune_envs(0.5, now=NOW - 29.5 * DAY).removed) == []
    assert keys(prune_envs(0.5, now=NOW - 29.5 * DAY + 1).removed) == ["a" * 16]


def test_envs_prune_older_than_removes_the_old_ones_and_says_how_much_it_freed(cache):
    old = make_env(cache, "a" * 16, time.time() - 40 * DAY, {"lib/torch.so": 1_600_000})
    older = make_env(cache, "b" * 16, time.time() - 90 * DAY, {"lib/torch.so": 1_120})  # 1,200 bytes in all
    make_env(cache, "c" * 16, time.time() - 1 * DAY, {"lib/torch.so": 1_000})
    result = CliRunner().invoke(main, ["envs", "prune", "--older-than", "30"])
    assert result.exit_code == 0, result.output
    first, second, freed = result.output.splitlines()
    assert first.startswith(f"Removed {'a' * 16} (1.6 MB, last used ") and "(40 days ago)" in first
    assert second.startswith(f"Removed {'b' * 16} (1.2 kB, last used ")
    assert freed == f"Freed {(old + older) / 1e6:.1f} MB (2 environments) in {cache}."
    assert [p.name for p in cache.iterdir()] == ["c" * 16]
    again = CliRunner().invoke(main, ["envs", "prune", "--older-than", "30"])
    assert again.output == f"Nothing to remove: no cached environment last used more than 30 days ago in {cache}.\n"


def test_envs_prune_all_removes_every_environment_half_built_ones_too_and_nothing_else(cache):
    make_env(cache, "a" * 16, time.time(), {"lib/x": 100})
    make_env(cache, "b" * 16, time.time(), {"lib/partial": 100}, ready=False, requirements=None)
    (cache / "notes").mkdir()  # not named like an environment: not ours to remove
    (cache / "notes" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["envs", "prune", "--all"])
    assert result.exit_code == 0, result.output
    assert "Removed " + "b" * 16 in result.output and "incomplete build; requirements not recorded" in result.output
    assert result.output.splitlines()[-1].startswith("Freed ") and "(2 environments)" in result.output
    assert [p.name for p in cache.iterdir()] == ["notes"] and (cache / "notes" / "keep.txt").read_text() == "mine"


def test_dry_run_says_what_would_go_and_removes_nothing(cache):
    sizes = {"lib/torch.so": 1_000, "bin/python": 10}
    made = [make_env(cache, key * 16, time.time() - 60 * DAY, sizes) for key in "ab"]
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    for options in (["--all"], ["--older-than", "1"]):
        result = CliRunner().invoke(main, ["envs", "prune", *options, "--dry-run"])
        assert result.exit_code == 0, result.output
        assert result.output.count("Would remove ") == 2 and "Removed" not in result.output
        assert result.output.splitlines()[-1] == \
            f"Would free {sum(made) / 1000:.1f} kB (2 environments) in {cache}. Nothing was removed (--dry-run)."
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before
    assert [env.ready for env in list_envs()] == [True, True]


def test_a_half_built_environment_counts_from_its_last_write(cache):
    interrupted = make_env(cache, "a" * 16, NOW - 10 * DAY, {"lib/partial.whl": 500}, ready=False)
    make_env(cache, "b" * 16, NOW - 10 * DAY, {"lib/partial.whl": 500}, ready=False)
    os.utime(cache / ("b" * 16) / "lib" / "partial.whl", (NOW - 60, NOW - 60))  # a build still writing
    envs = {env.key: env for env in list_envs()}
    assert envs["a" * 16].last_used == NOW - 10 * DAY and envs["b" * 16].last_used == NOW - 60
    result = prune_envs(1, now=NOW)
    assert keys(result.removed) == ["a" * 16] and result.freed == interrupted
    assert [p.name for p in cache.iterdir()] == ["b" * 16]


@pytest.mark.parametrize("options", [[], ["--older-than", "3", "--all"], ["--dry-run"]])
def test_envs_prune_without_exactly_one_of_older_than_and_all_is_a_usage_error(cache, options):
    make_env(cache, "a" * 16, 0, {"f": 1})
    result = CliRunner().invoke(main, ["envs", "prune", *options])
    assert result.exit_code == 2
    assert "Error: give --older-than DAYS (remove the environments last used more than DAYS days ago) or --all" \
        in result.output
    assert [p.name for p in cache.iterdir()] == ["a" * 16]
    with pytest.raises(FullModelError, match="not both and not neither"):
        prune_envs()


def test_a_negative_number_of_days_is_refused(cache):
    result = CliRunner().invoke(main, ["envs", "prune", "--older-than", "-1"])
    assert result.exit_code == 2 and "-1" in result.output
    with pytest.raises(FullModelError, match="0 or more"):
        prune_envs(-1)


def test_symlinks_to_outside_the_cache_are_neither_followed_nor_deleted_through(cache, tmp_path):
    outside = tmp_path / "outside"
    (outside / "lib").mkdir(parents=True)
    (outside / READY_MARKER).write_text("")
    (outside / "lib" / "precious.bin").write_bytes(b"p" * 5_000)
    os.utime(outside / READY_MARKER, (NOW - 90 * DAY, NOW - 90 * DAY))
    size = make_env(cache, "a" * 16, NOW - 90 * DAY, {"lib/x": 100})
    (cache / ("a" * 16) / "lib" / "escape").symlink_to(outside, target_is_directory=True)
    (cache / ("b" * 16)).symlink_to(outside, target_is_directory=True)  # looks like an environment
    (env,) = list_envs()
    escape_size = len(os.fsencode(outside))  # a symlink counts as itself, not as what it points to
    assert env.key == "a" * 16 and env.size == size + escape_size
    result = prune_envs(remove_all=True)
    assert keys(result.removed) == ["a" * 16]
    assert (outside / "lib" / "precious.bin").read_bytes() == b"p" * 5_000 and (outside / READY_MARKER).exists()
    assert (cache / ("b" * 16)).is_symlink()  # not an environment fresh_env made: left as it is


# --- fresh_env records use ---------------------------------------------------------------------------

def test_fresh_env_reusing_a_cached_environment_records_its_last_use(cache, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(REQUIREMENTS)
    key = hashlib.sha256(REQUIREMENTS.encode()).hexdigest()[:16]
    make_env(cache, key, time.time() - 40 * DAY, {"bin/python": 10})
    assert keys(prune_envs(30, dry_run=True).removed) == [key]
    before = time.time()
    assert fresh_env(str(requirements)) == str(cache / key / "bin" / "python")
    (env,) = list_envs()
    assert env.ready and before - 1 <= env.last_used <= time.time() + 1
    assert sorted(p.name for p in (cache / key).iterdir()) == sorted([READY_MARKER, REQUIREMENTS_RECORD, "bin"])
    assert prune_envs(30).removed == []  # just used: kept


def test_an_environment_fresh_env_builds_records_its_requirements_and_prunes_entirely(cache, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install\n")
    python = fresh_env(str(requirements))  # a real venv (pip, no packages): seconds
    (env,) = list_envs()
    assert python == os.path.join(env.path, "bin", "python") and env.ready
    assert env.requirements == "# nothing to install\n"
    assert env.size > 1_000_000  # pip alone; lib64 -> lib is not counted twice
    result = CliRunner().invoke(main, ["envs", "prune", "--all"])
    assert result.exit_code == 0, result.output
    assert f"Removed {env.key}" in result.output and "no requirements" in result.output
    assert list(cache.iterdir()) == []
