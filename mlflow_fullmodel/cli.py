"""The ``mlflow-fullmodel`` command: thin click commands over ``verification``, ``lifecycle`` and ``env_cache``.

Every error is one line, ``Error: ...``, with exit code 1 (or 2 for a usage error), no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

import mlflow_fullmodel
from mlflow_fullmodel.env_cache import ENV_CACHE_VARIABLE, CachedEnv
from mlflow_fullmodel.exceptions import FullModelError
from mlflow_fullmodel.settings import DEFAULT_GRACE_PERIOD_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH

if TYPE_CHECKING:
    from mlflow_fullmodel.lifecycle import Promotion

ALLOW_BUILDS_HELP = ("With --fresh-env: let pip build source distributions (runs their setup.py); wheels only by "
                     "default.")


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """Our errors and MLflow's (a missing version, an unreachable server, a folder that is no model:
    some MLflow versions raise OSError for it) as one line, no traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except FullModelError as error:
        raise click.ClickException(str(error)) from None
    except MlflowException as error:
        raise click.ClickException(error.message) from None
    except OSError as error:
        raise click.ClickException(str(error)) from None


@click.group()
@click.version_option(mlflow_fullmodel.__version__, prog_name="mlflow-fullmodel")
def main() -> None:
    """Inspect, verify, sign, compare and promote models saved with the fullmodel MLflow flavor."""
    if not sys.stderr.isatty():
        # MLflow draws its download bar into logs and captured output too; a terminal keeps it.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@main.command()
@click.argument("model_uri")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="Require a signature made with the private half of this PEM public key.")
@click.option("--fresh-env", is_flag=True,
              help="Also check parity in a new environment built from the model's requirements.txt.")
@click.option("--allow-builds", is_flag=True,
              help=ALLOW_BUILDS_HELP)
def verify(model_uri: str, public_key: str | None, fresh_env: bool, allow_builds: bool) -> None:
    """Check a model before serving or promoting it: every file against the digest recorded in the
    registry and against the model's manifest, the spec, the signature (with --public-key), then
    load it in a clean Python process and require it to reproduce its golden example.

    MODEL_URI is anything MLflow resolves: models:/name@alias, models:/name/1, runs:/id/model, a path.
    """
    from mlflow_fullmodel.verification import verify_model

    with _errors_as_messages():
        report = verify_model(model_uri, public_key=public_key, fresh_env=fresh_env, allow_builds=allow_builds,
                              keep_download=False)
    recorded = f", matching the digest recorded in {report.record.source}" if report.record else \
        " (no digest recorded in a registry for this URI: checked against its own manifest)"
    click.echo(f"OK: {model_uri} is intact ({report.digest}{recorded}); checked: {', '.join(report.checks)}. "
               "It reproduces its golden example in a clean process.")


