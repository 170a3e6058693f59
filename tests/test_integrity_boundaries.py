"""Each integrity check on its own, at its edge: the manifest's format and what it covers, confined
paths, bytes re-hashed when they are used (a byte changed after the check is caught when it is read
again), the digest recorded in the registry against the files, and step classes confined to the
model's captured code and the runtime."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

import pytest
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.registry import Record
from mlflow_fullmodel.storage import load_fullmodel, save_fullmodel
from mlflow_fullmodel.storage.folder import VerifiedFiles
from mlflow_fullmodel.storage.imports import import_steps
from mlflow_fullmodel.storage.integrity import (
    MANIFEST_FILE,
    Manifest,
    confined_path,
    folder_digest,
    folder_hashes,
    read_verified,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from mlflow_fullmodel.transforms import TopK
from mlflow_fullmodel.verification import _check_record


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


# -- bytes re-hashed when used --------------------------------------------------------------------


def test_read_verified_returns_bytes_that_match_and_refuses_them_once_a_byte_changed(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0123456789")
    digest = sha(b"0123456789")
    assert read_verified(str(path), digest) == b"0123456789"
    flip(path)
    with pytest.raises(fm.IntegrityError, match=r"weights\.bin changed after the model's files were checked: its sha256 "
                                                r"no longer matches the manifest\. Restore the model"):
        read_verified(str(path), digest)


def test_an_artifact_with_a_hash_is_checked_on_every_read_and_one_without_is_not(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"a b c")
    checked, unchecked = fm.Artifact(path, sha256=sha(b"a b c")), fm.Artifact(path)
    assert checked.read_bytes() == b"a b c"
    flip(path)
    with pytest.raises(fm.IntegrityError, match=r"vocab\.txt changed after the model's files were checked: its sha256 no "
                                                r"longer matches the manifest\. Restore the model"):
        checked.read_bytes()
    assert unchecked.read_bytes() == path.read_bytes()


@pytest.fixture
def bare_model(tmp_path, text_model) -> Path:
    folder = tmp_path / "bare"
    save_fullmodel(text_model, str(folder))
    return folder


@pytest.mark.parametrize("relative", ["fullmodel.json", "modules/main.pt"])
def test_a_byte_changed_after_the_manifest_was_checked_is_caught_when_the_file_is_read(bare_model, relative):
    manifest = verify_manifest(str(bare_model))
    assert len(load_fullmodel(str(bare_model), manifest=manifest).predict(EXAMPLE_TEXTS)) == len(EXAMPLE_TEXTS)
    flip(bare_model / relative)
    with pytest.raises(fm.IntegrityError, match=rf"{relative.split('/')[-1]} changed after the model's files were "
                                                r"checked"):
        load_fullmodel(str(bare_model), manifest=manifest)


def test_an_artifact_of_a_loaded_model_carries_its_hash_and_a_folder_artifact_none(tmp_path):
    root = write(tmp_path, {"artifacts/spm.model": "spm", "artifacts/lexicon/a.txt": "a",
                            "artifacts/lexicon/b.txt": "b"})
    files = VerifiedFiles(str(root), "", {"artifacts/spm.model": sha(b"spm"), "artifacts/lexicon/a.txt": sha(b"a"),
                                           "artifacts/lexicon/b.txt": sha(b"b")})
    artifact = files.artifact("artifacts/spm.model", "step")
    assert (artifact.path, artifact.sha256) == (str(root / "artifacts" / "spm.model"), sha(b"spm"))
    folder = files.artifact("artifacts/lexicon", "step")
    assert (folder.path, folder.sha256) == (str(root / "artifacts" / "lexicon"), None)
    for outside in ("artifacts/lex", "artifacts/lexicon/c.txt", "artifacts"[:-1]):
        with pytest.raises(fm.IntegrityError, match=rf"^step: the artifact '{outside}' is not part of the model "
                                                    r"\(not in its manifest\)\.$"):
            files.artifact(outside, "step")
    assert files.read("artifacts/lexicon/a.txt", "step") == b"a"
    with pytest.raises(fm.IntegrityError, match=r"^module 'x': 'artifacts/lexicon' is not a file of the model"):
        files.read("artifacts/lexicon", "module 'x'")


def test_the_files_of_a_model_folder_inside_the_root_are_looked_up_under_its_prefix(tmp_path):
    root = write(tmp_path, {"fullmodel/spec.json": "{}", "spec.json": "other"})
    files = VerifiedFiles(str(root), "fullmodel/", {"fullmodel/spec.json": sha(b"{}"), "spec.json": sha(b"other")})
    assert files.read("spec.json", "the spec") == b"{}"
    assert files.path("spec.json", "the spec") == os.path.join(str(root), "fullmodel", "spec.json")


# -- confined paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["modules/main.pt", "a", "a/..b/c", "..a/b", "a/b..", "x/y/z.json"])
def test_a_normalised_relative_path_inside_the_folder_is_accepted_as_it_is(relative):
    assert confined_path(relative, "step") == relative


@pytest.mark.parametrize("relative", ["", "..", "../x", "../../etc/passwd", "/etc/passwd", "//x", "a/../b",
                                      "a/../../b", "a/./b", "./a", "a//b", "a/", "a\\..\\b", "a\\b", "a\x00b", None,
                                      42, ["a"], b"a"])
def test_anything_else_is_refused_before_it_is_opened(relative):
    with pytest.raises(fm.IntegrityError, match=rf"^module 'main': the path {re.escape(repr(relative))} is not a "
                                                r"relative path inside the model folder; a saved model only refers to "
                                                r"its own files\. Restore"):
        confined_path(relative, "module 'main'")


# -- the manifest ---------------------------------------------------------------------------------


def test_the_digest_is_the_sha256_of_the_manifest_as_written(tmp_path):
    root = write(tmp_path, {"a.txt": "a", "sub/b.txt": "b"})
    manifest = write_manifest(str(root))
    assert manifest.files == {"a.txt": sha(b"a"), "sub/b.txt": sha(b"b")}
    text = (root / MANIFEST_FILE).read_text()
    assert manifest.digest == "sha256:" + sha(text.encode())
    assert json.loads(text) == {"algorithm": "sha256", "files": manifest.files, "manifest_version": 1}
    assert Manifest.from_json(text) == manifest
    assert Manifest({"a.txt": sha(b"a")}).digest != manifest.digest


@pytest.mark.parametrize("text, message", [
    ("{not json", r"^M is not valid JSON \(.*\)\. Restore"),
    ('{"algorithm": "sha256", "files": {}, "manifest_version": 2}', r"^M has manifest version 2; this mlflow_fullmodel "
                                                                     r"reads version 1\. Verify it with"),
    ('{"algorithm": "sha256", "files": {}}', r"^M has manifest version None;"),
    ('{"algorithm": "sha256", "files": {}, "manifest_version": "1"}', r"^M has manifest version '1';"),
    ('[1]', r"^M has manifest version None;"),
    ('{"algorithm": "md5", "files": {}, "manifest_version": 1}', r"^M does not list sha256 hashes of files\."),
    ('{"files": {}, "manifest_version": 1}', r"^M does not list sha256 hashes of files\."),
    ('{"algorithm": "sha256", "files": ["a"], "manifest_version": 1}', r"^M does not list sha256 hashes of files\."),
    ('{"algorithm": "sha256", "manifest_version": 1}', r"^M does not list sha256 hashes of files\."),
])
def test_a_manifest_of_another_format_is_refused_naming_why(text, message):
    with pytest.raises(fm.IntegrityError, match=message):
        Manifest.from_json(text, "M")


def test_an_empty_manifest_of_this_format_is_read():
    assert Manifest.from_json('{"algorithm": "sha256", "files": {}, "manifest_version": 1}').files == {}


def test_differences_name_changed_missing_and_extra_files_in_that_order():
    saved = Manifest({"a": "1", "b": "2", "c": "3"})
    assert saved.differences(Manifest({"a": "1", "b": "2", "c": "3"})) == []
    assert saved.differences(Manifest({"a": "9", "c": "3", "d": "4", "e": "5"})) == [
        "changed since saving: ['a']", "missing: ['b']", "not part of the saved model: ['d', 'e']"]
    assert saved.differences(Manifest({"a": "1", "b": "2"})) == ["missing: ['c']"]


def test_the_files_mlflow_adds_are_left_out_at_the_models_root_only(tmp_path):
    root = write(tmp_path, {"MLmodel": "flavors: {}\n", "registered_model_meta": "x", "environment_variables.txt": "x",
                            "model.sig": "x", "sub/model.sig": "x", "sub/registered_model_meta": "x",
                            "sub/MANIFEST.json": "{}"})
    assert sorted(Manifest.of_folder(str(root), skip_bytecode=True).files) == [
        "MLmodel", "sub/MANIFEST.json", "sub/model.sig", "sub/registered_model_meta"]
    (root / MANIFEST_FILE).write_text("{}")
    assert sorted(folder_hashes(str(root))) == [
        "MANIFEST.json", "MLmodel", "environment_variables.txt", "model.sig", "registered_model_meta",
        "sub/MANIFEST.json", "sub/model.sig", "sub/registered_model_meta"]


def test_bytecode_is_left_out_only_when_asked_and_never_by_a_folders_hashes(tmp_path):
    root = write(tmp_path, {"code/m.py": "x = 1\n", "code/__pycache__/m.cpython-311.pyc": "pyc",
                            "code/pycache/n.py": "n"})
    assert sorted(Manifest.of_folder(str(root), skip_bytecode=True).files) == ["code/m.py", "code/pycache/n.py"]
    assert sorted(Manifest.of_folder(str(root), skip_bytecode=False).files) == [
        "code/__pycache__/m.cpython-311.pyc", "code/m.py", "code/pycache/n.py"]
    assert sorted(folder_hashes(str(root / "code"))) == ["m.py", "pycache/n.py"]


def test_verify_manifest_tolerates_bytecode_when_loading_and_refuses_it_when_strict(tmp_path):
    root = write(tmp_path, {"code/m.py": "x = 1\n"})
    saved = write_manifest(str(root))
    write(root, {"code/__pycache__/m.pyc": "pyc"})
    assert verify_manifest(str(root)) == saved
    with pytest.raises(fm.IntegrityError, match=r"does not match the sha256 hashes of its MANIFEST\.json; not part of "
                                                r"the saved model: \['code/__pycache__/m\.pyc'\]\. Restore"):
        verify_manifest(str(root), strict=True)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_to_a_file_or_a_folder_is_refused_naming_it(tmp_path, link):
    root, outside = tmp_path / "model", tmp_path / "outside"
    write(outside, {"secret.txt": "s"})
    write(root, {"a.txt": "a"})
    (root / "sub").mkdir()
    (root / "sub" / "link").symlink_to(outside / "secret.txt" if link == "file" else outside)
    with pytest.raises(fm.IntegrityError, match=r"^sub/link in the model folder .* is a symlink \(to '.*outside"):
        Manifest.of_folder(str(root), skip_bytecode=True)
    with pytest.raises(fm.IntegrityError, match=r"sub/link in the model folder .* is a symlink"):
        folder_hashes(str(root))


def test_a_folder_without_a_manifest_or_with_a_linked_one_is_refused(tmp_path):
    root = write(tmp_path / "model", {"a.txt": "a"})
    with pytest.raises(fm.IntegrityError, match=r"has no MANIFEST\.json, so its files cannot be checked"):
        verify_manifest(str(root))
    (root / MANIFEST_FILE).mkdir()
    with pytest.raises(fm.IntegrityError, match=r"has no MANIFEST\.json"):
        verify_manifest(str(root))
    (root / MANIFEST_FILE).rmdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(Manifest.of_folder(str(root), skip_bytecode=True).to_json())
    (root / MANIFEST_FILE).symlink_to(elsewhere)
    with pytest.raises(fm.IntegrityError, match=r"has no MANIFEST\.json"):
        verify_manifest(str(root))


def test_the_mlmodel_file_is_hashed_without_the_env_vars_mlflow_adds_and_with_everything_else(tmp_path):
    root = write(tmp_path, {"MLmodel": "flavors:\n  fullmodel: {data: fullmodel}\nmodel_uuid: abc\n"})
    saved = write_manifest(str(root))
    write(root, {"MLmodel": "env_vars:\n- OPENAI_API_KEY\nflavors:\n  fullmodel: {data: fullmodel}\nmodel_uuid: abc\n"})
    assert verify_manifest(str(root)) == saved
    write(root, {"MLmodel": "flavors:\n  fullmodel: {data: other}\nmodel_uuid: abc\n"})
    with pytest.raises(fm.IntegrityError, match=r"changed since saving: \['MLmodel'\]"):
        verify_manifest(str(root))
    assert sha256_file(str(root / "MLmodel")) == sha((root / "MLmodel").read_bytes())


def test_a_folder_digest_is_sha256sum_of_its_sorted_lines_and_changes_with_any_name_or_content():
    hashes = {"b/x.txt": "22", "a.txt": "11"}
    assert folder_digest(hashes) == sha(b"11  a.txt\n22  b/x.txt\n")
    assert folder_digest({"a.txt": "11", "b/y.txt": "22"}) != folder_digest(hashes)
    assert folder_digest({"a.txt": "12", "b/x.txt": "22"}) != folder_digest(hashes)
    assert folder_digest({"a.txt": "11"}) != folder_digest(hashes)


# -- the digest recorded in the registry ----------------------------------------------------------


def test_files_that_give_the_recorded_digest_pass():
    actual = Manifest({"MLmodel": "1", "fullmodel/fullmodel.json": "2"})
    _check_record("models:/m/1", Record(actual.digest, "model version m/1", actual), actual)
    _check_record("models:/m/1", Record(actual.digest, "model version m/1"), actual)


def test_files_that_differ_from_the_recorded_manifest_are_named():
    recorded = Manifest({"MLmodel": "1", "fullmodel/fullmodel.json": "2", "fullmodel/golden.json": "3"})
    actual = Manifest({"MLmodel": "1", "fullmodel/fullmodel.json": "9", "code/evil.py": "4"})
    with pytest.raises(fm.IntegrityError, match=(
            r"^The files of models:/m/1 do not match the digest recorded in model version m/1 "
            rf"\({recorded.digest}; the files give {actual.digest}\): changed since saving: "
            r"\['fullmodel/fullmodel\.json'\]; missing: \['fullmodel/golden\.json'\]; not part of the saved model: "
            r"\['code/evil\.py'\]\. The model was changed in the artifact store")):
        _check_record("models:/m/1", Record(recorded.digest, "model version m/1", recorded), actual)


def test_a_digest_recorded_without_its_manifest_still_catches_a_change():
    recorded = Manifest({"MLmodel": "1"})
    actual = Manifest({"MLmodel": "2"})
    with pytest.raises(fm.IntegrityError, match=r"the files that differ cannot be named: only the digest was recorded"):
        _check_record("runs:/r/model", Record(recorded.digest, "run r"), actual)


def test_a_recorded_digest_that_its_own_manifest_does_not_give_is_refused():
    """The files agree with the recorded manifest, but not with the recorded digest: refused."""
    actual = Manifest({"MLmodel": "1"})
    with pytest.raises(fm.IntegrityError, match=r"\(sha256:0+; the files give sha256:[0-9a-f]{64}\): the manifest's "
                                                r"own format\."):
        _check_record("models:/m/1", Record("sha256:" + "0" * 64, "model version m/1", actual), actual)


# -- step classes confined to the model and the runtime -------------------------------------------

STEPS = """\
import json
from pathlib import Path

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import TopK
from outside_pkg import Outside

