"""save_model(quantize="int8"): torchao's int8 copy of the plain modules, exported, reproduced exactly
by the saved model, its drift from the float model recorded (card, inspect) and bounded by
max_drift; with compile="aoti" too, verified in a fresh environment built from its requirements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sample_steps import LABELS, BagOfIds, Normalize, corpus
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.optimize import drift
from mlflow_fullmodel.parity import compare_outputs
from mlflow_fullmodel.storage import read_golden
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

torchao = pytest.importorskip("torchao", reason="the int8 extra (torchao) is not installed")


class Classifier(torch.nn.Module):
    """Mean of the token embeddings, a hidden layer, the scores: two nn.Linear to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = BagOfIds(vocab_size=64, classes=32, dim=32)
        self.out = torch.nn.Linear(32, len(LABELS))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bag(ids, lengths)))


class Encoder(torch.nn.Module):
    """A two-layer Transformer encoder, mean-pooled over the real tokens (``masked=False``: over the
    padding too, which a batched row reads)."""

    def __init__(self, masked: bool = True) -> None:
        super().__init__()
        self.masked = masked
        self.embedding = torch.nn.Embedding(64, 128)
        layer = torch.nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Linear(128, len(LABELS))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
        hidden = self.encoder(self.embedding(ids), src_key_padding_mask=padding)
        if not self.masked:
            return self.out(hidden.mean(1))
        keep = (~padding).float()[..., None]
        return self.out((hidden * keep).sum(1) / lengths[:, None].float())


@pytest.fixture(scope="module")
def float_model(spm_path: str) -> fm.FullModel:
    torch.manual_seed(0)
    return fm.FullModel(
        preprocess=[Normalize(), SentencePieceEncode(fm.Artifact(spm_path), max_length=32)],
        module=Classifier(),
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        batch_size=2,
    )


