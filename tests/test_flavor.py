"""The fullmodel MLflow flavor against a real SQLite tracking store and registry."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, text_model) -> Path:
    path = tmp_path_factory.mktemp("flavor") / "model"
    fm.save_model(text_model, str(path), input_example=(EXAMPLE_TEXTS, {"k": 2}))
    return path


def test_mlflow_files_are_written_as_for_builtin_flavors(saved_model):
    names = set(os.listdir(saved_model))
    assert {"MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml", "input_example.json",
            "serving_input_example.json", "fullmodel", "code"} <= names
    mlmodel = yaml.safe_load((saved_model / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow_fullmodel.flavor"
    assert mlmodel["flavors"]["fullmodel"]["modules"] == {"main": "torchscript"}
    serving = json.loads((saved_model / "serving_input_example.json").read_text())
    assert serving["params"] == {"k": 2}
    assert serving["dataframe_split"]["columns"] == ["text"]


def test_the_signature_names_inputs_outputs_and_params_with_defaults(saved_model):
    signature = mlflow.models.Model.load(str(saved_model)).signature
    assert signature.inputs.input_names() == ["text"]
    assert signature.outputs.input_names() == ["label", "probability", "top_labels", "top_probabilities"]
    assert [(p.name, p.default, p.dtype.name) for p in signature.params.params] == [
        ("on_error", "raise", "string"), ("k", 1, "long"),
    ]


def test_requirements_list_public_packages_and_what_the_steps_import_but_not_this_package(saved_model):
    requirements = (saved_model / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in requirements}
    assert {"mlflow", "torch", "numpy", "pandas", "sentencepiece"} <= names
    assert not any("fullmodel" in n for n in names)
    assert not any("+" in r for r in requirements)


def test_the_runtime_travels_inside_the_model(saved_model):
    assert (saved_model / "code" / "mlflow_fullmodel" / "pipeline.py").exists()


def test_pyfunc_predict_after_reload_equals_in_memory_predict(saved_model, text_model):
    loaded = mlflow.pyfunc.load_model(str(saved_model))
    frame = pd.DataFrame({"text": EXAMPLE_TEXTS})
    for params in (None, {"k": 2}):
        pd.testing.assert_frame_equal(loaded.predict(frame, params=params), text_model.predict(EXAMPLE_TEXTS, params))
    pd.testing.assert_frame_equal(fm.load_model(str(saved_model)).predict(EXAMPLE_TEXTS), text_model.predict(EXAMPLE_TEXTS))


def test_a_bad_param_through_pyfunc_is_an_mlflow_invalid_parameter_error(saved_model):
    loaded = mlflow.pyfunc.load_model(str(saved_model))
    with pytest.raises(mlflow.exceptions.MlflowException, match="Parameter 'k' must be <= 2, got 5") as raised:
        loaded.predict(pd.DataFrame({"text": ["x"]}), params={"k": 5})
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_the_device_is_chosen_at_load_time_through_model_config(saved_model, text_model):
    on_cpu = mlflow.pyfunc.load_model(str(saved_model), model_config={"device": "cpu"})
    pd.testing.assert_frame_equal(on_cpu.predict(pd.DataFrame({"text": EXAMPLE_TEXTS})), text_model.predict(EXAMPLE_TEXTS))
    if not torch.cuda.is_available():
        with pytest.raises(mlflow.exceptions.MlflowException, match="'cuda' was requested but CUDA is not available"):
            mlflow.pyfunc.load_model(str(saved_model), model_config={"device": "cuda"})


def test_saving_with_an_input_example_shows_no_warning(tmp_path, text_model):
    # MLflow's example writer compares column names with a range, which pandas 3 deprecates: a
    # warning about MLflow's internals that a user cannot act on.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fm.save_model(text_model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_loading_shows_no_torch_jit_deprecation_warning(saved_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fm.load_model(str(saved_model)).predict(EXAMPLE_TEXTS[:1])
    assert not [w for w in caught if "torch.jit" in str(w.message)]


def test_the_model_loads_in_a_process_without_the_training_code_or_an_installed_mlflow_fullmodel(saved_model, tmp_path):
    # python -I: no working directory, PYTHONPATH or user site on the path; and a finder that
    # refuses mlflow_fullmodel from anywhere but the model folder, as if it were not installed.
    script = textwrap.dedent("""
        import importlib.machinery, json, sys
        model_dir = sys.argv[1]

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name == "mlflow_fullmodel":
                    spec = importlib.machinery.PathFinder.find_spec(name, [model_dir + "/code"])
                    if spec is None:
                        raise ModuleNotFoundError(name)
                    return spec

        sys.meta_path.insert(0, NotInstalled())
        import mlflow, pandas as pd
        try:
            import sample_steps
            raise SystemExit("the training code is importable")
        except ModuleNotFoundError:
            pass
        model = mlflow.pyfunc.load_model(model_dir)
        import mlflow_fullmodel
        out = model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])}), params={"k": 2})
        print(json.dumps({"runtime": mlflow_fullmodel.__file__, "labels": out["label"].tolist(),
                          "probabilities": out["probability"].tolist()}))
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script, str(saved_model), json.dumps(EXAMPLE_TEXTS)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["runtime"].startswith(str(saved_model))
    golden = json.loads((saved_model / "fullmodel" / "golden.json").read_text())
    assert report["labels"] == [row[0] for row in golden["outputs"]["data"]]
    assert report["probabilities"] == pytest.approx([row[1] for row in golden["outputs"]["data"]], rel=1e-6)


