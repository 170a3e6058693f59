"""The audit trail of promotions against a real SQLite registry: each promote and rollback, passed or
refused, is an event on the registered model (who, when, from which version to which, the digest,
each gate stage's result) that outlives the alias moving again and the version being deleted; a
dry run records nothing; rollback re-verifies and goes back one audited promotion at a time.

The tests run in order on one registered model, each from where the one before left it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import pytest
from click.testing import CliRunner
from sample_steps import LABELS
from support import EXAMPLE_TEXTS
from test_integrity import artifact_folder, edit_spec

import mlflow_fullmodel as fm
from mlflow_fullmodel._mlflow import mlflow_user
from mlflow_fullmodel.audit import AUDIT_TAG, PROMOTION_TAG, AuditEvent, StageResult, history, new_event, stage_results
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.lifecycle import VERIFICATION_TAG, promote, rollback
from mlflow_fullmodel.registry import DIGEST_TAG

NAME = "audited"
WRONG = "sha256:" + "0" * 64
PASSED = ["digest", "manifest", "spec", "parity"]


@pytest.fixture(scope="module")
def versions(tracking, text_model) -> dict[str, str]:
    """Four versions of one registered model, no alias set: "one", "two", "three" and "tampered"
    (rewritten consistently in the artifact store after logging)."""
    made = {}
    for label in ("one", "two", "three", "tampered"):
        with mlflow.start_run():
            info = fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name=NAME)
        made[label] = str(info.registered_model_version)
    edit_spec(artifact_folder(f"models:/{NAME}/{made['tampered']}"),
              lambda spec: spec["postprocess"][0]["config"].__setitem__("labels", LABELS[::-1]))
    return made


@pytest.fixture
def as_user(monkeypatch) -> Callable[[str], None]:
    """MLflow's user is whoever MLFLOW_TRACKING_USERNAME names."""
    def become(name: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    return become


def alias_version(alias: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, alias).version)