Path({marker!r}).write_text("imported")


class Upper(fm.Transform):
    def __call__(self, text):
        return text.upper()


class NotAStep:
    pass


def function(text):
    return text
"""


@pytest.fixture
def code_dir(tmp_path, monkeypatch) -> Path:
    """A model's captured code: ``steps.py`` and a package ``pkg``; beside it on ``sys.path``, a
    package ``outside_pkg`` that is not part of the model."""
    site = write(tmp_path / "site", {"outside_pkg/__init__.py": (
        "import mlflow_fullmodel as fm\n\nclass Outside(fm.Transform):\n    def __call__(self, text):\n"
        "        return text\n")})
    monkeypatch.syspath_prepend(str(site))
    code = write(tmp_path / "code", {
        "steps.py": STEPS.format(marker=str(tmp_path / "imported")),
        "pkg/__init__.py": "",
        "pkg/inner.py": "import mlflow_fullmodel as fm\n\nclass Inner(fm.Transform):\n    def __call__(self, x):\n"
                        "        return x\n",
        "not-a-package/mod.py": "",
        "notes.txt": "",
    })
    yield code
    sys.modules.pop("outside_pkg", None)


def refused(target: str, why: str) -> str:
    return rf"^Step s: the target {re.escape(repr(target))} {why}\. A saved model's steps are step classes of its own " \
           r"captured code or of mlflow_fullmodel; the spec was changed after saving\. Restore the model from its " \
           r"source \(download it again\)\.$"


def test_step_classes_of_the_captured_code_and_of_the_runtime_resolve(code_dir):
    classes = import_steps({"a": "steps:Upper", "b": "pkg.inner:Inner", "c": "mlflow_fullmodel.transforms:TopK",
                            "d": "steps:TopK"}, str(code_dir))
    assert [classes[k].__name__ for k in "abcd"] == ["Upper", "Inner", "TopK", "TopK"]
    assert classes["c"] is TopK and classes["d"] is TopK
    assert "steps" not in sys.modules and "pkg" not in sys.modules and str(code_dir) not in sys.path
    assert not list(code_dir.rglob("__pycache__"))


@pytest.mark.parametrize("target", ["os:system", "subprocess:getoutput", "builtins:open", "outside_pkg:Outside",
                                    "mlflow_fullmodelx:Step", "mlflow:pyfunc", "steps_extra:Upper", "notes:Upper",
                                    "not-a-package.mod:X", "pycache:X", "ste:Upper"])
def test_a_module_outside_the_model_and_the_runtime_is_refused_before_anything_is_imported(code_dir, tmp_path, target):
    with pytest.raises(fm.IntegrityError, match=refused(target, f"names the module '{target.partition(':')[0]}', which "
                                                                "is not part of the model")):
        import_steps({"a": "steps:Upper", "s": target}, str(code_dir))
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("target", ["steps", "steps:", ":Upper", "", 42, None])
def test_a_target_not_of_the_form_module_qualname_is_refused(code_dir, target):
    with pytest.raises(fm.IntegrityError, match=refused(target, "is not of the form 'module:qualname'")):
        import_steps({"s": target}, str(code_dir))


def test_a_step_class_defined_outside_the_model_is_refused_though_captured_code_imports_it(code_dir):
    with pytest.raises(fm.IntegrityError, match=refused("steps:Outside", "is defined in 'outside_pkg', which is not "
                                                                         "part of the model")):
        import_steps({"s": "steps:Outside"}, str(code_dir))


@pytest.mark.parametrize("target, kind", [("steps:NotAStep", "type"), ("steps:function", "function"),
                                          ("steps:json", "module"), ("mlflow_fullmodel:__version__", "str")])
def test_a_target_that_is_not_a_step_class_is_refused(code_dir, target, kind):
    with pytest.raises(fm.IntegrityError, match=refused(target, f"is a {kind}, not a step class")):
        import_steps({"s": target}, str(code_dir))


def test_without_captured_code_only_the_runtime_is_allowed(tmp_path, code_dir):
    assert import_steps({"s": "mlflow_fullmodel.transforms:TopK"}, None)["s"] is TopK
    for folder in (None, str(tmp_path / "missing")):
        with pytest.raises(fm.IntegrityError, match=refused("steps:Upper", "names the module 'steps', which is not part of the model")):
            import_steps({"s": "steps:Upper"}, folder)


def test_a_captured_module_that_cannot_be_imported_or_lacks_the_name_is_a_format_error(code_dir):
    with pytest.raises(fm.ModelFormatError, match=r"Cannot import module 'pkg.missing' for step pkg.missing:X"):
        import_steps({"s": "pkg.missing:X"}, str(code_dir))
    with pytest.raises(fm.ModelFormatError, match=r"Module 'steps' has no attribute 'Upper.nested' \(step steps:Upper"):
        import_steps({"s": "steps:Upper.nested"}, str(code_dir))



def test_a_target_with_a_second_colon_reads_the_rest_as_the_qualname_of_the_first_module(code_dir):
    with pytest.raises(fm.ModelFormatError, match=r"^Module 'steps' has no attribute 'Upper:extra' \(step "
                                                  r"steps:Upper:extra\)\.$"):
        import_steps({"s": "steps:Upper:extra"}, str(code_dir))


def test_a_step_class_nested_in_a_class_resolves_by_its_dotted_qualname(code_dir):
    write(code_dir, {"nested.py": "import mlflow_fullmodel as fm\n\nclass Holder:\n    class Nested(fm.Transform):\n"
                                  "        def __call__(self, x):\n            return x\n"})
    assert import_steps({"s": "nested:Holder.Nested"}, str(code_dir))["s"].__qualname__ == "Holder.Nested"


def test_a_file_of_the_model_named_like_an_installed_package_does_not_let_that_package_in(code_dir):
    write(code_dir, {"outside_pkg": "a data file, not a module"})
    with pytest.raises(fm.IntegrityError, match=refused("outside_pkg:Outside", "names the module 'outside_pkg', which "
                                                                               "is not part of the model")):
        import_steps({"s": "outside_pkg:Outside"}, str(code_dir))


def test_a_missing_captured_module_is_an_error_that_says_to_install_its_package(code_dir):
    with pytest.raises(fm.ModelFormatError, match=r"\. If it comes from a package, install it \(see the model's "
                                                  r"requirements\.txt\)\.$"):
        import_steps({"s": "pkg.missing:X"}, str(code_dir))


def test_a_models_modules_come_from_its_folder_even_when_its_code_puts_another_first_on_sys_path(tmp_path):
    site = write(tmp_path / "site", {"words.py": "WORD = 'not the model'\n"})
    code = write(tmp_path / "code", {"words.py": "WORD = 'the model'\n", "first.py": (
        f"import sys\n\nsys.path.insert(0, {str(site)!r})\n\nimport mlflow_fullmodel as fm\nimport words\n\n\n"
        "class First(fm.Transform):\n    def __call__(self, x):\n        return words.WORD\n")})
    try:
        assert import_steps({"s": "first:First"}, str(code))["s"]()(None) == "the model"
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("words", None)



CALL_TIME_STEPS = """\
import mlflow_fullmodel as fm
import words
from tree.branch import leaf