def test_save_without_an_input_example_needs_parity_switched_off_explicitly(tmp_path, text_model):
    with pytest.raises(fm.ConfigError, match="parity check needs an input_example"):
        fm.save_model(text_model, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    fm.save_model(text_model, str(tmp_path / "m"), check_parity=False)
    assert not (tmp_path / "m" / "fullmodel" / "golden.json").exists()


def test_log_register_and_load_by_alias_version_run_and_model_id(registered_reviews, text_model):
    expected = text_model.predict(EXAMPLE_TEXTS, params={"k": 2})
    uris = ["models:/reviews@champion", f"models:/reviews/{registered_reviews.registered_model_version}",
            registered_reviews.model_uri, f"runs:/{registered_reviews.run_id}/model"]
    for uri in uris:
        pd.testing.assert_frame_equal(fm.load_model(uri).predict(EXAMPLE_TEXTS, params={"k": 2}), expected)
        pyfunc = mlflow.pyfunc.load_model(uri)
        pd.testing.assert_frame_equal(pyfunc.predict(pd.DataFrame({"text": EXAMPLE_TEXTS}), params={"k": 2}), expected)


def test_a_logged_model_that_fails_parity_is_not_logged(tracking, tmp_path, text_model, scripted_net):
    from sample_steps import LABELS

    from mlflow_fullmodel.transforms import TopK

    # A step that depends on state the model does not save: a set the training script fills in.
    # (Deterministic on purpose: an unseeded random step could reproduce its outputs by chance.)
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "noisy.py").write_text(textwrap.dedent("""
        import mlflow_fullmodel as fm

        STOP_WORDS = set()

        class DropStopWords(fm.Transform):
            def __call__(self, text):
                return " ".join(word for word in text.split() if word not in STOP_WORDS)
    """))
    try:
        import noisy

        noisy.STOP_WORDS.update({"great", "superb"})
        model = fm.FullModel(preprocess=[noisy.DropStopWords(), *text_model.preprocess[1:]],
                             module=scripted_net, postprocess=[TopK(labels=LABELS)])
        example = ["a great film", "a superb plot and a great actor", "dull and boring"]
        with mlflow.start_run() as run, pytest.raises(fm.ParityError, match=r"row 0: the output of preprocess\[0\] DropStopWords differs"):
            fm.log_model(model, name="noisy", input_example=example)
        assert not mlflow.MlflowClient().list_artifacts(run.info.run_id)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("noisy", None)


