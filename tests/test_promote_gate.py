"""The registry's gate against a real SQLite registry: the digest recorded for a version, a logged
model and a run is compared with the files, and ``promote`` with a public key refuses an unsigned or
wrongly signed version, records why, and moves no alias."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import pytest
from support import EXAMPLE_TEXTS, signing_keys

import mlflow_fullmodel as fm
from mlflow_fullmodel.lifecycle import VERIFICATION_TAG, promote
from mlflow_fullmodel.registry import DIGEST_TAG, MANIFEST_TAG
from mlflow_fullmodel.verification import sign_model, verify_model

NAME = "gate"
WRONG = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def logged(tracking, text_model) -> dict[str, mlflow.models.model.ModelInfo]:
    """Two versions of ``gate``: "champion" (aliased) and "candidate"."""
    infos = {}
    for label in ("champion", "candidate"):
        with mlflow.start_run():
            infos[label] = fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS,
                                        registered_model_name=NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", infos["champion"].registered_model_version)
    return infos


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    return signing_keys(tmp_path_factory.mktemp("gate-keys"))


@contextmanager
def tags_changed(set_tag, delete_tag, original: dict[str, str], changes: dict[str, str | None]) -> Iterator[None]:
    """Change (or, with None, delete) tags for a while; put the original values back."""
    for key, value in changes.items():
        if value is None:
            delete_tag(key)
        else:
            set_tag(key, value)
    try:
        yield
    finally:
        for key in changes:
            set_tag(key, original[key])


def version_tags(version: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient().get_model_version(NAME, version).tags)


def alias_version(alias: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, alias).version)


# -- the recorded digest --------------------------------------------------------------------------


def test_an_intact_version_verifies_against_the_digest_recorded_on_it(logged):
    version = str(logged["champion"].registered_model_version)
    report = verify_model(f"models:/{NAME}/{version}", parity=False)
    assert report.checks == [f"digest recorded in model version {NAME}/{version}", "manifest", "spec"]
    assert report.digest == version_tags(version)[DIGEST_TAG] == report.record.digest


def test_a_version_whose_recorded_digest_differs_from_its_files_is_refused(logged):
    version = str(logged["champion"].registered_model_version)
    client = mlflow.MlflowClient()
    tags = version_tags(version)

    def set_tag(key, value):
        client.set_model_version_tag(NAME, version, key, value)

    def delete_tag(key):
        client.delete_model_version_tag(NAME, version, key)

    with tags_changed(set_tag, delete_tag, tags, {DIGEST_TAG: WRONG}):
        with pytest.raises(fm.IntegrityError, match=rf"^The files of models:/{NAME}/{version} do not match the digest "
                                                    rf"recorded in model version {NAME}/{version} \({WRONG}; the files "
                                                    rf"give {tags[DIGEST_TAG]}\): the manifest's own format\."):
            verify_model(f"models:/{NAME}/{version}", parity=False)
        with pytest.raises(fm.IntegrityError, match=rf"recorded in model version {NAME}/{version} \({WRONG};"):
            verify_model(f"models:/{NAME}@champion", parity=False)
    with tags_changed(set_tag, delete_tag, tags, {DIGEST_TAG: WRONG, MANIFEST_TAG: None}):
        with pytest.raises(fm.IntegrityError, match=r"the files that differ cannot be named: only the digest was "
                                                    r"recorded"):
            verify_model(f"models:/{NAME}/{version}", parity=False)
    verify_model(f"models:/{NAME}/{version}", parity=False)  # the tags are back


def test_without_a_digest_on_the_version_the_logged_models_digest_is_compared(logged):
    info = logged["champion"]
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = version_tags(version)
    logged_tags = dict(client.get_logged_model(info.model_id).tags)
    with tags_changed(lambda k, v: client.set_model_version_tag(NAME, version, k, v),
                      lambda k: client.delete_model_version_tag(NAME, version, k), tags, {DIGEST_TAG: None}):
        report = verify_model(f"models:/{NAME}/{version}", parity=False)
        assert report.checks[0] == f"digest recorded in logged model {info.model_id}"
        with tags_changed(lambda k, v: client.set_logged_model_tags(info.model_id, {k: v}), None, logged_tags,
                          {DIGEST_TAG: WRONG}):
            with pytest.raises(fm.IntegrityError, match=rf"recorded in logged model {info.model_id} \({WRONG};"):
                verify_model(f"models:/{NAME}/{version}", parity=False)
            with pytest.raises(fm.IntegrityError, match=rf"recorded in logged model {info.model_id} \({WRONG};"):
                verify_model(f"models:/{info.model_id}", parity=False)


def test_a_run_uri_is_compared_with_the_digest_recorded_on_the_run(logged):
    info = logged["champion"]
    client = mlflow.MlflowClient()
    tag = f"{DIGEST_TAG}.model"
    run_tags = dict(client.get_run(info.run_id).data.tags)
    report = verify_model(f"runs:/{info.run_id}/model", parity=False)
    assert report.checks[0] == f"digest recorded in run {info.run_id} (tag {tag})"
    with tags_changed(lambda k, v: client.set_tag(info.run_id, k, v), None, run_tags, {tag: WRONG}):
        with pytest.raises(fm.IntegrityError, match=rf"recorded in run {info.run_id} \(tag {tag}\) \({WRONG};"):
            verify_model(f"runs:/{info.run_id}/model", parity=False)


# -- promote with a public key --------------------------------------------------------------------


def test_promote_with_a_public_key_refuses_an_unsigned_version_records_why_and_moves_no_alias(logged, keys):
    candidate = str(logged["candidate"].registered_model_version)
    champion = alias_version("champion")
    assert champion != candidate
    with pytest.raises(fm.SignatureError, match="is not signed"):
        promote(NAME, candidate, alias="champion", public_key=keys["signer.pub"])
    assert alias_version("champion") == champion
    tags = version_tags(candidate)
    assert tags[f"{VERIFICATION_TAG}.result"] == "failed"
    # the checks that passed before the signature's
    assert tags[f"{VERIFICATION_TAG}.checks"] == f"digest recorded in model version {NAME}/{candidate},manifest"
    assert tags[f"{VERIFICATION_TAG}.error"].startswith("SignatureError: The model ")
    assert f"{VERIFICATION_TAG}.digest" not in tags


def test_promote_with_a_public_key_refuses_a_version_signed_with_another_key_and_moves_no_alias(logged, keys):
    candidate = str(logged["candidate"].registered_model_version)
    champion = alias_version("champion")
    sign_model(f"models:/{NAME}/{candidate}", keys["other"])
    mlflow.MlflowClient().set_registered_model_alias(NAME, "challenger", candidate)
    with pytest.raises(fm.SignatureError, match=r"does not verify with .*signer\.pub"):
        promote(NAME, candidate, alias="champion", public_key=keys["signer.pub"])
    with pytest.raises(fm.SignatureError, match=r"does not verify"):
        promote(NAME, from_alias="challenger", alias="signed", public_key=keys["signer.pub"])
    assert alias_version("champion") == champion
    with pytest.raises(mlflow.exceptions.MlflowException):
        alias_version("signed")
    tags = version_tags(candidate)
    assert tags[f"{VERIFICATION_TAG}.result"] == "failed"
    assert tags[f"{VERIFICATION_TAG}.checks"] == f"digest recorded in model version {NAME}/{candidate},manifest"
    assert tags[f"{VERIFICATION_TAG}.error"].startswith("SignatureError: The signature of the model ")


def test_a_failed_promotion_of_a_tampered_digest_is_refused_before_the_signature_is_looked_at(logged, keys):
    candidate = str(logged["candidate"].registered_model_version)
    client = mlflow.MlflowClient()
    tags = version_tags(candidate)
    with tags_changed(lambda k, v: client.set_model_version_tag(NAME, candidate, k, v), None, tags,
                      {DIGEST_TAG: WRONG}):
        with pytest.raises(fm.IntegrityError, match="do not match the digest recorded"):
            promote(NAME, candidate, alias="champion", public_key=keys["signer.pub"])
    assert alias_version("champion") == str(logged["champion"].registered_model_version)


def test_promote_with_a_public_key_moves_the_alias_once_the_version_is_signed_with_its_private_key(logged, keys):
    candidate = str(logged["candidate"].registered_model_version)
    sign_model(f"models:/{NAME}/{candidate}", keys["signer"])
    promotion = promote(NAME, candidate, alias="signed", public_key=keys["signer.pub"])
    assert (promotion.version, promotion.previous) == (candidate, None)
    assert alias_version("signed") == candidate
    tags = version_tags(candidate)
    assert tags[f"{VERIFICATION_TAG}.result"] == "passed"
    assert "signature" in tags[f"{VERIFICATION_TAG}.checks"].split(",")
    assert f"{VERIFICATION_TAG}.error" not in tags