def registry_state() -> dict:
    """Everything the registry holds about the model: its tags and aliases, each version's tags."""
    client = mlflow.MlflowClient()
    model = client.get_registered_model(NAME)
    return {"tags": dict(model.tags), "aliases": dict(model.aliases),
            "versions": {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{NAME}'")}}


def recorded_digest_of(version: str) -> str:
    return mlflow.MlflowClient().get_model_version(NAME, version).tags[DIGEST_TAG]


@contextmanager
def wrong_digest_recorded(version: str) -> Iterator[None]:
    """The digest recorded for ``version`` no longer matches its files, for a while."""
    client = mlflow.MlflowClient()
    right = recorded_digest_of(version)
    client.set_model_version_tag(NAME, version, DIGEST_TAG, WRONG)
    try:
        yield
    finally:
        client.set_model_version_tag(NAME, version, DIGEST_TAG, right)


# -- who and the stages, without a registry ------------------------------------------------------


def test_the_user_is_the_one_mlflow_records_on_a_run(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    assert mlflow_user() == "alice"
    with mlflow.start_run() as run:
        pass
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags["mlflow.user"] == "alice"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with mlflow.start_run() as run:
        pass
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags["mlflow.user"] == mlflow_user() != "alice"


def test_each_stage_passed_the_first_that_did_not_failed_and_the_rest_did_not_run():
    checks = ["digest recorded in model version m/1", "manifest"]
    assert stage_results(PASSED, checks, refused=True) == (
        StageResult("digest", "passed"), StageResult("manifest", "passed"), StageResult("spec", "failed"),
        StageResult("parity", "not run"))
    assert stage_results(PASSED, [], refused=True)[0] == StageResult("digest", "failed")
    assert {s.result for s in stage_results(PASSED, [*checks, "spec", "parity"], refused=False)} == {"passed"}


def test_two_events_of_the_same_millisecond_get_two_tags_and_the_error_is_one_short_line():
    events = [new_event("promote", "a", None, "1", ()) for _ in range(50)]
    assert len({event.tag for event in events}) == 50
    refused = new_event("promote", "a", "1", "2", (), error="IntegrityError: line one\n  line two " + "x" * 5000)
    assert refused.result == "refused" and refused.error.startswith("IntegrityError: line one line two xx")
    assert len(refused.error) == 1000 and refused.error.endswith("...")
    assert len(json.dumps(refused.to_dict())) < 5000  # what an older registry keeps of a model tag
    assert AuditEvent.from_dict(json.loads(json.dumps(refused.to_dict()))) == refused
    with pytest.raises(ValueError, match=r"action must be one of \['promote', 'rollback'\], not 'demote'"):
        new_event("demote", "a", None, "1", ())


# -- promote -------------------------------------------------------------------------------------


def test_promote_records_who_moved_the_alias_from_where_to_where_with_the_digest_and_each_stage(versions, as_user):
    as_user("alice")
    done = promote(NAME, versions["one"], alias="champion")
    event, = history(NAME)
    assert done.event == event
    assert (event.action, event.result, event.alias, event.from_version, event.to_version, event.user) == \
        ("promote", "moved", "champion", None, versions["one"], "alice")
    assert event.digest == recorded_digest_of(versions["one"]) == done.verification.digest
    assert event.stages == tuple(StageResult(stage, "passed") for stage in PASSED)
    assert event.error is None and event.at.endswith("+00:00") and event.mlflow_fullmodel_version == fm.__version__
    # One tag of the registered model holds it, as compact JSON.
    state = registry_state()
    assert json.loads(state["tags"][event.tag]) == event.to_dict() and event.tag.startswith(AUDIT_TAG + ".")
    tags = state["versions"][versions["one"]]
    assert {k: tags[f"{PROMOTION_TAG}.{k}"] for k in ("alias", "action", "result", "user", "time", "from_version",
                                                       "event")} == {
        "alias": "champion", "action": "promote", "result": "moved", "user": "alice", "time": event.at,
        "from_version": "", "event": event.tag}


def test_the_older_event_stays_when_the_alias_moves_again_and_the_newest_comes_first(versions, as_user):
    first, = history(NAME)
    as_user("bob")
    promote(NAME, versions["two"], alias="champion")
    newest, older = history(NAME)
    assert older == first
    assert (newest.user, newest.from_version, newest.to_version) == ("bob", versions["one"], versions["two"])
    assert newest.at >= older.at and alias_version("champion") == versions["two"]


def test_a_dry_run_runs_the_gate_and_records_nothing(versions):
    before = registry_state()
    done = promote(NAME, versions["three"], alias="champion", dry_run=True)
    assert (done.event, done.previous, done.version) == (None, versions["two"], versions["three"])
    assert done.verification.checks[1:] == ["manifest", "spec", "parity"]
    result = CliRunner().invoke(main, ["promote", NAME, versions["three"], "--alias", "champion", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Dry run: {NAME} version {versions['three']} passes the gate (verified digest")
    assert result.stdout.rstrip().endswith(f"Promote would move @champion to it (it was on version "
                                           f"{versions['two']}). Nothing was recorded.")
    # A refused dry run records nothing either.
    with pytest.raises(fm.IntegrityError):
        promote(NAME, versions["tampered"], alias="champion", dry_run=True)
    assert registry_state() == before


def test_a_refused_promotion_is_recorded_with_the_stage_that_failed_and_moves_no_alias(versions, as_user):
    as_user("mallory")
    with pytest.raises(fm.IntegrityError, match="do not match the digest recorded"):
        promote(NAME, versions["tampered"], alias="champion")
    assert alias_version("champion") == versions["two"]
    event = history(NAME)[0]
    assert (event.action, event.result, event.from_version, event.to_version, event.user, event.digest) == \
        ("promote", "refused", versions["two"], versions["tampered"], "mallory", None)
    assert event.stages == (StageResult("digest", "failed"), StageResult("manifest", "not run"),
                            StageResult("spec", "not run"), StageResult("parity", "not run"))
    assert event.error.startswith(f"IntegrityError: The files of models:/{NAME}/{versions['tampered']} do not match")
    tags = registry_state()["versions"][versions["tampered"]]
    assert tags[f"{PROMOTION_TAG}.result"] == "refused" and tags[f"{VERIFICATION_TAG}.result"] == "failed"


# -- rollback ------------------------------------------------------------------------------------


def test_rollback_goes_back_one_audited_promotion_at_a_time_and_is_recorded(versions, as_user):
    as_user("carol")
    promote(NAME, versions["three"], alias="champion")
    result = CliRunner().invoke(main, ["rollback", NAME, "--alias", "champion"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Rolled back {NAME} version {versions['two']} to @champion (it was on version "
                                    f"{versions['three']}): verified digest recorded in model version")
    assert alias_version("champion") == versions["two"]
    event = history(NAME)[0]
    assert (event.action, event.result, event.from_version, event.to_version, event.user) == \
        ("rollback", "moved", versions["three"], versions["two"], "carol")
    assert event.digest == recorded_digest_of(versions["two"])
    assert event.stages == tuple(StageResult(stage, "passed") for stage in PASSED)
    # Again: one more promotion back (1 -> 2 was bob's), not forth to 3; then the first has no previous.
    assert rollback(NAME, alias="champion").version == versions["one"] == alias_version("champion")
    with pytest.raises(fm.AuditError, match=rf"^Version {versions['one']} is the first version the audit trail "
                                            rf"records on @champion of {NAME}: there is no audited previous"):
        rollback(NAME, alias="champion")
    assert [(e.action, e.from_version, e.to_version) for e in history(NAME)[:2]] == [
        ("rollback", versions["two"], versions["one"]), ("rollback", versions["three"], versions["two"])]


def test_rollback_verifies_the_previous_version_again_and_refuses_one_that_changed(versions):
    promote(NAME, versions["one"], alias="canary")
    promote(NAME, versions["two"], alias="canary")
    with wrong_digest_recorded(versions["one"]):
        with pytest.raises(fm.IntegrityError, match="do not match the digest recorded"):
            rollback(NAME, alias="canary")
    assert alias_version("canary") == versions["two"]
    event = history(NAME, alias="canary")[0]
    assert (event.action, event.result, event.from_version, event.to_version) == \
        ("rollback", "refused", versions["two"], versions["one"])
    assert event.stages[0] == StageResult("digest", "failed")
    # A dry run of a rollback that would pass records nothing.
    before = registry_state()
    assert rollback(NAME, alias="canary", dry_run=True).version == versions["one"]
    assert registry_state() == before and alias_version("canary") == versions["two"]


def test_rollback_without_an_audited_previous_version_is_a_one_line_error(versions):
    mlflow.MlflowClient().set_registered_model_alias(NAME, "manual", versions["two"])  # not through promote
    with pytest.raises(fm.AuditError, match=rf"^@manual of {NAME} holds version {versions['two']}, but no audited "
                                            "promotion put it there"):
        rollback(NAME, alias="manual")
    result = CliRunner().invoke(main, ["rollback", NAME, "--alias", "nowhere"])
    assert result.exit_code == 1
    assert result.output == (f"Error: Registered model {NAME} has no alias nowhere: there is nothing to roll back. "
                             "Its aliases: ['canary', 'champion', 'manual'].\n")


# -- history -------------------------------------------------------------------------------------


def test_history_json_lists_every_event_newest_first_and_alias_filters(versions):
    result = CliRunner().invoke(main, ["history", NAME, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed == [event.to_dict() for event in history(NAME)]
    assert len(listed) == 9  # 5 promotions of champion (one refused), 2 rollbacks, canary's 2 promotions...
    assert [e["at"] for e in listed] == sorted((e["at"] for e in listed), reverse=True)
    canary = json.loads(CliRunner().invoke(main, ["history", NAME, "--alias", "canary", "--json"]).stdout)
    assert [(e["action"], e["result"], e["to_version"]) for e in canary] == [
        ("rollback", "refused", versions["one"]), ("promote", "moved", versions["two"]),
        ("promote", "moved", versions["one"])]


def test_history_as_a_table_shows_who_what_and_why_a_promotion_was_refused(versions):
    result = CliRunner().invoke(main, ["history", NAME, "--alias", "champion"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["when", "(UTC)", "who", "action", "alias", "from", "->", "to", "digest", "result"]
    assert len(rows) == 6 and all(" champion " in row for row in rows)
    refused, = (row for row in rows if "mallory" in row)
    assert f"{versions['two']} -> {versions['tampered']}" in refused
    assert refused.endswith(" refused at digest: IntegrityError")
    assert rows[-1].split()[2:6] == ["alice", "promote", "champion", "-"]
    empty = CliRunner().invoke(main, ["history", NAME, "--alias", "never"])
    assert empty.stdout == f"No promotion of @never of {NAME} is recorded (mlflow-fullmodel promote records each one).\n"


def test_the_trail_outlives_a_deleted_version_and_refuses_a_tag_it_did_not_write(versions):
    before = history(NAME)
    mlflow.MlflowClient().delete_model_version(NAME, versions["tampered"])
    assert history(NAME) == before
    assert any(e.to_version == versions["tampered"] and e.result == "refused" for e in history(NAME))
    client = mlflow.MlflowClient()
    client.set_registered_model_tag(NAME, f"{AUDIT_TAG}.hand-made", "not json")
    try:
        with pytest.raises(fm.AuditError, match=rf"^The tag {AUDIT_TAG}.hand-made of registered model {NAME} is not "
                                                "an audit event mlflow_fullmodel wrote: 'not json'"):
            history(NAME)
    finally:
        client.delete_registered_model_tag(NAME, f"{AUDIT_TAG}.hand-made")