def test_a_torch_export_program_and_several_named_modules_save_and_reload(tmp_path, text_model, scripted_net):
    from sample_steps import LABELS, BagOfIds

    torch.manual_seed(0)
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    program = torch.export.export(
        BagOfIds(vocab_size=64, classes=len(LABELS)).eval(),
        (torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])),
        dynamic_shapes=({0: batch, 1: length}, {0: batch}),
    )
    model = fm.FullModel(
        preprocess=text_model.preprocess,
        module={"exported": program, "scripted": scripted_net},
        forward=fm.CallModule(module="exported"),
        postprocess=text_model.postprocess,
    )
    fm.save_model(model, str(tmp_path / "m"), input_example=EXAMPLE_TEXTS)  # parity check included
    mlmodel = yaml.safe_load((tmp_path / "m" / "MLmodel").read_text())
    assert mlmodel["flavors"]["fullmodel"]["modules"] == {"exported": "torch.export", "scripted": "torchscript"}
    assert (tmp_path / "m" / "fullmodel" / "modules" / "exported.pt2").exists()
    loaded = fm.load_model(str(tmp_path / "m"))
    texts = EXAMPLE_TEXTS + ["a much longer text than any example " * 4]
    pd.testing.assert_frame_equal(loaded.predict(texts, params={"k": 2}), model.predict(texts, params={"k": 2}))


