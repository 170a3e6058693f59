"""Batch invariance: a row must get the same answer alone and inside a padded batch of other rows,
checked when a model is saved and when it is verified."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch
from sample_steps import LABELS
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.batching import MicroBatcher
from mlflow_fullmodel.parity import batch_invariance_problems, compare_outputs
from mlflow_fullmodel.transforms import TopK
from mlflow_fullmodel.verification import verify_model


class UnmaskedMean(torch.nn.Module):
    """Mean of the token embeddings over the padded length: padding changes a short row's answer."""

    def __init__(self, vocab_size: int = 64, classes: int = len(LABELS), dim: int = 16) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, dim)
        self.out = torch.nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(ids).mean(1))


def unmasked_model(text_model: fm.FullModel, batch_size: int = 4) -> fm.FullModel:
    torch.manual_seed(0)
    return fm.FullModel(
        preprocess=text_model.preprocess,
        module=fm.script(UnmaskedMean()),
        # Scores, not only labels: a label can survive a small change that the scores show.
        postprocess=[TopK(labels=LABELS, k=len(LABELS))],
        batch_size=batch_size,
    )


def test_a_masked_model_answers_every_row_alike_alone_and_in_a_padded_batch(text_model):
    assert batch_invariance_problems(text_model, EXAMPLE_TEXTS) == []


def test_a_model_that_pools_over_its_padding_is_found_and_the_row_and_column_are_named(text_model):
    problems = batch_invariance_problems(unmasked_model(text_model), EXAMPLE_TEXTS)
    # The longest text has no padding in either arrangement; the two shorter ones do.
    rows = {problem.split(",")[0] for problem in problems}
    assert rows == {"row 0", "row 1"}
    assert any(p.startswith("row 0, column 'probability': alone ") and ", in a padded batch 0." in p for p in problems)


def test_saving_a_batch_sensitive_model_fails_and_says_what_to_do(tmp_path, text_model):
    with pytest.raises(fm.ParityError, match="batch-sensitive") as caught:
        fm.save_model(unmasked_model(text_model), str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    assert caught.value.stage == "batch"
    message = str(caught.value)
    assert "row 0, column 'probability': alone " in message
    assert "mask the padded positions" in message and "batch_size=1" in message
    assert not (tmp_path / "model").exists()


#: Holds each request in pre-processing until all have arrived, so that they meet in one forward round.
ARRIVALS = threading.Barrier(len(EXAMPLE_TEXTS))


class WaitForTheOthers(fm.Transform):
    def __call__(self, text: str) -> str:
        ARRIVALS.wait(timeout=30)
        return text


def test_batch_size_one_is_accepted_and_the_micro_batcher_keeps_it(tmp_path, text_model):
    model = unmasked_model(text_model, batch_size=1)
    fm.save_model(model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    alone = pd.concat([model.predict([text]) for text in EXAMPLE_TEXTS], ignore_index=True)

    # Concurrent requests meet in the micro-batcher; batch_size=1 must keep their rows apart.
    meeting = fm.FullModel([WaitForTheOthers(), *model.preprocess], model.module, model.postprocess,
                           batch_size=1)
    batcher = MicroBatcher(meeting, max_batch_size=64, max_wait_ms=500)
    answers: list[pd.DataFrame | None] = [None] * len(EXAMPLE_TEXTS)

    def ask(index: int) -> None:
        answers[index] = batcher.predict([EXAMPLE_TEXTS[index]])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(EXAMPLE_TEXTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    pd.testing.assert_frame_equal(pd.concat(answers, ignore_index=True), alone)


def test_verify_finds_a_batch_sensitive_model_saved_without_the_check(tmp_path, text_model):
    path = tmp_path / "model"
    fm.save_model(unmasked_model(text_model), str(path), input_example=EXAMPLE_TEXTS, check_parity=False)
    with pytest.raises(fm.ParityError, match="batch-sensitive") as caught:
        verify_model(str(path))
    assert caught.value.stage == "batch"


@pytest.mark.parametrize("want, got", [([1, 2], [1, 2, 3]), ([1, 2, 3], [1, 2]), ([[0.5]], [[0.5, 0.5]]), ([], [0.0])])
def test_the_parity_comparison_tells_lists_of_different_lengths_apart(want, got):
    problems = compare_outputs(pd.DataFrame({"scores": [want]}), pd.DataFrame({"scores": [got]}))
    assert problems == [f"row 0, column 'scores': expected {want!r}, got {got!r}"]
    assert compare_outputs(pd.DataFrame({"scores": [want]}), pd.DataFrame({"scores": [list(want)]})) == []
