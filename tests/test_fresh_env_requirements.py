"""A model's requirements.txt is untrusted input: its fresh environment installs named packages
only, and refuses, naming the line, anything pip would read as an option, a path or a URL."""

from __future__ import annotations

import pytest

import mlflow_fullmodel as fm
from mlflow_fullmodel.fresh_env import ENV_CACHE_VARIABLE, fresh_env, named_requirements

REFUSED = {
    "an index": ("--index-url https://packages.example/simple", "a pip option"),
    "an extra index": ("--extra-index-url=https://packages.example/simple", "a pip option"),
    "an editable folder": ("-e ./evil", "a pip option"),
    "another file": ("-r more.txt", "a pip option"),
    "a constraints file": ("-c constraints.txt", "a pip option"),
    "links to search": ("-f ./wheels", "a pip option"),
    "a trusted host": ("--trusted-host packages.example", "a pip option"),
    "a relative folder": ("./evil", "not a named requirement"),
    "an absolute folder": ("/opt/evil", "not a named requirement"),
    "a URL": ("https://packages.example/evil-1.0.tar.gz", "not a named requirement"),
    "a direct reference": ("evil @ file:///opt/evil", "a direct reference"),
    "a local wheel by name": ("evil-1.0-py3-none-any.whl", "a file name"),
    "a local sdist by name": ("evil.tar.gz", "a file name"),
}


@pytest.mark.parametrize("line, problem", REFUSED.values(), ids=REFUSED.keys())
def test_a_line_that_is_not_a_named_requirement_is_refused_naming_it(line, problem):
    text = f"# the model's requirements\ntorch==2.13.0\n\n{line}\nnumpy\n"
    with pytest.raises(fm.ParityError) as caught:
        named_requirements(text, "model/requirements.txt")
    assert caught.value.stage == "install"
    assert str(caught.value).startswith(f"model/requirements.txt line 4 ({line!r}) is {problem}")


def test_named_requirements_with_versions_extras_markers_and_comments_are_kept():
    text = ("# written by mlflow\n\ntorch==2.13.0\nmlflow[auth]>=3.0,<4  # the tracking client\n"
            "tokenizers>=0.15; python_version >= '3.10'\nsentencepiece\n")
    assert named_requirements(text) == ["torch==2.13.0", "mlflow[auth]>=3.0,<4",
                                        "tokenizers>=0.15; python_version >= '3.10'", "sentencepiece"]


def test_an_editable_install_in_a_models_requirements_runs_nothing_and_builds_no_environment(tmp_path, monkeypatch):
    cache = tmp_path / "envs"
    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(cache))
    marker = tmp_path / "marker"
    evil = tmp_path / "model" / "evil"
    evil.mkdir(parents=True)
    (evil / "setup.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom setuptools import setup\nsetup(name='evil')\n")
    requirements = tmp_path / "model" / "requirements.txt"
    requirements.write_text("numpy\n-e ./evil\n")
    with pytest.raises(fm.ParityError, match=r"requirements.txt line 2 \('-e ./evil'\) is a pip option"):
        fresh_env(str(requirements))
    assert not marker.exists() and not cache.exists()