import gate

gate.loaded.append(leaf.LEAF)


class CallTime(fm.Transform):
    def __call__(self, case):
        if case == "loaded":
            from words import WORD
            return WORD
        if case == "plain":
            import words
            return words.WORD
        if case == "dotted":
            import tree.branch.leaf
            return tree.branch.leaf.LEAF
        if case == "from dotted":
            from tree.branch.leaf import LEAF
            return LEAF
        if case == "relative":
            from . import late
            return late.LATE
        if case == "not loaded yet":
            import fresh
            return fresh.FRESH
        if case == "__import__":
            return __import__("json").dumps("json")
        from os.path import basename
        return basename("/outside/of/the/model")
"""


@pytest.fixture
def call_time(tmp_path, monkeypatch):
    """A model whose step imports at call time: its own modules (loaded with it or not yet), a
    package three levels deep, a relative sibling; beside it on ``sys.path``, modules of the same
    names that are not the model's, and ``gate``, which a test uses to hold a load half-way."""
    site = write(tmp_path / "site", {
        "words.py": "WORD = 'not the model'\n", "fresh.py": "FRESH = 'not the model'\n",
        "gate.py": "import threading\n\nloaded = []\nentered = threading.Event()\nrelease = threading.Event()\n",
    })
    monkeypatch.syspath_prepend(str(site))
    code = write(tmp_path / "code", {
        "words.py": "WORD = 'the model'\n", "fresh.py": "FRESH = 'the model, imported late'\n",
        "leaf.py": "LEAF = 'a top-level leaf'\n",
        "tree/__init__.py": "", "tree/late.py": "LATE = 'a sibling imported late'\n",
        "tree/branch/__init__.py": "", "tree/branch/leaf.py": "LEAF = 'the leaf of tree.branch'\n",
        "tree/steps.py": CALL_TIME_STEPS,
    })
    import gate

    yield import_steps({"s": "tree.steps:CallTime"}, str(code))["s"](), gate, str(code)
    for name in ("gate", "words", "fresh"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("case, answer", [
    ("loaded", "the model"), ("plain", "the model"), ("dotted", "the leaf of tree.branch"), ("from dotted", "the leaf of tree.branch"),
    ("relative", "a sibling imported late"), ("not loaded yet", "the model, imported late"),
    ("__import__", '"json"'), ("outside", "model"),
])
def test_an_import_at_call_time_gets_the_models_own_module_and_leaves_none_behind(call_time, case, answer):
    step, gate, code = call_time
    assert gate.loaded == ["the leaf of tree.branch"]  # a submodule found in its package, not at the top
    for _ in range(2):  # and again, once the module is loaded
        assert step(case) == answer
    assert not [name for name in sys.modules if name.split(".")[0] in {"tree", "words", "fresh", "leaf"}]
    assert code not in sys.path


def test_an_import_at_call_time_of_a_loaded_module_does_not_wait_for_another_models_load(call_time, tmp_path):
    step, gate, _ = call_time
    slow = write(tmp_path / "slow", {"slow_steps.py": (
        "import gate\n\ngate.entered.set()\ngate.release.wait(30)\n\nimport mlflow_fullmodel as fm\n\n\n"
        "class Slow(fm.Transform):\n    def __call__(self, x):\n        return x\n")})
    order = []

    def load() -> None:
        import_steps({"s": "slow_steps:Slow"}, str(slow))
        order.append("the other model loaded")

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert gate.entered.wait(30)
        assert step("loaded") == "the model"  # while the other load holds the import lock
        order.append("answered")
    finally:
        gate.release.set()
        loader.join()
    assert order == ["answered", "the other model loaded"]



def test_the_manifest_is_written_in_one_canonical_form():
    manifest = Manifest({"b/x.txt": "2", "a.txt": "1"})
    assert manifest.to_json() == ('{\n "algorithm": "sha256",\n "files": {\n  "a.txt": "1",\n  "b/x.txt": "2"\n },\n'
                                  ' "manifest_version": 1\n}\n')
    assert manifest.digest == Manifest({"a.txt": "1", "b/x.txt": "2"}).digest


def test_write_manifest_leaves_bytecode_out_and_hashes_names_with_spaces(tmp_path):
    root = write(tmp_path, {"code/my steps.py": "x = 1\n", "code/__pycache__/m.pyc": "pyc"})
    assert write_manifest(str(root)).files == {"code/my steps.py": sha(b"x = 1\n")}
    assert folder_hashes(str(root / "code")) == {"my steps.py": sha(b"x = 1\n")}
    assert verify_manifest(str(root)).files == {"code/my steps.py": sha(b"x = 1\n")}


def test_the_mlmodel_file_is_hashed_by_its_content_not_its_key_order_and_dates_are_hashed(tmp_path):
    root = write(tmp_path, {"MLmodel": "model_uuid: abc\nutc_time_created: 2024-01-02\nflavors: {fullmodel: {a: 1, b: 2}}\n"})
    saved = write_manifest(str(root))
    write(root, {"MLmodel": "flavors: {fullmodel: {b: 2, a: 1}}\nutc_time_created: 2024-01-02\nmodel_uuid: abc\n"})
    assert verify_manifest(str(root)) == saved
    write(root, {"MLmodel": "flavors: {fullmodel: {b: 2, a: 1}}\nutc_time_created: 2024-01-03\nmodel_uuid: abc\n"})
    with pytest.raises(fm.IntegrityError, match=r"changed since saving: \['MLmodel'\]"):
        verify_manifest(str(root))


def test_every_problem_of_a_folder_is_named_and_a_bad_manifest_by_its_path(tmp_path):
    root = write(tmp_path / "model", {"a.txt": "a", "b.txt": "b"})
    write_manifest(str(root))
    write(root, {"a.txt": "A", "c.txt": "c"})
    with pytest.raises(fm.IntegrityError, match=r"; changed since saving: \['a\.txt'\]; not part of the saved model: "
                                                r"\['c\.txt'\]\. Restore"):
        verify_manifest(str(root))
    (root / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(fm.IntegrityError, match=rf"^{re.escape(str(root / MANIFEST_FILE))} is not valid JSON"):
        verify_manifest(str(root))
    (root / MANIFEST_FILE).unlink()
    with pytest.raises(fm.IntegrityError, match=r"has no MANIFEST\.json, so its files cannot be checked\. It is not a "
                                                r"saved fullmodel model, or it was saved by a release without "
                                                r"manifests: save it again\.$"):
        verify_manifest(str(root))