@pytest.fixture(scope="module")
def quantized_path(float_model: fm.FullModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "model"
    fm.save_model(float_model, str(path), input_example=EXAMPLE_TEXTS, quantize="int8")
    return path


def spec_of(path: Path) -> dict:
    return json.loads((path / "fullmodel" / "fullmodel.json").read_text())


def test_the_saved_int8_model_reproduces_the_quantized_one_exactly_and_records_its_drift(float_model, quantized_path):
    golden = read_golden(str(quantized_path / "fullmodel"))
    assert golden is not None
    loaded = fm.load_model(str(quantized_path))
    assert compare_outputs(golden.outputs, loaded.predict(EXAMPLE_TEXTS), rel_tol=0) == []
    weights = {type(tensor).__module__.split(".")[0] for name, tensor in loaded.module["main"].state_dict.items()
               if name.endswith("weight") and tensor.dim() == 2 and "embedding" not in name}
    assert weights == {"torchao"}  # the program's linear weights are torchao's int8 tensors

    quantization = spec_of(quantized_path)["quantization"]
    assert quantization["library"] == f"torchao {torchao.__version__}"
    assert quantization["layers"] == {"main": 2}
    measured = drift(float_model.predict(EXAMPLE_TEXTS), golden.outputs)
    assert quantization["drift"] == measured
    assert 0 < measured["largest_difference"] < 0.05  # quantized for real, and close to the float model
    requirements = (quantized_path / "requirements.txt").read_text().split()
    assert f"torchao=={torchao.__version__}" in requirements


def test_an_int8_transformer_passes_the_batch_check_within_its_quantization_noise_and_one_reading_padding_does_not(
    float_model, tmp_path
):
    # Other rows in a batch change the float rounding before an activation is quantized; a value
    # that crosses an int8 step moves the answer by about 1e-3: allowed. Reading the padding is not.
    torch.manual_seed(0)
    texts = [text for text, _ in corpus(12, seed=3)] + [" ".join(text for text, _ in corpus(6, seed=4))]
    encoder = float_model._replace(module=Encoder(), batch_size=16)
    fm.save_model(encoder, str(tmp_path / "masked"), input_example=texts, quantize="int8")
    assert spec_of(tmp_path / "masked")["quantization"]["rtol"] == 1e-2
    unmasked = float_model._replace(module=Encoder(masked=False), batch_size=16)
    with pytest.raises(fm.ParityError, match="batch-sensitive") as caught:
        fm.save_model(unmasked, str(tmp_path / "unmasked"), input_example=texts, quantize="int8")
    assert caught.value.stage == "batch"


def test_the_users_module_stays_float(float_model, quantized_path):
    module = float_model.module["main"]
    assert type(module.out.weight) is torch.nn.Parameter and module.out.weight.dtype == torch.float32
    golden = read_golden(str(quantized_path / "fullmodel"))
    assert golden is not None
    assert compare_outputs(float_model.predict(EXAMPLE_TEXTS), golden.outputs) != []


def test_the_card_and_inspect_show_the_drift(quantized_path):
    drift_facts = spec_of(quantized_path)["quantization"]["drift"]
    card = (quantized_path / "MODEL_CARD.md").read_text()
    assert "### Quantized weights" in card
    assert f"largest difference of an output number is {drift_facts['largest_difference']:.3g}" in card
    result = CliRunner().invoke(main, ["inspect", str(quantized_path)])
    assert result.exit_code == 0, result.output
    assert (f"quantized: int8 (torchao {torchao.__version__}); drift on the golden example: labels agree "
            f"{drift_facts['agreement']:.0%}, largest difference {drift_facts['largest_difference']:.3g}") in result.output


def test_max_drift_refuses_a_model_that_drifts_more_and_keeps_one_that_does_not(float_model, tmp_path):
    with pytest.raises(fm.DriftError, match=r"more than max_drift=0.0 allows: labels agree on 100% of 3 row\(s\), "
                                            r"the largest difference of an output number is"):
        fm.save_model(float_model, str(tmp_path / "strict"), input_example=EXAMPLE_TEXTS, quantize="int8",
                      max_drift=0.0)
    assert not (tmp_path / "strict").exists()
    fm.save_model(float_model, str(tmp_path / "lenient"), input_example=EXAMPLE_TEXTS, quantize="int8",
                  max_drift=0.5, check_parity=False)
    assert spec_of(tmp_path / "lenient")["quantization"]["drift"]["largest_difference"] <= 0.5


def test_drift_counts_rows_whose_labels_change_and_the_largest_number_moved():
    reference = pd.DataFrame({"label": ["a", "b", "c", "a"], "probability": [0.9, 0.5, 0.7, 0.6],
                              "top": [[0.9, 0.1], [0.5, 0.4], [0.7, 0.2], [0.6, 0.3]]})
    quantized = pd.DataFrame({"label": ["a", "c", "c", "a"], "probability": [0.9, 0.45, 0.7, 0.6],
                              "top": [[0.9, 0.1], [0.45, 0.4], [0.7, 0.45], [0.6, 0.3]]})
    measured = drift(reference, quantized)
    assert measured == {"rows": 4, "agreement": 0.75, "largest_difference": pytest.approx(0.25)}


def test_quantize_is_refused_where_it_cannot_work(float_model, text_model, tmp_path):
    cases = [
        (text_model, {"quantize": "int8"}, "module 'main' is TorchScript. Pass the plain nn.Module"),
        (float_model, {"quantize": "int4"}, "quantize='int4' is not a quantization"),
        (float_model, {"max_drift": 0.1}, "max_drift=0.1: it bounds a quantized model's drift"),
        (float_model._replace(module=torch.nn.EmbeddingBag(64, len(LABELS))), {"quantize": "int8"},
         "module 'main' \\(EmbeddingBag\\) has none"),
    ]
    exported = torch.export.export(float_model.module["main"], (torch.zeros(2, 3, dtype=torch.long),
                                                                torch.tensor([3, 2])))
    cases.append((float_model._replace(module=exported), {"quantize": "int8"}, "already a torch.export program"))
    for model, options, message in cases:
        with pytest.raises(fm.ConfigError, match=message):
            fm.save_model(model, str(tmp_path / "m"), input_example=EXAMPLE_TEXTS, **options)
        assert not (tmp_path / "m").exists()


def test_without_torchao_saving_and_loading_an_int8_model_name_the_extra(quantized_path, tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["torchao"] = None  # as if the int8 extra were not installed
        import torch, mlflow_fullmodel as fm
        from sample_steps import BagOfIds, ParseIds
        model = fm.FullModel([ParseIds()], BagOfIds(vocab_size=8, classes=2))
        for attempt in (lambda: fm.save_model(model, "m", input_example=["1 2"], quantize="int8"),
                        lambda: fm.load_model(sys.argv[1])):
            try:
                attempt()
            except fm.ConfigError as error:
                print(error)
    """)
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script, str(quantized_path)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": tests}, timeout=300)
    saving, loading = result.stdout.splitlines()[:2] if result.stdout.count("\n") >= 2 else (result.stdout, "")
    assert saving.startswith("quantize='int8' needs torchao, which is not installed: pip install "
                             "'mlflow-fullmodel[int8]'"), result.stdout + result.stderr
    assert loading.startswith("This model, quantized with torchao, needs torchao"), result.stdout + result.stderr


@pytest.mark.slow
def test_an_int8_compiled_model_logged_runs_its_package_and_verifies_in_a_fresh_environment(
    float_model, tracking, tmp_path_factory, monkeypatch
):
    from mlflow_fullmodel.fresh_env import ENV_CACHE_VARIABLE
    from mlflow_fullmodel.verification import verify_model

    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(tmp_path_factory.mktemp("envs")))
    with mlflow.start_run():
        info = fm.log_model(float_model, name="model", input_example=EXAMPLE_TEXTS, quantize="int8", compile="aoti")
    loaded = fm.load_model(info.model_uri)
    assert list(loaded.module.compiled) == ["main"]
    report = verify_model(info.model_uri, fresh_env=True)
    # An int8 program compiled is held to the quantization's tolerance, not the default 1e-4.
    assert "parity (compiled forward within rtol 0.01)" in report.checks
    assert "fresh-env (compiled forward within rtol 0.01)" in report.checks
