"""The translator example project, trained at tiny scale: log -> register -> load -> predict with
beam-search params, then served over HTTP with raw source text."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from servers import serve, stop
from support import train_example

import mlflow_fullmodel as fm
from mlflow_fullmodel.decoding import BeamSearch, GreedySearch

pytestmark = pytest.mark.slow

URI = "models:/example-translator@champion"
SOURCES = ["7", "42", "1,234", " 9 999 ", "305", "12", "8000", "610", "77", "4 321"]


@pytest.fixture(scope="module")
def trained(translator_example: dict) -> dict:
    """One tiny training run of the example, as a user runs it: a script in its own process."""
    return translator_example


@pytest.fixture(scope="module")
def champion(trained) -> fm.FullModel:
    return fm.load_model(URI)


def test_training_logs_losses_and_exact_match_and_registers_the_champion(trained):
    metrics = trained["run"].data.metrics
    assert {"train_loss", "val_loss", "val_exact_match", "val_exact_match_beam"} <= set(metrics)
    assert 0.0 <= metrics["val_exact_match"] <= 1.0 and metrics["train_loss"] > 0
    version = mlflow.MlflowClient().get_model_version_by_alias("example-translator", "champion")
    assert version.run_id == trained["run"].info.run_id


def test_the_champion_carries_both_tokenizers_its_search_params_and_the_projects_code(trained, tmp_path):
    model_dir = Path(mlflow.artifacts.download_artifacts(URI, dst_path=str(tmp_path)))
    tokenizers = sorted(p.relative_to(model_dir / "fullmodel" / "artifacts").parts[0]
                        for p in (model_dir / "fullmodel" / "artifacts").rglob("*.model"))
    assert tokenizers == ["postprocess-0-SentencePieceDecode", "preprocess-1-SentencePieceEncode"]
    assert "processing.py" in {p.name for p in (model_dir / "fullmodel" / "code").rglob("*.py")}
    assert "sentencepiece" in (model_dir / "requirements.txt").read_text()
    params = {p.name: p.default for p in mlflow.models.get_model_info(URI).signature.params}
    assert params["beam_size"] == 4 and params["n_best"] == 1
    assert {"max_length", "length_penalty"} <= set(params)


def test_the_champion_translates_raw_numbers_with_three_candidates_when_asked(trained, champion):
    loaded = mlflow.pyfunc.load_model(URI)
    result = loaded.predict(pd.DataFrame({"source": SOURCES}), params={"n_best": 3})
    assert list(result.columns) == ["translation", "candidates", "scores"]
    assert all(len(c) == 3 for c in result["candidates"]) and all(len(s) == 3 for s in result["scores"])
    assert all(s == sorted(s, reverse=True) for s in result["scores"])
    assert result["translation"].tolist() == [c[0] for c in result["candidates"]]
    pd.testing.assert_frame_equal(result, champion.predict(SOURCES, params={"n_best": 3}))
    default = loaded.predict(pd.DataFrame({"source": SOURCES}))
    assert list(default.columns) == list(result.columns) and all(len(c) == 1 for c in default["candidates"])


def test_beam_size_one_gives_the_greedy_translation(champion):
    beam = champion.forward
    assert isinstance(beam, BeamSearch)
    greedy = fm.FullModel(
        champion.preprocess, champion.module, champion.postprocess,
        forward=GreedySearch(bos_id=beam.bos_id, eos_id=beam.eos_id, pad_id=beam.pad_id, max_length=12),
        collate=champion.collate, input_columns=champion.input_columns,
    )
    sources = SOURCES + [str(n) for n in range(100, 10000, 371)]
    expected = greedy.predict(sources)
    # length_penalty 0: both scores are then the total log-probability of the translation.
    got = champion.predict(sources, params={"beam_size": 1, "max_length": 12, "length_penalty": 0.0})
    assert got["translation"].tolist() == expected["translation"].tolist()
    assert got["scores"].tolist() == [pytest.approx(s, rel=1e-5) for s in expected["scores"]]


def test_the_served_champion_translates_raw_text_over_http_and_refuses_bad_params(trained, tracking, champion):
    process, url = serve(URI, tracking)

    def invoke(params: dict | None, sources: list[str] = SOURCES) -> requests.Response:
        body = {"dataframe_records": [{"source": s} for s in sources], **({"params": params} if params else {})}
        return requests.post(f"{url}/invocations", json=body, timeout=60)

    try:
        response = invoke({"n_best": 3})
        assert response.status_code == 200, response.text
        served = pd.DataFrame(response.json()["predictions"])
        expected = champion.predict(SOURCES, params={"n_best": 3})
        assert served["translation"].tolist() == expected["translation"].tolist()
        assert served["candidates"].tolist() == expected["candidates"].tolist()

        for params, sources, message in [
            ({"n_best": 5}, SOURCES, "Parameter 'n_best' (5) must be at most beam_size (4)"),
            ({"n_best": 0}, SOURCES, "Parameter 'n_best' must be >= 1, got 0"),
            ({"beam_size": -2}, SOURCES, "Parameter 'beam_size' must be >= 1, got -2"),
            (None, ["12", "twelve"], "Row 1: preprocess[0] NormalizeNumber: expected a number written in digits"),
        ]:
            bad = invoke(params, sources)
            assert bad.status_code == 400, bad.text
            assert message in bad.json()["message"] and "Traceback" not in bad.text
            # ... and the server keeps serving.
            again = invoke(None, ["42"])
            assert again.status_code == 200 and len(again.json()["predictions"]) == 1
    finally:
        stop(process)


def test_the_same_training_exported_as_two_programs_translates_like_the_torchscript_model(trained, tracking, champion, tmp_path):
    train_example("translator", tracking, tmp_path, "--module-format", "export", "--registered-model-name", "example-translator-export")
    exported = fm.load_model("models:/example-translator-export@champion")
    assert exported.module.formats == {"encoder": "torch.export", "decoder": "torch.export"}
    # Same seed, same training: the programs translate as the TorchScript module does, one source
    # alone or many in a batch, with the beam the request asks for.
    for sources in (SOURCES[:1], SOURCES):
        for params in ({}, {"beam_size": 1}, {"n_best": 2}):
            got, want = exported.predict(sources, params=params), champion.predict(sources, params=params)
            assert got["translation"].tolist() == want["translation"].tolist(), (sources, params)
