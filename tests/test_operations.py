"""`mlflow-fullmodel serve` for the people who run it: Prometheus metrics that count exactly what
was served, readiness that means warmed up, request ids and an access log without request data,
a drain on SIGTERM, and a rollout that follows an alias without a failed request.

The counting is checked in-process on ``operations.Operations`` with a real saved model (each
kind of request is cheap to make there, deterministically); the process-level behaviour on real
servers over HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
import torch
from asgi import call, loaded, samples, value
from sample_steps import LABELS, BagOfIds, Normalize, Pause
from servers import free_port, serve_fullmodel, server_log, start, stop
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel import telemetry
from mlflow_fullmodel._mlflow import load_served_model
from mlflow_fullmodel.metrics import ServerMetrics
from mlflow_fullmodel.operations import ACCESS_LOGGER, Operations
from mlflow_fullmodel.rollout import ModelSlot, ServedVersion, warm_up, warm_up_app
from mlflow_fullmodel.serving import ServingError, serve
from mlflow_fullmodel.settings import ServingSettings
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

MAX_BODY = 20_000
SECRET = "SECRET-TOKEN-4711"


# -- in-process: a served version and a scrape (asgi.call) --------------------------------------------


def records(*texts: Any) -> str:
    return json.dumps({"dataframe_records": [{"text": t} for t in texts]})


@pytest.fixture(scope="module")
def saved_reviews(text_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("operations") / "reviews")
    fm.save_model(text_model, path, input_example=EXAMPLE_TEXTS)
    return path


INFO = ("reviews", "7", "sha256:test", "torchscript")


@pytest.fixture(scope="module")
def version(saved_reviews) -> ServedVersion:
    return loaded(saved_reviews, INFO, MAX_BODY)


@pytest.fixture
def operations(version) -> Operations:
    slot = ModelSlot()
    slot.swap(version)
    return Operations(slot, ServerMetrics())


def scrape(app: Operations) -> dict[tuple[str, frozenset], float]:
    answer = call(app, "/metrics", method="GET")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    return samples(answer.body.decode())


# -- metrics ---------------------------------------------------------------------------------------


N = 3
KINDS = {
    # kind: (body, status, refusal)
    "good": (records(*EXAMPLE_TEXTS), 200, None),
    "bad input": (records(42), 400, "bad_input"),
    "body over the limit": (records("good " * 5_000), 413, "limit"),
    "nested too deep": ("[" * 40 + "]" * 40, 400, "limit"),
    "unknown param": (json.dumps({"inputs": ["good"], "params": {"temperature": 1}}), 400, "bad_input"),
}


def test_after_n_requests_of_each_kind_each_counter_grew_by_exactly_n(operations):
    before = scrape(operations)
    for body, status, _ in KINDS.values():
        for _ in range(N):
            assert call(operations, "/invocations", body).status == status
    after = scrape(operations)

    def grew(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    statuses = pd.Series([status for _, status, _ in KINDS.values()]).value_counts()
    for status, kinds in statuses.items():
        assert grew("mlflow_fullmodel_requests_total", route="/invocations", code=str(status)) == N * kinds
    refusals = pd.Series([r for _, _, r in KINDS.values() if r]).value_counts()
    for reason, kinds in refusals.items():
        assert grew("mlflow_fullmodel_refusals_total", reason=reason) == N * kinds
    assert grew("mlflow_fullmodel_request_duration_seconds_count", route="/invocations") == N * len(KINDS)
    # Only the good requests reach the model; the bad input is refused by the type check, on its one row.
    for stage in telemetry.STAGES:
        assert grew("mlflow_fullmodel_stage_duration_seconds_count", stage=stage) == N, stage
    assert grew("mlflow_fullmodel_request_rows_count") == 2 * N
    assert grew("mlflow_fullmodel_request_rows_sum") == N * (len(EXAMPLE_TEXTS) + 1)
    # Three rows in batches of at most two (batch_size=2): two forward batches a request.
    assert grew("mlflow_fullmodel_forward_batch_size_count") == 2 * N
    assert grew("mlflow_fullmodel_forward_batch_size_sum") == N * len(EXAMPLE_TEXTS)
    assert value(after, "mlflow_fullmodel_requests_in_flight") == 1  # the scrape itself


def test_a_refused_request_names_its_reason_where_the_model_refused_it(text_model, pausing_model):
    """Admission (503), deadline (504) and limits are refused inside the model's predict: the
    request's record gets the reason, which the metrics and the access log count."""
    busy = serve(text_model, ServingSettings(heavy_samples=1, max_heavy_requests=1), ["label"])
    late = serve(pausing_model, ServingSettings(deadline_s=0.01), ["label"])
    few = serve(text_model, ServingSettings(max_rows=2), ["label"])
    typed = serve(text_model, ServingSettings(), ["label"], input_types={"text": "string"})
    frame = pd.DataFrame({"text": EXAMPLE_TEXTS})
    cases = [(busy, frame, "admission", 503), (late, pd.DataFrame({"text": [f"{Pause.MARK} good"] * 3}), "deadline", 504),
             (few, frame, "limit", 400), (typed, pd.DataFrame({"text": [1, 2, 3]}), "bad_input", 400)]
    for served, data, reason, status in cases:
        record = telemetry.RequestRecord("id", "/invocations")
        with telemetry.recording(record), pytest.raises(ServingError) as raised:
            if served is busy:
                with busy.admission.admit(samples=10):  # the one heavy slot is taken
                    served.predict(data)
            else:
                served.predict(data)
        assert raised.value.get_http_status_code() == status
        assert record.refusal == reason and record.rows == 3


