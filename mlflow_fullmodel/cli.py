"""The ``mlflow-fullmodel`` command: check and describe saved models from the shell."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import click

from mlflow_fullmodel.exceptions import FullModelError


def _download(model_uri: str) -> str:
    from mlflow_fullmodel.exceptions import ModelFormatError
    from mlflow_fullmodel.verification import download_model

    try:
        return download_model(model_uri)
    except ModelFormatError as error:
        raise click.BadParameter(str(error), param_hint="MODEL_URI") from None


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """Our errors and MLflow's (a missing version, an unreachable server) as one line, no traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except FullModelError as error:
        raise click.ClickException(str(error)) from None
    except MlflowException as error:
        raise click.ClickException(error.message) from None


@click.group()
def main() -> None:
    """Check and describe models saved with the fullmodel MLflow flavor."""


@main.command()
@click.argument("model_uri")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="Require a signature made with the private half of this PEM public key.")
def verify(model_uri: str, public_key: str | None) -> None:
    """Check a model before serving or promoting it: every file against the digest recorded in the
    registry and against the model's manifest, the spec, the signature (with --public-key), then
    load it in a clean Python process and require it to reproduce its golden example.

    MODEL_URI is anything MLflow resolves: models:/name@alias, models:/name/1, runs:/id/model, a path.
    """
    from mlflow_fullmodel.verification import verify_model

    with _errors_as_messages():
        report = verify_model(model_uri, public_key=public_key)
    recorded = f", matching the digest recorded in {report.record.source}" if report.record else \
        " (no digest recorded in a registry for this URI: checked against its own manifest)"
    click.echo(f"OK: {model_uri} is intact ({report.digest}{recorded}); checked: {', '.join(report.checks)}. "
               "It reproduces its golden example in a clean process.")


@main.command()
@click.argument("model_uri")
@click.option("--key", "private_key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An elliptic-curve private key (PEM).")
@click.option("--password", default=None, help="The private key's password, if it has one.")
def sign(model_uri: str, private_key: str, password: str | None) -> None:
    """Sign a model (a local folder, or a logged or registered model in its artifact store) with a
    private key; check it later with: mlflow-fullmodel verify MODEL_URI --public-key KEY.pub"""
    from mlflow_fullmodel.verification import sign_model

    with _errors_as_messages():
        where = sign_model(model_uri, private_key, password)
    click.echo(f"Signed {model_uri}: {where}")


@main.command()
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True, help="Print the whole spec as JSON.")
def describe(model_uri: str, as_json: bool) -> None:
    """Show a model's steps, runtime parameters, modules and requirements."""
    from mlflow_fullmodel.flavor import flavor_configuration
    from mlflow_fullmodel.storage import read_spec

    path = _download(model_uri)
    with _errors_as_messages():
        spec = read_spec(os.path.join(path, flavor_configuration(path)["data"]))
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
