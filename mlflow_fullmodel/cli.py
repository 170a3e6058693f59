"""The ``mlflow-fullmodel`` command: check and describe saved models from the shell."""

from __future__ import annotations

import json
import os

import click

from mlflow_fullmodel.exceptions import FullModelError


def _download(model_uri: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    try:
        return _download_artifact_from_uri(model_uri)
    except (MlflowException, OSError) as error:
        raise click.BadParameter(str(error), param_hint="MODEL_URI") from None


@click.group()
def main() -> None:
    """Check and describe models saved with the fullmodel MLflow flavor."""


@main.command()
@click.argument("model_uri")
def verify(model_uri: str) -> None:
    """Check a model before promoting it: every file against its sha256, then load it in a clean
    Python process and require it to reproduce its golden example.

    MODEL_URI is anything MLflow resolves: models:/name@alias, models:/name/1, runs:/id/model, a path.
    """
    from mlflow_fullmodel.flavor import FLAVOR_NAME, check_parity_of
    from mlflow_fullmodel.storage import load_fullmodel, read_golden

    path = _download(model_uri)
    try:
        from mlflow.utils.model_utils import _get_flavor_configuration

        folder = os.path.join(path, _get_flavor_configuration(path, FLAVOR_NAME)["data"])
        load_fullmodel(folder)  # integrity: hashes of every file
        if read_golden(folder) is None:
            raise click.ClickException(f"{model_uri} has no golden example to check (saved with check_parity=False).")
        check_parity_of(path)
    except FullModelError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"OK: {model_uri} is intact and reproduces its golden example in a clean process.")


@main.command()
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True, help="Print the whole spec as JSON.")
def describe(model_uri: str, as_json: bool) -> None:
    """Show a model's steps, runtime parameters, modules and requirements."""
    from mlflow_fullmodel.flavor import FLAVOR_NAME
    from mlflow_fullmodel.storage import read_spec

    path = _download(model_uri)
    try:
        from mlflow.utils.model_utils import _get_flavor_configuration

        spec = read_spec(os.path.join(path, _get_flavor_configuration(path, FLAVOR_NAME)["data"]))
    except FullModelError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(spec, indent=2))
        return
    click.echo(f"inputs: {', '.join(spec['input_columns'])}")
    for stage in ("preprocess", "collate", "forward", "postprocess"):
        steps = spec[stage] if isinstance(spec[stage], list) else [spec[stage]]
        for step in steps:
            config = ", ".join(f"{k}={json.dumps(v)}" for k, v in step["config"].items())
            click.echo(f"{stage:>11}: {step['target']}({config})")
    for name, entry in spec["modules"].items():
        click.echo(f"     module: {name} ({entry['format']}, {entry['file']})")
    for name, param in spec["params"].items():
        click.echo(f"      param: {name}={param['default']!r} ({param['type']}, {param['step']})")
    click.echo(f"requirements: {', '.join(spec['requirements']) or '-'}")