def test_stages_and_batches_are_recorded_only_for_the_request_that_ran_them(text_model):
    frame = pd.DataFrame({"text": EXAMPLE_TEXTS})
    served = serve(text_model, ServingSettings(), ["label"])
    record = telemetry.RequestRecord("id", "/invocations")
    with telemetry.recording(record):
        served.predict(frame)
    assert set(record.stages) == set(telemetry.STAGES) and all(t >= 0 for t in record.stages.values())
    assert record.forward_batches == [2, 1] and record.refusal is None
    served.predict(frame)  # outside any request: nothing recorded anywhere
    assert record.forward_batches == [2, 1]


# -- request ids and the access log ----------------------------------------------------------------


def test_a_request_id_is_taken_from_the_request_or_made_and_returned_on_every_answer(operations):
    given = call(operations, "/invocations", records("good"), headers={"X-Request-ID": "trace-42.a:b"})
    assert given.status == 200 and given.headers["x-request-id"] == "trace-42.a:b"
    assert given.headers["x-model-version"] == "7"
    made = [call(operations, "/invocations", records("good")).headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(len(m) == 32 and int(m, 16) >= 0 for m in made)
    # An id that could break a log line or a header is replaced, not echoed.
    for hostile in ("a b", "x" * 129, 'a"}\n{"status": 200', ""):
        answer = call(operations, "/invocations", records("good"), headers={"X-Request-ID": hostile})
        assert answer.headers["x-request-id"] != hostile and len(answer.headers["x-request-id"]) == 32


def test_an_error_body_carries_the_request_id_of_its_access_log_line(operations, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    answer = call(operations, "/invocations", records(42), headers={"X-Request-ID": "report-me"})
    assert answer.status == 400
    assert answer.json()["request_id"] == "report-me" and "expected a string" in answer.json()["message"]
    assert int(answer.headers["content-length"]) == len(answer.body)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [line["request_id"] for line in lines] == ["report-me"]


def test_the_access_log_has_one_json_line_a_request_and_no_request_data(operations, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    bodies = {
        "good": (records(SECRET, "good"), 200, None, 2),
        "bad": (records(SECRET, 42), 400, "bad_input", 2),
        "unknown param": (json.dumps({"inputs": [SECRET], "params": {SECRET: 1}}), 400, "bad_input", None),
        "invalid JSON": ('{"' + SECRET, 400, "bad_input", None),
    }
    for body, *_ in bodies.values():
        call(operations, "/invocations", body)
    call(operations, f"/{SECRET}", method="GET")  # an unknown path is data too
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == len(bodies) + 1
    assert not [line for line in lines if SECRET in line]
    logged = [json.loads(line) for line in lines]
    for line, (_, status, refusal, rows) in zip(logged, bodies.values()):
        assert (line["status"], line["refusal"], line["rows"]) == (status, refusal, rows)
        assert line["route"] == "/invocations" and line["model_version"] == "7" and line["latency_s"] > 0
        assert set(line) == {"request_id", "method", "route", "status", "rows", "latency_s", "model_version",
                             "refusal"}
    assert logged[-1]["route"] == "other" and logged[-1]["status"] == 404


# -- readiness -------------------------------------------------------------------------------------


def test_not_ready_until_a_warmed_version_is_in_the_slot(version):
    slot = ModelSlot()
    app = Operations(slot, ServerMetrics())
    assert call(app, "/ping", method="GET").status == 200  # alive, as MLflow's /ping means
    ready = call(app, "/ready", method="GET")
    assert ready.status == 503 and "warmed up" in ready.json()["message"]
    refused = call(app, "/invocations", records("good"))
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert value(scrape(app), "mlflow_fullmodel_refusals_total", reason="not_ready") == 1
    slot.swap(version)
    ready = call(app, "/ready", method="GET")
    assert ready.status == 200
    assert ready.json() == {"ready": True, "name": "reviews", "version": "7", "digest": "sha256:test",
                            "format": "torchscript"}
    assert call(app, "/invocations", records("good")).status == 200
    slot.failure = "the model failed to load: ParityError: ..."
    slot.current = None
    assert "failed to load" in call(app, "/ready", method="GET").json()["message"]


def test_the_warm_up_runs_the_golden_example_at_one_row_and_a_full_batch(saved_reviews):
    model = load_served_model(saved_reviews)
    record = telemetry.RequestRecord("warm-up", "none")
    with telemetry.recording(record):
        assert warm_up(model, os.path.join(saved_reviews, "fullmodel")) == [1, 2]
    # TorchScript optimises a graph on its second run: each shape runs three times.
    assert record.forward_batches == [1, 1, 1, 2, 2, 2]


def test_the_warm_up_sends_the_serving_example_through_the_served_app(saved_reviews, version):
    """MLflow's parsing and the guard's checks run once before ready, not on the first request."""
    assert warm_up_app(version.app, saved_reviews) == 3
    too_small = loaded(saved_reviews, INFO, MAX_BODY).app
    too_small.max_body_bytes = 10  # the example is refused: logged, and no request counted as warm
    assert warm_up_app(too_small, saved_reviews) == 0


# -- real servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operated(tracking, registered_reviews):
    process, url = serve_fullmodel("models:/reviews@champion", tracking)
    yield url, process
    stop(process)


@pytest.mark.slow
def test_a_real_server_counts_its_requests_and_says_what_it_serves(operated, registered_reviews):
    url, process = operated
    before = samples(requests.get(f"{url}/metrics", timeout=30).text)
    for _ in range(N):
        assert requests.post(f"{url}/invocations", data=records(*EXAMPLE_TEXTS),
                             headers={"Content-Type": "application/json", "X-Request-ID": "counted"},
                             timeout=60).status_code == 200
    after = samples(requests.get(f"{url}/metrics", timeout=30).text)
    grown = (value(after, "mlflow_fullmodel_requests_total", route="/invocations", code="200")
             - value(before, "mlflow_fullmodel_requests_total", route="/invocations", code="200"))
    assert grown == N
    assert value(after, "mlflow_fullmodel_ready") == 1
    version = str(registered_reviews.registered_model_version)
    ready = requests.get(f"{url}/ready", timeout=30).json()
    assert (ready["name"], ready["version"], ready["format"]) == ("reviews", version, "torchscript")
    assert value(after, "mlflow_fullmodel_model_info", name="reviews", version=version, digest=ready["digest"],
                 format="torchscript") == 1
    # The access log is the server's stdout: one JSON line a request.
    lines = [json.loads(line) for line in server_log(process, chars=None).splitlines()
             if line.startswith("{") and '"counted"' in line]
    assert len(lines) == N and {line["status"] for line in lines} == {200}


@pytest.mark.slow
def test_metrics_can_be_turned_off(tracking, registered_reviews):
    process, url = serve_fullmodel("models:/reviews@champion", tracking, "--no-metrics")
    try:
        answer = requests.get(f"{url}/metrics", timeout=30)
        assert answer.status_code == 404 and "--no-metrics" in answer.json()["message"]
        assert requests.post(f"{url}/invocations", data=records("good"),
                             headers={"Content-Type": "application/json"}, timeout=60).status_code == 200
    finally:
        stop(process)


@pytest.fixture(scope="module")
def pausing_model(spm_path) -> fm.FullModel:
    """A model whose pre-processing pauses on texts that ask for it: requests that stay in flight."""
    torch.manual_seed(0)
    return fm.FullModel(
        preprocess=[Pause(seconds=1.5), Normalize(), SentencePieceEncode(fm.Artifact(spm_path), max_length=32)],
        module=fm.script(BagOfIds(vocab_size=64, classes=len(LABELS))),
        postprocess=[TopK(labels=LABELS, k=1)],
        batch_size=2,
    )


@pytest.fixture(scope="module")
def slow_model(pausing_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("slow") / "model")
    fm.save_model(pausing_model, path, input_example=EXAMPLE_TEXTS)
    return path


@pytest.mark.slow
def test_sigterm_answers_every_request_in_flight_then_exits_0(tracking, slow_model):
    process, url = serve_fullmodel(slow_model, tracking)
    try:
        in_flight = 12
        texts = [f"{Pause.MARK}{EXAMPLE_TEXTS[i % 3]}" for i in range(in_flight)]
        # One row a request, as the requests in flight: a row batched with a padded neighbour may
        # differ from it alone in the last bit of a float.
        expected = [requests.post(f"{url}/invocations", data=records(text), headers={"Content-Type": "application/json"},
                                  timeout=60).json() for text in EXAMPLE_TEXTS]
        with ThreadPoolExecutor(in_flight) as pool:
            futures = [pool.submit(requests.post, f"{url}/invocations", data=records(text),
                                   headers={"Content-Type": "application/json"}, timeout=120) for text in texts]
            # Every request taken (the scrape counts itself too) before the signal.
            deadline = time.monotonic() + 60
            while value(samples(requests.get(f"{url}/metrics", timeout=30).text),
                        "mlflow_fullmodel_requests_in_flight") < in_flight + 1:
                assert time.monotonic() < deadline, server_log(process)
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]
        assert [a.status_code for a in answers] == [200] * in_flight
        for i, answer in enumerate(answers):
            assert answer.json() == expected[i % 3]
        assert process.wait(timeout=60) == 0, server_log(process)
    finally:
        stop(process)


# -- following an alias ----------------------------------------------------------------------------


ROLLOUT = "rollout"


def log_version(model: fm.FullModel) -> mlflow.models.model.ModelInfo:
    with mlflow.start_run():
        return fm.log_model(model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name=ROLLOUT)


def tamper(info: mlflow.models.model.ModelInfo) -> None:
    """Change one byte of a logged model's saved network in the artifact store."""
    root = Path(mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location.removeprefix("file://"))
    network = next(p for p in (root / "fullmodel").rglob("*.pt"))
    data = bytearray(network.read_bytes())
    data[len(data) // 2] ^= 0xFF
    network.write_bytes(bytes(data))


@pytest.mark.slow
def test_following_an_alias_swaps_versions_under_load_without_a_failed_request(tracking, text_model, spm_path):
    torch.manual_seed(1)
    other = fm.FullModel(preprocess=text_model.preprocess, module=fm.script(BagOfIds(vocab_size=64, classes=2)),
                         postprocess=text_model.postprocess, batch_size=2)
    logged = [log_version(text_model), log_version(other), log_version(text_model)]
    tamper(logged[2])
    first, second, tampered = (str(info.registered_model_version) for info in logged)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(ROLLOUT, "live", first)
    frame = pd.DataFrame({"text": EXAMPLE_TEXTS})
    expected = {first: text_model.predict(frame).to_dict("records"), second: other.predict(frame).to_dict("records")}
    assert expected[first] != expected[second]

    process, url = serve_fullmodel(f"models:/{ROLLOUT}@live", tracking, "--follow-alias", "--poll-s", "0.5")
    answers: list[tuple[float, float, int, str, Any]] = []  # sent, answered, status, version, body
    stopping = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stopping.is_set():
                sent = time.monotonic()
                try:
                    r = session.post(f"{url}/invocations", data=records(*EXAMPLE_TEXTS),
                                     headers={"Content-Type": "application/json"}, timeout=60)
                    answers.append((sent, time.monotonic(), r.status_code, r.headers.get("X-Model-Version", ""),
                                    r.json()))
                except requests.RequestException as error:
                    answers.append((sent, time.monotonic(), 0, "", str(error)))

    def wait_until(condition, what: str, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline and process.poll() is None, f"{what}:\n{server_log(process)}"
            time.sleep(0.2)

    def rollouts(result: str) -> float:
        return value(samples(requests.get(f"{url}/metrics", timeout=30).text), "mlflow_fullmodel_rollouts_total",
                     result=result)

    clients = [threading.Thread(target=load) for _ in range(3)]
    try:
        for client_thread in clients:
            client_thread.start()
        wait_until(lambda: len(answers) >= 10, "first answers")
        client.set_registered_model_alias(ROLLOUT, "live", second)
        moved = time.monotonic()
        wait_until(lambda: any(a[3] == second for a in answers), "version 2 answering")
        client.set_registered_model_alias(ROLLOUT, "live", tampered)
        wait_until(lambda: rollouts("refused") == 1, "the tampered version refused")
        after_refusal = len(answers)
        wait_until(lambda: len(answers) >= after_refusal + 10, "answers after the refusal")
    finally:
        stopping.set()
        for client_thread in clients:
            client_thread.join(timeout=120)
        scraped = samples(requests.get(f"{url}/metrics", timeout=30).text) if process.poll() is None else {}
        stop(process)
    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:3]
    for _, _, _, version, body in answers:
        assert version in (first, second) and pd.DataFrame(body["predictions"]).to_dict("records") == expected[version]
    # The swap came after the move; every request sent after version 2 first answered is answered
    # by it (one sent before may still finish with version 1).
    first_answer = min(answered for _, answered, _, v, _ in answers if v == second)
    assert first_answer > moved
    later = {v for sent, _, _, v, _ in answers if sent > first_answer}
    assert later == {second}
    assert value(scraped, "mlflow_fullmodel_rollouts_total", result="swapped") == 1
    assert value(scraped, "mlflow_fullmodel_rollout_failed") == 1
    served = {dict(labels)["version"]: v for (name, labels), v in scraped.items()
              if name == "mlflow_fullmodel_model_info"}
    assert served == {first: 0, second: 1}
    assert f"Version {tampered} of {ROLLOUT} was not rolled out" in server_log(process, chars=None)


@pytest.mark.slow
def test_a_model_that_fails_to_load_in_the_server_stops_it_with_the_reason(tracking, saved_reviews):
    """Loaded in the background, after the server started listening: it still ends the server, with
    exit status 1, not a server alive forever and never ready."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, MLFLOW_FULLMODEL_BATCHING="ture")
    process = start([sys.executable, "-m", "mlflow_fullmodel.cli", "serve", saved_reviews, "--host", "127.0.0.1",
                     "--port", str(port)], env)
    try:
        assert process.wait(timeout=240) == 1
        assert "MLFLOW_FULLMODEL_BATCHING" in server_log(process, chars=None)
    finally:
        stop(process)
