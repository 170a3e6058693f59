"""The micro-batcher: concurrent predict calls share forward batches without changing answers."""

from __future__ import annotations

import random
import threading
import time

import pandas as pd
import pytest
from sample_steps import LABELS, ParseIds, ScaledCall

import mlflow_fullmodel as fm
from mlflow_fullmodel.batching import MicroBatcher
from mlflow_fullmodel.parity import compare_outputs
from mlflow_fullmodel.transforms import TopK

# Each test waits on threads, barriers and a batcher's queue: a lost wake-up would hang it, so
# each gets far more time than it needs (seconds) and then fails instead of stalling the suite.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ids_model(scripted_net) -> fm.FullModel:
    """Token ids in, with a forward parameter (scale) and a post-processing one (k)."""
    return fm.FullModel(
        preprocess=[ParseIds()], module=scripted_net, forward=ScaledCall(scale=fm.Param(1.0)),
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=2))], batch_size=8,
    )


def random_request(rng: random.Random) -> tuple[list[str], dict]:
    rows = [" ".join(str(rng.randrange(4, 64)) for _ in range(rng.randint(1, 30))) for _ in range(rng.randint(1, 5))]
    params = rng.choice([{}, {"k": 2}, {"scale": 3.0}, {"scale": 0.5, "k": 2}])
    return rows, params


def run_threads(target, count: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a predict call hung"


def test_concurrent_calls_with_random_inputs_and_params_get_their_sequential_answers(ids_model):
    rng = random.Random(7)
    requests = [random_request(rng) for _ in range(48)]
    expected = [ids_model.predict(rows, params) for rows, params in requests]
    batcher = MicroBatcher(ids_model, max_batch_size=16, max_wait_ms=5)
    results: dict[int, pd.DataFrame] = {}

    def call(thread: int) -> None:
        for i in range(thread, len(requests), 12):
            results[i] = batcher.predict(*requests[i])

    run_threads(call, 12)
    for i, frame in enumerate(expected):
        assert compare_outputs(frame, results[i]) == [], f"request {i} {requests[i]}"


def test_an_error_in_one_request_fails_only_that_request(ids_model):
    batcher = MicroBatcher(ids_model, max_batch_size=64, max_wait_ms=20)
    good = ["5 6 7", "8 9"]
    expected = ids_model.predict(good)
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(8)

    def call(thread: int) -> None:
        rows = ["5 6", "64000 1"] if thread == 3 else good  # id 64000: the embedding has 64 rows
        barrier.wait(timeout=30)
        try:
            outcomes[thread] = batcher.predict(rows)
        except Exception as error:  # noqa: BLE001 - the test records what each caller saw
            outcomes[thread] = error

    run_threads(call, 8)
    assert isinstance(outcomes[3], fm.ModelError), outcomes[3]
    assert str(outcomes[3]).startswith("Row 1: forward ScaledCall failed: RuntimeError: index out of range")
    for thread in set(range(8)) - {3}:
        pd.testing.assert_frame_equal(outcomes[thread], expected)
    pd.testing.assert_frame_equal(batcher.predict(good), expected)  # and the batcher still works


def test_a_bad_row_is_reported_to_its_caller_naming_the_row(ids_model):
    batcher = MicroBatcher(ids_model)
    with pytest.raises(fm.InputError, match=r"Row 1: preprocess\[0\] ParseIds failed: ValueError"):
        batcher.predict(["1 2", "one two"])
    with pytest.raises(fm.ParamError, match="Parameter 'k' must be <= 2"):
        batcher.predict(["1 2"], params={"k": 7})


class Gate(fm.CallModule):
    """Holds the first forward call until the test opens the gate; records each batch's size."""

    def __call__(self, modules, batch, device):
        self._sizes.append(len(batch.inputs))
        self._gate.wait(timeout=60)
        return super().__call__(modules, batch, device)


def test_requests_that_arrive_while_a_batch_runs_share_the_next_batch(scripted_net):
    gate = Gate()
    gate._sizes, gate._gate = [], threading.Event()
    model = fm.FullModel(preprocess=[ParseIds()], module=scripted_net, forward=gate,
                         postprocess=[TopK(labels=LABELS)], batch_size=64)
    batcher = MicroBatcher(model, max_batch_size=64, max_wait_ms=0)
    first = threading.Thread(target=batcher.predict, args=(["1 2 3"],))
    first.start()
    deadline = time.monotonic() + 30
    while not gate._sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    results: dict[int, pd.DataFrame] = {}

    def row(thread: int) -> str:
        return " ".join([str(thread + 4)] * 5)  # one length: the batch is not split to limit padding

    def call(thread: int) -> None:
        results[thread] = batcher.predict([row(thread)])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(15)]
    for t in threads:
        t.start()
    while sum(len(j.examples) for j in batcher._pending) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate._gate.set()
    for t in [first, *threads]:
        t.join(timeout=60)
    assert gate._sizes == [1, 15]
    for i in range(15):
        pd.testing.assert_frame_equal(results[i], model.predict([row(i)]))


def test_a_call_waiting_for_a_shared_round_stops_at_its_deadline(scripted_net):
    gate = Gate()
    gate._sizes, gate._gate = [], threading.Event()
    model = fm.FullModel(preprocess=[ParseIds()], module=scripted_net, forward=gate,
                         postprocess=[TopK(labels=LABELS)], batch_size=64)
    batcher = MicroBatcher(model, max_batch_size=64, max_wait_ms=0, timeout_s=600)
    first = threading.Thread(target=batcher.predict, args=(["1 2 3"],))
    first.start()
    started = time.monotonic() + 30
    while not gate._sizes and time.monotonic() < started:
        time.sleep(0.01)
    outcome: list[BaseException | pd.DataFrame] = []

    def late() -> None:
        try:
            outcome.append(batcher.predict_records(["4 5 6"], deadline=time.monotonic() + 0.2))
        except BaseException as error:
            outcome.append(error)

    second = threading.Thread(target=late)
    second.start()
    second.join(timeout=60)  # the round it waits for never ends while the gate is shut
    gate._gate.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], fm.DeadlineError), outcome
    assert "waiting for a shared forward round" in str(outcome[0])
    assert gate._sizes == [1]  # its row never ran


def test_requests_with_different_forward_params_never_share_a_batch(ids_model):
    batcher = MicroBatcher(ids_model, max_batch_size=64, max_wait_ms=50)
    rows = ["10 20 30"]
    answers: dict[float, pd.DataFrame] = {}
    barrier = threading.Barrier(4)

    def call(thread: int) -> None:
        scale = [0.1, 1.0, 10.0, 100.0][thread]
        barrier.wait(timeout=30)
        answers[scale] = batcher.predict(rows, params={"scale": scale, "k": 2})

    run_threads(call, 4)
    for scale, frame in answers.items():
        pd.testing.assert_frame_equal(frame, ids_model.predict(rows, params={"scale": scale, "k": 2}))
    assert len({tuple(f["top_probabilities"][0]) for f in answers.values()}) == 4


def test_a_lone_request_is_answered_without_waiting_for_company(ids_model):
    # Waiting for company would hold it 600 s: the module's timeout would fail the test first.
    batcher = MicroBatcher(ids_model, max_wait_ms=600_000, timeout_s=60)
    pd.testing.assert_frame_equal(batcher.predict(["1 2 3"]), ids_model.predict(["1 2 3"]))


def test_invalid_settings_are_refused_naming_them(ids_model):
    with pytest.raises(fm.ConfigError, match="max_batch_size must be a positive int"):
        MicroBatcher(ids_model, max_batch_size=0)
