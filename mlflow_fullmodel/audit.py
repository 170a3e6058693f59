"""The registry's audit trail of promotions: who moved which alias from which version to which, when,
with which digest, and what each stage of the gate found.

``lifecycle.promote`` and ``lifecycle.rollback`` write one event per attempt, passed or refused (a
dry run writes nothing), as a tag of the registered model, ``fullmodel.audit.<id>``, whose value is
the event as compact JSON. A registered model's tags stay when its aliases move again and when a
version is deleted, so the trail is the model's whole history. The id is the event's time in
milliseconds since the epoch, 13 digits, and 6 random hex digits: two promotions in the same
millisecond still get two tags. The version an event is about also gets
``fullmodel.promotion.{alias,action,result,user,time,from_version,event}``: its latest attempt.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mlflow import MlflowClient

import mlflow_fullmodel
from mlflow_fullmodel._mlflow import mlflow_user
from mlflow_fullmodel.exceptions import AuditError
from mlflow_fullmodel.verification import stage_of

__all__ = ["ACTIONS", "AUDIT_TAG", "MOVED", "PROMOTION_TAG", "REFUSED", "AuditEvent", "StageResult", "history",
           "new_event", "record_event", "rollback_target", "stage_results"]

#: Prefix of the registered model's tags that hold the events, one tag each.
AUDIT_TAG = "fullmodel.audit"
#: Prefix of the tags on a model version that say what its latest promotion attempt was.
PROMOTION_TAG = "fullmodel.promotion"
#: An event's ``result``: the alias moved to ``to_version``, or the gate refused and it stayed.
MOVED, REFUSED = "moved", "refused"
ACTIONS = ("promote", "rollback")

# A registry keeps a registered model's tag values to 5,000 characters in older stores: an event
# stays well under it (the error message is cut, an alias has at most 255 characters).
_MAX_ERROR = 1000
_MAX_USER = 255


@dataclass(frozen=True)
class StageResult:
    """One stage of the gate (``verification.STAGES``) and what it gave: "passed", "failed" or
    "not run" (a stage after the one that failed)."""

    stage: str
    result: str


@dataclass(frozen=True)
class AuditEvent:
    """One promotion or rollback attempt of an alias, as the registry records it.

    ``from_version`` is the version the alias held before (None when it was not set); after a
    refusal it still holds it. ``digest`` is the verified digest of ``to_version`` (None when
    refused); ``error`` the refusal's one-line message; ``at`` a UTC ISO-8601 time.
    """

    id: str
    action: str
    result: str
    alias: str
    from_version: str | None
    to_version: str
    digest: str | None
    user: str
    at: str
    stages: tuple[StageResult, ...]
    error: str | None = None
    mlflow_fullmodel_version: str = mlflow_fullmodel.__version__

    @property
    def tag(self) -> str:
        """The registered model's tag that holds this event."""
        return f"{AUDIT_TAG}.{self.id}"

    def to_dict(self) -> dict[str, Any]:
        """The event as plain data (the tag's JSON, and ``history --json``)."""
        return {**asdict(self), "stages": [asdict(stage) for stage in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEvent:
        """Rebuild an event from ``to_dict``'s data (fields a later version added are left out); a
        ``TypeError``/``KeyError`` when it is not one."""
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**{**known, "stages": tuple(StageResult(s["stage"], s["result"]) for s in data["stages"])})


def stage_results(planned: Iterable[str], passed: Iterable[str], *, refused: bool) -> tuple[StageResult, ...]:
    """Each planned stage's result, from the checks that passed (``Verification.checks``, or a
    refusal's ``checks_passed``): after a refusal the first stage that did not pass failed and the
    ones after it did not run.

    Example:

    >>> stage_results(["digest", "manifest", "spec", "parity"], ["digest recorded in run 1", "manifest"],
    ...               refused=True)  # doctest: +NORMALIZE_WHITESPACE
    (StageResult(stage='digest', result='passed'), StageResult(stage='manifest', result='passed'),
     StageResult(stage='spec', result='failed'), StageResult(stage='parity', result='not run'))
    """
    done = {stage_of(check) for check in passed}
    results, failed = [], False
    for stage in planned:
        if stage in done:
            results.append(StageResult(stage, "passed"))
        elif refused and not failed:
            results.append(StageResult(stage, "failed"))
            failed = True
        else:
            results.append(StageResult(stage, "not run"))
    return tuple(results)


def new_event(action: str, alias: str, from_version: str | None, to_version: str, stages: tuple[StageResult, ...],
              *, digest: str | None = None, error: str | None = None) -> AuditEvent:
    """An event of now, by MLflow's user (``MLFLOW_TRACKING_USERNAME``, else the system's user):
    ``MOVED`` unless an ``error`` says why the gate refused.

    Example::

        new_event("promote", "champion", "1", "2", stages, digest="sha256:...")
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {list(ACTIONS)}, not {action!r}.")
    now = datetime.datetime.now(datetime.timezone.utc)
    milliseconds = int(now.timestamp() * 1000)
    return AuditEvent(
        id=f"{milliseconds:013d}-{secrets.token_hex(3)}", action=action, result=MOVED if error is None else REFUSED,
        alias=alias, from_version=from_version, to_version=to_version, digest=digest, user=mlflow_user()[:_MAX_USER],
        at=now.isoformat(timespec="milliseconds"), stages=stages,
        error=None if error is None else _one_line(error, _MAX_ERROR),
    )


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def record_event(name: str, event: AuditEvent) -> None:
    """Write ``event`` to registered model ``name``'s trail, and as the latest attempt on its version."""
    client = MlflowClient()
    client.set_registered_model_tag(name, event.tag, json.dumps(event.to_dict(), separators=(",", ":")))
    facts = {"alias": event.alias, "action": event.action, "result": event.result, "user": event.user,
             "time": event.at, "from_version": event.from_version or "", "event": event.tag}
    for key, value in facts.items():
        client.set_model_version_tag(name, event.to_version, f"{PROMOTION_TAG}.{key}", value)


def history(name: str, alias: str | None = None) -> list[AuditEvent]:
    """The promotions and rollbacks of registered model ``name`` (of one alias if given), newest first.

    Raises:
        AuditError: A ``fullmodel.audit.*`` tag holds something other than an event.
        MlflowException: The model does not exist, or the registry is unreachable.

    Example::

        for event in history("reviews", alias="champion"):
            print(event.at, event.user, event.from_version, "->", event.to_version, event.result)
    """
    return _events(name, MlflowClient().get_registered_model(name).tags, alias)


def _events(name: str, tags: Mapping[str, str], alias: str | None) -> list[AuditEvent]:
    events = []
    for key, value in tags.items():
        if not key.startswith(AUDIT_TAG + "."):
            continue
        try:
            event = AuditEvent.from_dict(json.loads(value))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise AuditError(f"The tag {key} of registered model {name} is not an audit event mlflow_fullmodel "
                             f"wrote: {_one_line(value, 200)!r}. Delete the tag, or set it back to what "
                             "promote wrote.") from None
        if alias is None or event.alias == alias:
            events.append(event)
    return sorted(events, key=lambda e: (datetime.datetime.fromisoformat(e.at), e.id), reverse=True)


def rollback_target(name: str, alias: str) -> tuple[str, str]:
    """The version ``alias`` holds and the audited version before it, the one a rollback returns to.

    The trail's moves of ``alias`` are replayed oldest first: a promotion puts its version on top
    of the versions the alias held, a rollback takes the top one off, so rolling back twice goes
    two promotions back (not back and forth). A move that does not start where the last one ended
    (the alias was moved outside ``promote``) starts the replay again from there.

    Raises:
        AuditError: The alias is not set, the trail has no move to the version it holds, or that
            version is the first the trail records on it.
        MlflowException: The model does not exist, or the registry is unreachable.

    Example::

        current, previous = rollback_target("reviews", "champion")
    """
    model = MlflowClient().get_registered_model(name)
    aliases = model.aliases or {}
    if alias not in aliases:
        raise AuditError(f"Registered model {name} has no alias {alias}: there is nothing to roll back. Its "
                         f"aliases: {sorted(aliases) or 'none'}.")
    current = str(aliases[alias])
    held = _held_versions(reversed(_events(name, model.tags, alias)))
    if not held or held[-1] != current:
        raise AuditError(f"@{alias} of {name} holds version {current}, but no audited promotion put it there (it "
                         "was set outside mlflow-fullmodel promote): there is no audited previous version. Choose "
                         f"one with: mlflow-fullmodel history {name} --alias {alias}; then mlflow-fullmodel promote "
                         f"{name} VERSION --alias {alias}")
    if len(held) < 2:
        raise AuditError(f"Version {current} is the first version the audit trail records on @{alias} of {name}: "
                         f"there is no audited previous version to roll back to.")
    return current, held[-2]


def _held_versions(oldest_first: Iterable[AuditEvent]) -> list[str]:
    held: list[str] = []
    for event in oldest_first:
        if event.result != MOVED or event.from_version == event.to_version:
            continue  # a refusal moved nothing; a re-promotion of the same version changes nothing
        if event.action == "rollback" and held[-2:] == [event.to_version, event.from_version]:
            held.pop()
            continue
        if not held or held[-1] != event.from_version:
            held = [] if event.from_version is None else [event.from_version]
        held.append(event.to_version)
    return held
