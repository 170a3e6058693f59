"""The saved-model folder: spec, code capture, integrity, isolation and the parity check."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from sample_steps import LABELS
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.parity import check_parity, preprocess_digests
from mlflow_fullmodel.storage import load_fullmodel, make_golden, read_golden, read_spec, save_fullmodel
from mlflow_fullmodel.storage.folder import other_value
from mlflow_fullmodel.storage.integrity import verify_manifest, write_manifest
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK


@pytest.fixture
def user_project(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], Path]]:
    """Write a user's project (files by relative path) and put it on sys.path, as a training
    script would have it; afterwards take it off again, modules included."""
    roots: list[str] = []
    before = set(sys.modules)

    def make(name: str, files: dict[str, str]) -> Path:
        root = tmp_path / name
        for relative, source in files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(textwrap.dedent(source))
        sys.path.insert(0, str(root))
        roots.append(str(root))
        return root

    yield make
    for root in roots:
        sys.path.remove(root)
    for name in set(sys.modules) - before:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if any(module_file.startswith(root) for root in roots):
            del sys.modules[name]


def saved(tmp_path: Path, model: fm.FullModel, name: str = "saved") -> str:
    folder = str(tmp_path / name)
    save_fullmodel(model, folder, make_golden(model, EXAMPLE_TEXTS, {"k": 2}))
    return folder


def test_a_loaded_model_predicts_exactly_like_the_one_saved(tmp_path, text_model):
    loaded = load_fullmodel(saved(tmp_path, text_model))
    for params in ({}, {"k": 2}):
        pd.testing.assert_frame_equal(loaded.predict(EXAMPLE_TEXTS, params), text_model.predict(EXAMPLE_TEXTS, params))
    assert repr(loaded).replace(repr(loaded.preprocess[1]), "") == repr(text_model).replace(
        repr(text_model.preprocess[1]), ""
    )


def test_the_spec_is_readable_json_naming_steps_params_and_modules(tmp_path, text_model):
    folder = saved(tmp_path, text_model)
    spec = read_spec(folder)
    assert spec["format_version"] == 2
    assert [s["target"] for s in spec["preprocess"]] == [
        "sample_steps:Normalize", "mlflow_fullmodel.transforms.text:SentencePieceEncode",
    ]
    assert spec["preprocess"][1]["config"]["max_length"] == 32
    assert spec["params"]["k"] == {"default": 1, "minimum": 1, "maximum": 2, "type": "int", "step": "postprocess[0]"}
    assert spec["modules"] == {"main": {"file": "modules/main.pt", "format": "torchscript", "methods": ["forward"]}}
    assert "code/sample_steps.py" in spec["code"]
    assert "sentencepiece" in spec["requirements"]


def test_the_manifest_hashes_every_other_file_of_the_folder_and_its_digest_is_the_manifests_sha256(
    tmp_path, text_model
):
    folder = Path(saved(tmp_path, text_model))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"MANIFEST.json"}
    assert "fullmodel.json" in manifest["files"]
    assert manifest["files"]["golden.json"] == hashlib.sha256((folder / "golden.json").read_bytes()).hexdigest()
    digest = verify_manifest(str(folder)).digest
    assert digest == "sha256:" + hashlib.sha256((folder / "MANIFEST.json").read_bytes()).hexdigest()


def test_no_file_in_a_saved_model_is_a_pickle_outside_the_module_archives(tmp_path, text_model):
    folder = Path(saved(tmp_path, text_model))
    for path in folder.rglob("*"):
        if path.is_file() and path.parent.name != "modules":
            assert path.suffix not in {".pkl", ".pickle", ".joblib"}
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "artifacts/preprocess-1-SentencePieceEncode/model_file/spm.model").write_bytes(b"x"),
         r"changed since saving: \['artifacts/preprocess-1-SentencePieceEncode/model_file/spm.model'\]"),
        (lambda f: (f / "golden.json").unlink(), r"missing: \['golden.json'\]"),
        (lambda f: (f / "code/evil.py").write_text("import os"), r"not part of the saved model: \['code/evil.py'\]"),
    ],
    ids=["tampered artifact", "missing file", "added file"],
)
def test_a_changed_missing_or_added_file_is_an_integrity_error_naming_it(tmp_path, text_model, damage, message):
    folder = Path(saved(tmp_path, text_model))
    damage(folder)
    with pytest.raises(fm.IntegrityError, match=message):
        load_fullmodel(str(folder))


def test_saving_into_a_non_empty_folder_is_refused_and_leaves_it_alone(tmp_path, text_model):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(fm.ConfigError, match="already exists and is not empty"):
        save_fullmodel(text_model, str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]


def test_a_config_that_cannot_be_saved_is_refused_before_anything_is_written(tmp_path, text_model, scripted_net):
    bad = fm.FullModel(preprocess=text_model.preprocess, module=scripted_net,
                       postprocess=[TopK(labels=LABELS, softmax=object())])
    with pytest.raises(fm.ConfigError, match=r"postprocess\[0\] TopK, argument 'softmax': a value of type object"):
        save_fullmodel(bad, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_a_transitive_local_import_is_captured_with_its_package_layout(tmp_path, user_project, spm_path, scripted_net):
    user_project("project", {
        "shop/__init__.py": "",
        "shop/text/__init__.py": "",
        "shop/text/cleaning.py": """
            from .stopwords import STOPWORDS
            from shop import settings

            def clean(text):
                return " ".join(w for w in text.lower().split() if w not in STOPWORDS)[: settings.MAX_CHARS]
        """,
        "shop/text/stopwords.py": "STOPWORDS = {'the', 'a', 'was'}\n",
        "shop/settings.py": "MAX_CHARS = 200\n",
        "shop/steps.py": """
            import mlflow_fullmodel as fm
            from shop.text.cleaning import clean

            class Clean(fm.Transform):
                def __call__(self, text):
                    return clean(text)
        """,
        "unrelated.py": "raise RuntimeError('never imported by the steps')\n",
    })
    from shop.steps import Clean

    model = fm.FullModel(preprocess=[Clean(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                         postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
    folder = saved(tmp_path, model)
    code = {str(p.relative_to(Path(folder) / "code")) for p in (Path(folder) / "code").rglob("*.py")}
    assert code == {"shop/__init__.py", "shop/steps.py", "shop/settings.py", "shop/text/__init__.py",
                    "shop/text/cleaning.py", "shop/text/stopwords.py"}
    check_parity(folder, digests=preprocess_digests(model, EXAMPLE_TEXTS))


def test_two_models_whose_code_shares_a_module_name_load_and_predict_side_by_side(
    tmp_path, user_project, spm_path, scripted_net
):
    def train(name: str, suffix: str) -> tuple[str, pd.DataFrame]:
        """One training run: its own processing.py, a model saved, the answers it gave."""
        root = user_project(name, {"processing.py": f"""
            import mlflow_fullmodel as fm

            class Tag(fm.Transform):
                def __call__(self, text):
                    return text + "{suffix}"
        """})
        from processing import Tag

        model = fm.FullModel(preprocess=[Tag(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                             postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
        folder = saved(tmp_path, model, f"{name}-model")
        answers = model.predict(["a film"])
        sys.path.remove(str(root))
        sys.path.append(str(root))  # out of the way of the next run; the fixture removes it
        del sys.modules["processing"]
        return folder, answers

    runs = [train("champion", " great superb"), train("challenger", " awful dull dreadful")]
    champion, challenger = (load_fullmodel(folder) for folder, _ in runs)
    assert "processing" not in sys.modules
    assert champion.preprocess[0]("x") == "x great superb"
    assert challenger.preprocess[0]("x") == "x awful dull dreadful"
    for model, (_, answers) in zip((champion, challenger), runs):
        pd.testing.assert_frame_equal(model.predict(["a film"]), answers)
    assert runs[0][1]["probability"][0] != runs[1][1]["probability"][0]


def test_the_parity_check_reports_an_output_that_the_reloaded_model_does_not_reproduce(
    tmp_path, user_project, spm_path, scripted_net
):
    user_project("drifting", {"scaling.py": """
        import mlflow_fullmodel as fm

        SUFFIX = ""

        class Echo(fm.Transform):
            def __call__(self, text):
                return text + SUFFIX
    """})
    import scaling

    model = fm.FullModel(preprocess=[scaling.Echo(), SentencePieceEncode(fm.Artifact(spm_path))],
                         module=scripted_net, postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
    scaling.SUFFIX = " dreadful awful"  # state changed in the training process, not in the source that is saved
    folder = saved(tmp_path, model)
    with pytest.raises(fm.ParityError, match=r"row 0: the output of preprocess\[0\] Echo differs"):
        check_parity(folder, digests=preprocess_digests(model, EXAMPLE_TEXTS))


def test_a_step_defined_inside_a_function_is_refused_with_the_fix(tmp_path, scripted_net):
    class Local(fm.Transform):
        def __call__(self, text):
            return text

    with pytest.raises(fm.CodeCaptureError, match="is defined inside a function.*Define it at module level"):
        save_fullmodel(fm.FullModel(preprocess=[Local()], module=scripted_net), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_loading_leaves_no_bytecode_in_the_model_folder(tmp_path, text_model):
    folder = saved(tmp_path, text_model)
    load_fullmodel(folder)
    assert not list(Path(folder).rglob("__pycache__"))
    assert json.loads((Path(folder) / "golden.json").read_text())["params"] == {"k": 2}


def test_the_golden_example_records_each_param_with_another_value_within_its_bounds(tmp_path, text_model):
    golden = make_golden(text_model, EXAMPLE_TEXTS, {})
    assert [params for params, _ in golden.variants] == [{"on_error": "return"}, {"k": 2}]
    pd.testing.assert_frame_equal(golden.variants[1][1], text_model.predict(EXAMPLE_TEXTS, {"k": 2}))
    reloaded = read_golden(saved(tmp_path, text_model))
    # saved() starts from k=2, the maximum
    assert [params for params, _ in reloaded.variants] == [{"k": 2, "on_error": "return"}, {"k": 1}]


@pytest.mark.parametrize("param, current, expected", [
    (fm.Param(True), True, False),
    (fm.Param(1), 1, 2),
    (fm.Param(2, minimum=1, maximum=2), 2, 1),
    (fm.Param(0, minimum=0, maximum=0), 0, None),
    (fm.Param(0, maximum=0), 0, -1),
    (fm.Param(0.5, minimum=0.0, maximum=1.0), 0.5, 0.75),
    (fm.Param(1.0, minimum=1.0, maximum=1.0), 1.0, None),
    (fm.Param(0.0), 0.0, 1.0),
    (fm.Param("greedy", choices=["greedy", "beam"]), "greedy", "beam"),
    (fm.Param("anything"), "anything", None),
])
def test_another_value_of_a_param_respects_its_type_bounds_and_choices(param, current, expected):
    assert other_value(param, current) == expected


def test_a_param_saved_with_wrong_bounds_fails_the_parity_check_naming_the_params(tmp_path, text_model):
    folder = Path(tmp_path / "model")
    save_fullmodel(text_model, str(folder), make_golden(text_model, EXAMPLE_TEXTS, {}))
    spec = json.loads((folder / "fullmodel.json").read_text())
    spec["postprocess"][0]["config"]["k"]["$param"]["maximum"] = 1
    (folder / "fullmodel.json").write_text(json.dumps(spec))
    write_manifest(str(folder))
    with pytest.raises(fm.ParityError, match=r"with params \{'k': 2\}: ParamError: Parameter 'k' must be <= 1"):
        check_parity(str(folder))


def test_an_import_of_the_captured_code_that_cannot_be_found_is_said_not_dropped(tmp_path, user_project, spm_path,
                                                                                  scripted_net, caplog):
    user_project("guarded", {"guarded_steps.py": """
        import mlflow_fullmodel as fm

        try:
            import fast_tokenizer_that_is_not_installed
        except ImportError:
            fast_tokenizer_that_is_not_installed = None

        class Plain(fm.Transform):
            def __call__(self, text):
                return text
    """})
    from guarded_steps import Plain

    model = fm.FullModel(preprocess=[Plain(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                         postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
    with caplog.at_level("WARNING", logger="mlflow_fullmodel.storage.capture"):
        saved(tmp_path, model)
    assert "the module 'fast_tokenizer_that_is_not_installed' that the captured code imports cannot be found" in caplog.text


def test_imports_inside_functions_and_relative_imports_two_levels_up_are_captured(
    tmp_path, user_project, spm_path, scripted_net
):
    user_project("nested_project", {
        "store/__init__.py": "",
        "store/words.py": "BANNED = {'dull'}\n",
        "store/late.py": "def shout(text):\n    return text.upper()\n",
        "store/text/__init__.py": "",
        "store/text/steps/__init__.py": "",
        "store/text/steps/filter.py": """
            import mlflow_fullmodel as fm
            from ...words import BANNED

            class Filter(fm.Transform):
                def __call__(self, text):
                    from store.late import shout  # imported when called, not when the module loads
                    return shout(" ".join(w for w in text.split() if w.lower() not in BANNED)).lower()
        """,
    })
    from store.text.steps.filter import Filter

    model = fm.FullModel(preprocess=[Filter(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                         postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
    folder = saved(tmp_path, model)
    code = {str(p.relative_to(Path(folder) / "code")) for p in (Path(folder) / "code").rglob("*.py")}
    assert {"store/words.py", "store/late.py", "store/text/steps/filter.py"} <= code
    check_parity(folder, digests=preprocess_digests(model, EXAMPLE_TEXTS))


def test_two_models_whose_functions_import_modules_of_one_name_each_get_their_own(
    tmp_path, user_project, spm_path, scripted_net
):
    def train(name: str, suffix: str) -> str:
        root = user_project(name, {
            "words.py": f"SUFFIX = {suffix!r}\n",
            "tagging.py": """
                import mlflow_fullmodel as fm

                class LateTag(fm.Transform):
                    def __call__(self, text):
                        from words import SUFFIX  # at call time, from this model's own words.py
                        return text + SUFFIX
            """,
        })
        from tagging import LateTag

        model = fm.FullModel(preprocess=[LateTag(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                             postprocess=[TopK(labels=LABELS, k=fm.Param(1))])
        folder = saved(tmp_path, model, f"{name}-model")
        sys.path.remove(str(root))
        sys.path.append(str(root))  # out of the way of the next run; the fixture removes it
        for module in ("tagging", "words"):
            sys.modules.pop(module, None)
        return folder

    champion, challenger = (load_fullmodel(f) for f in (train("first", " great"), train("second", " dull")))
    for _ in range(2):  # and again, once the modules are the models' own
        assert champion.preprocess[0]("x") == "x great"
        assert challenger.preprocess[0]("x") == "x dull"
    assert "words" not in sys.modules and "tagging" not in sys.modules


def test_a_step_of_the_wrong_kind_for_its_place_is_refused_at_load(tmp_path, text_model):
    folder = saved(tmp_path, text_model)
    spec_path = Path(folder) / "fullmodel.json"
    spec = json.loads(spec_path.read_text())
    spec["collate"] = spec["forward"]  # a consistent rewrite: a forward strategy where the collate step goes
    spec_path.write_text(json.dumps(spec))
    write_manifest(folder)
    with pytest.raises(fm.ModelFormatError, match="The spec's collate step is a CallModule, not a Collate"):
        load_fullmodel(folder)


def test_the_parity_check_takes_digests_past_what_one_argument_may_hold(tmp_path, text_model):
    folder = saved(tmp_path, text_model)
    digests = [["0" * 16] * len(text_model.preprocess)] * 20_000  # about 800 KiB of JSON
    check_parity(folder, digests=digests)  # used only to name a step when outputs differ


def test_a_parity_check_past_its_timeout_is_a_parity_error_naming_it(tmp_path, text_model):
    folder = saved(tmp_path, text_model)
    with pytest.raises(fm.ParityError, match=r"did not finish within 0 s") as caught:
        check_parity(folder, timeout=0.01)
    assert caught.value.stage == "timeout"
