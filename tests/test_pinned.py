"""One way to pin a requirement (``storage.capture.pinned``), for the captured code's imports and
for the requirements every model has."""

from __future__ import annotations

import importlib.metadata

from mlflow_fullmodel import flavor
from mlflow_fullmodel.storage.capture import CodeCapture, pinned


def test_an_installed_distribution_is_pinned_to_its_version_without_the_local_label(monkeypatch):
    assert pinned("numpy") == f"numpy=={importlib.metadata.version('numpy')}"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.13.0+cpu")
    assert pinned("torch") == "torch==2.13.0"


def test_a_distribution_that_is_not_installed_is_its_bare_name():
    assert pinned("no-such-distribution-for-fullmodel") == "no-such-distribution-for-fullmodel"


def test_the_default_requirements_and_the_captured_imports_pin_alike():
    assert flavor.get_default_pip_requirements() == [pinned(n) for n in ("mlflow", "torch", "numpy", "pandas")]
    capture = CodeCapture()
    capture._add_requirement("yaml")
    assert capture.requirements == {pinned("PyYAML")}