@pytest.mark.parametrize(("in_server", "tune_server"), [(True, "true"), (False, "true"), (True, "false")])
def test_only_a_scoring_server_process_is_tuned_at_load_unless_switched_off(saved_model, in_server, tune_server):
    # In a child process: the settings are process-wide, and a notebook that loads a model must
    # keep its own.
    script = textwrap.dedent("""
        import gc, json, sys
        import mlflow, pandas as pd, torch
        before = {"storage": pd.get_option("mode.string_storage"), "threads": torch.get_num_threads()}
        model = mlflow.pyfunc.load_model(sys.argv[1])
        frame = pd.DataFrame({"text": json.loads(sys.argv[2])})
        print(json.dumps({"before": before, "storage": pd.get_option("mode.string_storage"),
                          "threads": torch.get_num_threads(), "frozen": gc.get_freeze_count(),
                          "labels": model.predict(frame)["label"].tolist()}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "__pyfunc_model_path__"}
    env["MLFLOW_FULLMODEL_TUNE_SERVER"] = tune_server
    if in_server:
        env["__pyfunc_model_path__"] = str(saved_model)  # what the scoring server sets
    result = subprocess.run([sys.executable, "-c", script, str(saved_model), json.dumps(EXAMPLE_TEXTS)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    golden = json.loads((saved_model / "fullmodel" / "golden.json").read_text())
    assert report["labels"] == [row[0] for row in golden["outputs"]["data"]]
    if in_server:
        assert report["threads"] == max(1, (os.cpu_count() or 1) // 2)
    else:
        assert report["threads"] == report["before"]["threads"]
    if in_server and tune_server == "true":
        assert report["storage"] == "python"
        assert report["frozen"] > 10_000  # MLflow, torch and pandas at least
    else:
        assert report["storage"] == report["before"]["storage"]
        assert report["frozen"] == 0


def test_tune_scoring_server_does_nothing_outside_a_scoring_server(monkeypatch):
    import gc

    monkeypatch.delenv("__pyfunc_model_path__", raising=False)
    storage, frozen = pd.get_option("mode.string_storage"), gc.get_freeze_count()
    assert fm.tune_scoring_server() is False
    assert (pd.get_option("mode.string_storage"), gc.get_freeze_count()) == (storage, frozen)


class TestServingConfig:
    def test_model_config_wins_over_the_environment_which_wins_over_defaults(self, monkeypatch):
        from mlflow_fullmodel.settings import ServingSettings

        monkeypatch.setenv("MLFLOW_FULLMODEL_MAX_WAIT_MS", "7.5")
        monkeypatch.setenv("MLFLOW_FULLMODEL_BATCHING", "false")
        settings = ServingSettings.resolve({"max_batch_size": 16, "device": None})
        assert settings == ServingSettings(batching=False, max_batch_size=16, max_wait_ms=7.5)
        assert dataclasses.asdict(settings) == {
            "device": "cpu", "batching": False, "max_batch_size": 16, "max_wait_ms": 7.5, "num_threads": None,
            "tune_server": True, "max_rows": 10_000, "max_text_chars": 100_000, "max_bytes": 16 * 1024 * 1024,
            "max_samples": 20_000, "deadline_s": 55.0, "heavy_samples": 256, "max_heavy_requests": None}
        assert ServingSettings.resolve({"max_wait_ms": 1}).max_wait_ms == 1

    def test_a_value_that_does_not_parse_is_an_error_naming_the_variable(self, saved_model, monkeypatch):
        monkeypatch.setenv("MLFLOW_FULLMODEL_MAX_BATCH_SIZE", "lots")
        with pytest.raises(mlflow.exceptions.MlflowException,
                           match=r"max_batch_size \(MLFLOW_FULLMODEL_MAX_BATCH_SIZE\) must be an integer >= 1, got 'lots'"):
            mlflow.pyfunc.load_model(str(saved_model))

    def test_pyfunc_batches_when_asked_and_by_default_only_on_cuda(self, saved_model, text_model):
        batched = mlflow.pyfunc.load_model(str(saved_model), model_config={"batching": True, "max_batch_size": 3})
        plain = mlflow.pyfunc.load_model(str(saved_model))
        assert batched._model_impl.batcher.max_batch_size == 3
        assert plain._model_impl.batcher is None  # the default on the CPU
        frame = pd.DataFrame({"text": EXAMPLE_TEXTS * 3})
        expected = text_model.predict(EXAMPLE_TEXTS * 3, params={"k": 2})
        for model in (batched, plain):
            pd.testing.assert_frame_equal(model.predict(frame, params={"k": 2}), expected)


class TestServerWorkers:
    @pytest.mark.parametrize("workers, cores, expected", [(1, 2, 1), (2, 2, 1), (1, 16, 8), (2, 16, 4), (3, 16, 2),
                                                          (8, 4, 1)])
    def test_each_worker_gets_its_share_of_half_the_cores(self, workers, cores, expected):
        from mlflow_fullmodel.serving import default_thread_count

        assert default_thread_count(workers, cores) == expected

    def test_the_worker_count_is_read_from_the_uvicorn_command_line_of_the_process_or_its_parent(self):
        probe = "from mlflow_fullmodel.serving import server_workers; print(server_workers())"
        own = subprocess.run([sys.executable, "-c", probe, "uvicorn", "--workers", "3"], capture_output=True, text=True)
        assert own.stdout.strip() == "3", own.stderr
        spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {probe!r}])"
        child = subprocess.run([sys.executable, "-c", spawn, "uvicorn", "--workers", "2"], capture_output=True, text=True)
        assert child.stdout.strip() == "2", child.stderr
        alone = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert alone.stdout.strip() == "1"


def test_log_model_says_by_default_that_parity_passed_and_where_the_card_is(tmp_path, spm_path):
    # A user's script, as they run it: no logging set up, MLflow's own log output.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import mlflow
        import mlflow_fullmodel as fm
        from sample_steps import LABELS, BagOfIds, Normalize
        from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

        model = fm.FullModel([Normalize(), SentencePieceEncode(fm.Artifact({spm_path!r}), max_length=32)],
                             fm.script(BagOfIds(64, 2)), [TopK(labels=LABELS)])
        mlflow.set_tracking_uri("sqlite:///" + {str(tmp_path / "mlflow.db")!r})
        with mlflow.start_run():
            fm.log_model(model, name="model", input_example=["a fine film", "dull"])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # not the tests' experiment
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"INFO mlflow\.fullmodel: Parity check passed in \d+\.\d s: .* reproduces its 2 example row\(s\)",
                     result.stderr)
    assert re.search(r"INFO mlflow\.fullmodel: Model card: models:/m-\w+/MODEL_CARD\.md", result.stderr)