@main.command(name="serve")
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", "-p", default=5000, show_default=True, type=int)
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="Serve only a model signed with the private half of this PEM public key.")
@click.option("--max-body-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True, type=click.IntRange(min=1))
@click.option("--max-json-depth", default=DEFAULT_MAX_JSON_DEPTH, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes, each with its own copy of the model (as mlflow models serve -w).")
@click.option("--grace-period", default=DEFAULT_GRACE_PERIOD_S, show_default=True, type=click.IntRange(min=0),
              help="On SIGTERM, seconds to finish the requests already taken before stopping.")
@click.option("--follow-alias", is_flag=True,
              help="With models:/NAME@ALIAS: when the alias moves, verify, load and warm the new version beside "
                   "the old one, then swap (a version that fails keeps the old one serving).")
@click.option("--poll-s", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="With --follow-alias: seconds between looks at the alias.")
@click.option("--metrics/--no-metrics", default=True, show_default=True, help="Keep Prometheus metrics at /metrics.")
@click.option("--name", "model_name", default=None,
              help="The model's name in the Open Inference Protocol's paths (/v2/models/NAME/infer). Default: the "
                   "registered model's name for a models:/ URI, else the URI's last part (runs:/ID/model: model).")
def serve_command(model_uri: str, host: str, port: int, public_key: str | None, max_body_bytes: int,
                  max_json_depth: int, workers: int, grace_period: int, follow_alias: bool, poll_s: float,
                  metrics: bool, model_name: str | None) -> None:
    """Verify a model, then serve it as `mlflow models serve` does (same payloads, same answers),
    with bad requests refused cleanly: a missing Content-Type, a body or JSON nesting over the
    limits, unknown params; every error a JSON body without trace, path or echo of the request.

    For operators: GET /metrics (Prometheus), GET /ready (200 once the model is verified, loaded
    and warmed up), an X-Request-ID on every answer and a JSON access log line per request on
    stdout; SIGTERM answers every request taken, then exits 0. The Open Inference Protocol (KServe
    V2, Triton clients) is served beside /invocations under /v2, with the same checks.
    """
    from mlflow_fullmodel.oip import valid_name
    from mlflow_fullmodel.registry import registered_version
    from mlflow_fullmodel.rollout import module_format
    from mlflow_fullmodel.server import ServerSettings, serve
    from mlflow_fullmodel.verification import verify_model

    alias = model_uri.partition("@")[2] if model_uri.startswith("models:/") else ""
    if follow_alias and not alias:
        raise click.UsageError("--follow-alias needs a models:/NAME@ALIAS model URI.")
    if model_name is not None and not valid_name(model_name):
        raise click.BadParameter("a name of letters, digits and ._- (up to 128), starting with a letter or digit.",
                                 param_hint="'--name'")
    with _errors_as_messages():
        # The alias's version, pinned: it may move while this one is verified.
        version = registered_version(model_uri)
        pinned = f"models:/{version.name}/{version.version}" if version is not None else model_uri
        report = verify_model(pinned, public_key=public_key)
        info = (version.name, str(version.version)) if version is not None else ("", "")
        name = model_name or (version.name if version is not None else _name_of_uri(model_uri))
        settings = ServerSettings(report.local_path, (*info, report.digest, module_format(report.local_path)),
                                  max_body_bytes, max_json_depth, follow_alias=alias if follow_alias else None,
                                  poll_s=poll_s, public_key=public_key, metrics=metrics, name=name)
    click.echo(f"Verified {pinned} ({report.digest}; {', '.join(report.checks)}); serving on http://{host}:{port}",
               err=True)
    try:
        with _errors_as_messages():
            serve(settings, host, port, workers, grace_period)
    finally:
        if report.download_dir is not None:
            shutil.rmtree(report.download_dir, ignore_errors=True)


def _name_of_uri(model_uri: str) -> str:
    """The OIP name of a model served from a URI outside the registry: its last part, with each
    character OIP paths do not take (``medium+int8``) made a ``-``; ``model`` if nothing is left."""
    import re

    from mlflow_fullmodel.oip import valid_name

    name = re.sub(r"[^A-Za-z0-9._-]", "-", model_uri.rstrip("/").rpartition("/")[2]).lstrip("._-")[:128]
    return name if valid_name(name) else "model"


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


@main.command(name="inspect")
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect_command(model_uri: str, as_json: bool) -> None:
    """Show a model without running it: steps and their configuration, artifacts and modules with
    sizes and hashes, runtime parameters, signature, requirements, the golden example, the digest
    recorded in the registry and the last verification."""
    from mlflow_fullmodel.inspection import config_text
    from mlflow_fullmodel.lifecycle import inspect_model

    with _errors_as_messages():
        facts = inspect_model(model_uri)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"inputs: {', '.join(facts['inputs'])}   outputs: {', '.join(facts['outputs'])}   "
               f"batch size: {facts['batch_size']}")
    for step in facts["steps"]:
        config = ", ".join(f"{k}={config_text(v)}" for k, v in step["config"].items())
        click.echo(f"{step['step']:>15}: {step['target']}({config})")
    for module in facts["modules"]:
        click.echo(f"         module: {module['name']} ({module['format']}, {module['file']}, {module['size']} bytes, "
                   f"methods {', '.join(module['methods'])}, sha256 {module['sha256'][:16]})")
        compiled = module.get("compiled")
        if compiled:
            runs = "the package runs here" if compiled["runs_here"] else \
                f"the portable program runs here: {compiled['why_not']}"
            click.echo(f"       compiled: {module['name']}: AOTInductor package {compiled['file']} "
                       f"({compiled['size']} bytes, sha256 {compiled['sha256'][:16]}) for {compiled['target_text']}, "
                       f"rtol {compiled['rtol']:g}; {runs}")
    quantization = facts.get("quantization")
    if quantization:
        drift = quantization["drift"]
        click.echo(f"      quantized: {quantization['scheme']} ({quantization['library']}); drift on the golden "
                   f"example: labels agree {drift['agreement']:.0%}, largest difference "
                   f"{drift['largest_difference']:.3g}")
    for artifact in facts["artifacts"]:
        # A folder's sha256 is a digest of its files' paths and hashes.
        kind = "sha256" if artifact.get("files") is None else f"a folder of {len(artifact['files'])} files, digest"
        click.echo(f"       artifact: {artifact['step']} {artifact['argument']}: {artifact['path']} "
                   f"({artifact['size']} bytes, {kind} {artifact['sha256'][:16]})")
    for param in facts["params"]:
        bounds = ", ".join(f"{k} {param[k]!r}" for k in ("minimum", "maximum", "choices") if k in param)
        click.echo(f"          param: {param['name']}={param['default']!r} ({param['type']}, {param['step']}"
                   f"{', ' + bounds if bounds else ''})")
    click.echo(f"   requirements: {', '.join(facts['requirements']) or '-'}")
    golden = facts["golden"]
    if golden:
        click.echo(f"         golden: {len(golden['inputs'])} rows, params {golden['params']}, "
                   f"{len(golden['variants'])} param variants")
    click.echo(f"         digest: {facts['digest']}")
    record = facts["recorded_digest"]
    click.echo(f"       recorded: {record['digest'] + ' in ' + record['source'] if record else '-'}")
    if facts["verification"]:
        click.echo("   verification: " + ", ".join(f"{k}={v}" for k, v in sorted(facts["verification"].items())))


@main.command()
@click.argument("uri_a")
@click.argument("uri_b")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff(uri_a: str, uri_b: str, as_json: bool) -> None:
    """Show what changed from model URI_A to model URI_B: steps, configuration, params, artifacts
    (the files that changed inside a folder), modules (for a changed network: parameters and
    buffers added, removed or changed in shape or dtype, the parameter count, the largest absolute
    difference of same-shaped weights), requirements, signature and the captured processing code."""
    from mlflow_fullmodel.lifecycle import diff_models

    with _errors_as_messages():
        differences = diff_models(uri_a, uri_b)
    if as_json:
        click.echo(json.dumps(differences, indent=2))
        return
    if not differences:
        click.echo("no differences")
        return
    for section, changes in differences.items():
        if section == "tensors":  # the same as the tensor lines of "modules", as data for --json
            continue
        if section == "code":
            click.echo("code:")
            click.echo(changes, nl=False)
            continue
        click.echo(f"{section}:")
        for change in changes:
            click.echo(f"  {change}")


def _gate_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of the registry's gate, shared by promote and rollback."""
    options = [
        click.option("--fresh-env", is_flag=True,
                     help="Also check parity in an environment built from the model's requirements."),
        click.option("--allow-builds", is_flag=True, help=ALLOW_BUILDS_HELP),
        click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
                     help="Require a signature made with the private half of this PEM public key."),
        click.option("--dry-run", is_flag=True, help="Run the gate only: move no alias, record nothing."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("name")
@click.argument("version", required=False)
@click.option("--alias", required=True, help="The alias to give the version, e.g. champion.")
@click.option("--from-alias", default=None, help="Promote the version this alias holds instead of VERSION.")
@_gate_options
def promote(name: str, version: str | None, alias: str, from_alias: str | None, fresh_env: bool,
            allow_builds: bool, public_key: str | None, dry_run: bool) -> None:
    """Verify version VERSION of registered model NAME, record the result on it as tags, then set
    ALIAS to it. On any failure no alias changes. Each attempt, passed or refused, goes into the
    model's audit trail (see: mlflow-fullmodel history NAME)."""
    from mlflow_fullmodel.lifecycle import promote as promote_version

    if (version is None) == (from_alias is None):
        raise click.UsageError("give either VERSION or --from-alias, not both and not neither.")
    with _errors_as_messages():
        done = promote_version(name, version, alias=alias, from_alias=from_alias, fresh_env=fresh_env,
                               public_key=public_key, allow_builds=allow_builds, dry_run=dry_run)
    _echo_promotion("promote", done)


def _echo_promotion(action: str, done: Promotion) -> None:
    before = f" (it was on version {done.previous})" if done.previous and done.previous != done.version else ""
    checked = f"verified {', '.join(done.verification.checks)}; digest {done.verification.digest}"
    if done.event is None:
        click.echo(f"Dry run: {done.name} version {done.version} passes the gate ({checked}). {action.capitalize()} "
                   f"would move @{done.alias} to it{before}. Nothing was recorded.")
        return
    verb = {"promote": "Promoted", "rollback": "Rolled back"}[action]
    click.echo(f"{verb} {done.name} version {done.version} to @{done.alias}{before}: {checked}.")


@main.command()
@click.argument("name")
@click.option("--alias", default=None, help="Only the events of this alias.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as a JSON list.")
def history(name: str, alias: str | None, as_json: bool) -> None:
    """Show the audit trail of registered model NAME, newest first: each promote and rollback, passed
    or refused, with when (UTC), who (MLflow's user), the alias, the version it left and the one it
    got, the digest, and for a refusal the stage that failed; --json adds each stage's result and
    the refusal's message."""
    from mlflow_fullmodel.audit import history as audit_history

    with _errors_as_messages():
        events = audit_history(name, alias)
    if as_json:
        click.echo(json.dumps([event.to_dict() for event in events], indent=2))
        return
    if not events:
        which = f" of @{alias}" if alias else ""
        click.echo(f"No promotion{which} of {name} is recorded (mlflow-fullmodel promote records each one).")
        return
    click.echo(f"{'when (UTC)':<19}  {'who':<12}  {'action':<8}  {'alias':<12}  {'from -> to':<10}  "
               f"{'digest':<19}  result")
    for event in events:
        moved = f"{event.from_version or '-'} -> {event.to_version}"
        digest = event.digest[:19] if event.digest else "-"
        failed = [stage.stage for stage in event.stages if stage.result == "failed"]
        why = (event.error or "").split(":", 1)[0]  # the error's type; its message is in --json
        result = event.result + (f" at {failed[0]}: {why}" if failed else "")
        click.echo(f"{event.at[:19].replace('T', ' '):<19}  {event.user:<12}  {event.action:<8}  {event.alias:<12}  "
                   f"{moved:<10}  {digest:<19}  {result}")


@main.command()
@click.argument("name")
@click.option("--alias", required=True, help="The alias to move back, e.g. champion.")
@_gate_options
def rollback(name: str, alias: str, fresh_env: bool, allow_builds: bool, public_key: str | None,
             dry_run: bool) -> None:
    """Move ALIAS of registered model NAME back to the version it held before its latest audited
    promotion, once that version passes promote's gate again; recorded in the audit trail. Rolling
    back again goes one more promotion back."""
    from mlflow_fullmodel.lifecycle import rollback as rollback_alias

    with _errors_as_messages():
        done = rollback_alias(name, alias=alias, fresh_env=fresh_env, public_key=public_key,
                              allow_builds=allow_builds, dry_run=dry_run)
    _echo_promotion("rollback", done)


@main.group()
def envs() -> None:
    """List and remove the environments that --fresh-env builds from a model's requirements.txt
    (1.7-1.8 GB each with torch), kept under $MLFLOW_FULLMODEL_ENV_CACHE, by default
    ~/.cache/mlflow-fullmodel/envs, one per set of requirements."""


def _size(n: float) -> str:
    """Bytes in decimal units, as disk sizes are sold: 1.8 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if round(n, 1) < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(timestamp: float) -> str:
    import time

    age = max(0.0, time.time() - timestamp)
    ago = f"{age // 60:.0f} min" if age < 3600 else f"{age // 3600:.0f} h" if age < 86400 else \
        f"{age // 86400:.0f} day{'s' if age >= 2 * 86400 else ''}"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(timestamp))} ({ago} ago)"


def _requirement_lines(text: str) -> list[str]:
    return [line for line in (raw.split("#", 1)[0].strip() for raw in text.splitlines()) if line]


def _requirements_summary(env: CachedEnv) -> str:
    state = "" if env.ready else "incomplete build; "
    if env.requirements is None:
        return state + "requirements not recorded"
    lines = [line for line in _requirement_lines(env.requirements) if not line.startswith("-")]
    more = f", +{len(lines) - 3} more" if len(lines) > 3 else ""
    return state + (", ".join(lines[:3]) + more if lines else "no requirements")


@envs.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def envs_list(as_json: bool) -> None:
    """Show each cached environment, most recently used first: its requirements hash (the folder's
    name), size, last use and the requirements it was built from."""
    from datetime import datetime, timezone

    from mlflow_fullmodel.env_cache import cache_dir, list_envs

    with _errors_as_messages():
        found = list_envs()
    total = sum(env.size for env in found)
    if as_json:
        click.echo(json.dumps({"cache": cache_dir(), "total_bytes": total, "envs": [
            {"key": env.key, "path": env.path, "size_bytes": env.size, "ready": env.ready,
             "last_used": datetime.fromtimestamp(env.last_used, timezone.utc).isoformat(timespec="seconds"),
             "last_used_timestamp": env.last_used,
             "requirements": None if env.requirements is None else _requirement_lines(env.requirements)}
            for env in found]}, indent=2))
        return
    if not found:
        click.echo(f"No cached environments in {cache_dir()} (set ${ENV_CACHE_VARIABLE} to keep them elsewhere).")
        return
    click.echo(f"{'hash':<16}  {'size':>8}  {'last use':<30}  requirements")
    for env in found:
        click.echo(f"{env.key:<16}  {_size(env.size):>8}  {_when(env.last_used):<30}  {_requirements_summary(env)}")
    click.echo(f"{len(found)} environment{'s' if len(found) > 1 else ''}, {_size(total)} in total, in {cache_dir()} "
               f"(set ${ENV_CACHE_VARIABLE} to keep them elsewhere; remove them with: mlflow-fullmodel envs prune)")


@envs.command(name="prune")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Remove the environments last used more than DAYS days ago.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every cached environment.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
def envs_prune(older_than: float | None, remove_all: bool, dry_run: bool) -> None:
    """Remove cached environments: those last used more than DAYS days ago, or all. A half-built
    one (an interrupted build) counts from its last write. The next --fresh-env check of the same
    requirements builds its environment again (minutes: it installs torch)."""
    from mlflow_fullmodel.env_cache import cache_dir, prune_envs

    if (older_than is None) == (not remove_all):
        raise click.UsageError("give --older-than DAYS (remove the environments last used more than DAYS days ago) "
                               "or --all, not both and not neither.")
    with _errors_as_messages():
        result = prune_envs(older_than, remove_all=remove_all, dry_run=dry_run)
    if not result.removed:
        which = "" if remove_all else f" last used more than {older_than:g} days ago"
        click.echo(f"Nothing to remove: no cached environment{which} in {cache_dir()}.")
        return
    for env in result.removed:
        click.echo(f"{'Would remove' if dry_run else 'Removed'} {env.key} ({_size(env.size)}, last used "
                   f"{_when(env.last_used)}): {_requirements_summary(env)}")
    count = f"{len(result.removed)} environment{'s' if len(result.removed) > 1 else ''}"
    click.echo(f"{'Would free' if dry_run else 'Freed'} {_size(result.freed)} ({count}) in {cache_dir()}."
               + (" Nothing was removed (--dry-run)." if dry_run else ""))


if __name__ == "__main__":
    main()
