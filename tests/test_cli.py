"""The mlflow-fullmodel command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, text_model) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model"
    fm.save_model(text_model, str(path), input_example=EXAMPLE_TEXTS)
    return path


def test_verify_passes_an_intact_model(model_path):
    result = CliRunner().invoke(main, ["verify", str(model_path)])
    assert result.exit_code == 0, result.output
    assert "reproduces its golden example" in result.output


def test_verify_by_registry_alias(registered_reviews):
    result = CliRunner().invoke(main, ["verify", "models:/reviews@champion"])
    assert result.exit_code == 0, result.output


def test_verify_fails_on_a_tampered_file_naming_it(tmp_path, model_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_path, copy)
    golden = copy / "fullmodel" / "golden.json"
    golden.write_text(golden.read_text().replace('"params": {}', '"params": {"k": 2}'))
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "changed since saving: ['fullmodel/golden.json']" in result.output
    assert "Traceback" not in result.output


def test_a_uri_that_does_not_resolve_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: Cannot download {tmp_path / 'nothing'}: No such")
    assert result.output.count("\n") == 1
