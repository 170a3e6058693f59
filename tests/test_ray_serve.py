"""mlflow_fullmodel.ray_serve on a local Ray cluster on loopback: its answers equal ``predict`` and
``mlflow-fullmodel serve``'s, its errors are the same 4xx JSON, concurrent single-row requests share
forward rounds, a replica killed under load is replaced, and the serving_ray example runs from its
README. One Ray cluster for the module, stopped at its end with every process it started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
from servers import free_port, leftover_processes, serve_fullmodel, server_log, start, stop
from support import EXAMPLES, TEXT_EXAMPLE

import mlflow_fullmodel as fm
from mlflow_fullmodel.parity import compare_outputs

pytest.importorskip("ray.serve", reason="needs Ray Serve, the optional [ray] extra: pip install 'mlflow-fullmodel[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from mlflow_fullmodel.ray_serve import deployment  # noqa: E402

pytestmark = pytest.mark.slow

CHAMPION = f"models:/{TEXT_EXAMPLE}@champion"
TEXTS = ["What a wonderful, brilliant film!", "Dull, boring and far too long.", "It was a film.",
         "The acting was superb but the plot was a mess.", "ok", "A masterpiece of tedium " * 5]


def wait_until_gone(before: set[int], what: str, seconds: float = 60) -> None:
    """Wait for every descendant of this process not in ``before`` to end; fail naming those left."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in leftover_processes() if p[0] not in before]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{what} left processes running: {left}"


@pytest.fixture(scope="module")
def ray_url(tracking: str) -> Iterator[str]:
    """A local Ray cluster (no dashboard) with Serve's HTTP proxy on loopback; its URL. Stopped at
    the module's end, waiting until every process Ray started has ended."""
    before = {pid for pid, _ in leftover_processes()}
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay under 108 characters
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the replicas inherit it
    # On a busy machine Serve's HTTP proxy can take longer to start than Serve's 5 s ready check,
    # and Serve then kills it (serve.start fails with ActorDiedError); Serve's processes read these.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    port = free_port()
    # Logical CPUs: room for a replacement replica while the one it replaces is being reaped.
    ray.init(address="local", include_dashboard=False, num_cpus=4, _temp_dir=temp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            wait_until_gone(before, "Ray")
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def text_app(ray_url: str, text_example: dict) -> Iterator[tuple[str, object]]:
    """The text example's champion, two replicas, batching on; its URL and handle."""
    handle = serve.run(deployment(CHAMPION, num_replicas=2, batching=True), name="text", route_prefix="/text")
    yield f"{ray_url}/text", handle
    serve.delete("text")


@pytest.fixture(scope="module")
def fullmodel_server(tracking: str, text_example: dict) -> Iterator[str]:
    process, url = serve_fullmodel(CHAMPION, tracking)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def expected() -> dict[int, pd.DataFrame]:
    """``predict`` of the champion, loaded here, per k."""
    model = fm.load_model(CHAMPION)
    return {k: model.predict(TEXTS, params={"k": k}) for k in (1, 2)}


def predictions(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text
    return pd.DataFrame(response.json()["predictions"])


def replicas(handle, count: int = 2, seconds: float = 180) -> dict[int, list[int]]:
    """Each running replica's pid and forward round sizes, asked until ``count`` replicas answered
    (the handle routes each call to one replica)."""
    found: dict[int, list[int]] = {}
    deadline = time.monotonic() + seconds
    while len(found) < count and time.monotonic() < deadline:
        try:
            state = handle.round_sizes.remote().result(timeout_s=60)
        except Exception:  # a replica that died a moment ago, until Ray's router knows it
            time.sleep(0.5)
            continue
        found[state["pid"]] = state["sizes"]
    return found


@pytest.mark.parametrize("payload", [
    {"dataframe_records": [{"text": t} for t in TEXTS]},
    {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}, "params": {"k": 2}},
    {"inputs": TEXTS, "params": {"k": 2}},
    {"instances": [{"text": t} for t in TEXTS]},
], ids=["records", "split", "inputs", "instances"])
def test_answers_equal_predict_and_mlflow_fullmodel_serve_for_each_payload_format(text_app, fullmodel_server,
                                                                                  expected, payload):
    url, _ = text_app
    answer = requests.post(f"{url}/invocations", json=payload, timeout=120)
    assert compare_outputs(expected[payload.get("params", {}).get("k", 1)], predictions(answer)) == []
    same = requests.post(f"{fullmodel_server}/invocations", json=payload, timeout=120)
    assert answer.json() == same.json()


def test_a_csv_request_is_answered_as_predict_does(text_app, expected):
    url, _ = text_app
    body = pd.DataFrame({"text": TEXTS}).to_csv(index=False)
    answer = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "text/csv"}, timeout=120)
    assert compare_outputs(expected[1], predictions(answer)) == []


@pytest.mark.parametrize("body, headers", [
    (b'{"inputs": ["fine"]}', {}),  # no Content-Type
    (b'{"inputs": ["fine"], "params": {"K": 2}}', {"Content-Type": "application/json"}),  # unknown param
    (b'{"inputs": ["fine"], "params": {"k": 0}}', {"Content-Type": "application/json"}),  # out of bounds
    (b'{"inputs": ["my secret review"', {"Content-Type": "application/json"}),  # not JSON
    (b'{"inputs": [null]}', {"Content-Type": "application/json"}),
    (b'[' * 40 + b']' * 40, {"Content-Type": "application/json"}),  # nested past the limit
], ids=["no-content-type", "unknown-param", "k-out-of-bounds", "invalid-json", "null-row", "too-deep"])
def test_a_bad_request_gets_the_same_4xx_json_as_mlflow_fullmodel_serve(text_app, fullmodel_server, body, headers):
    url, _ = text_app
    answer = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=120)
    same = requests.post(f"{fullmodel_server}/invocations", data=body, headers=headers, timeout=120)
    assert 400 <= answer.status_code < 500 and answer.status_code == same.status_code
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()
    assert set(error) == {"error_code", "message"}
    assert (error["error_code"], error["message"]) == (same.json()["error_code"], same.json()["message"])
    assert "Traceback" not in error["message"] and "secret" not in error["message"]


def test_concurrent_single_row_requests_share_forward_rounds_and_get_their_own_answers(ray_url, text_example,
                                                                                       expected):
    """One replica that holds a round open for a second: requests released together must meet in it."""
    handle = serve.run(deployment(CHAMPION, num_replicas=1, batching=True, max_batch_size=4, batch_wait_timeout_s=1.0),
                       name="batched", route_prefix="/batched")
    try:
        texts = TEXTS[:4]
        barrier = threading.Barrier(len(texts))
        answers: dict[int, requests.Response] = {}

        def send(i: int) -> None:
            barrier.wait()
            answers[i] = requests.post(f"{ray_url}/batched/invocations",
                                       json={"inputs": [texts[i]], "params": {"k": 2}}, timeout=120)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i in range(len(texts)):
            assert compare_outputs(expected[2].iloc[[i]].reset_index(drop=True), predictions(answers[i])) == []
        (sizes,) = replicas(handle, count=1).values()
        assert sum(sizes) == len(texts) and max(sizes) > 1, sizes
    finally:
        serve.delete("batched")


def test_batching_is_off_on_the_cpu_by_default_as_under_mlflow_fullmodel_serve(ray_url, text_example, expected):
    handle = serve.run(deployment(CHAMPION, num_replicas=1), name="unbatched",
                       route_prefix="/unbatched")
    try:
        answer = requests.post(f"{ray_url}/unbatched/invocations", json={"inputs": TEXTS[:1]}, timeout=120)
        assert compare_outputs(expected[1].iloc[[0]], predictions(answer)) == []
        assert list(replicas(handle, count=1).values()) == [[]]
    finally:
        serve.delete("unbatched")


def test_bad_arguments_are_refused_naming_them(tracking):
    with pytest.raises(fm.ConfigError, match="num_replicas must be a positive int, got 0"):
        deployment("models:/anything/1", num_replicas=0)
    with pytest.raises(fm.ConfigError, match="batch_wait_timeout_s must be"):
        deployment("models:/anything/1", batch_wait_timeout_s=-1)


def test_a_replica_killed_under_load_is_replaced_and_only_its_requests_in_flight_fail(text_app, expected):
    """Eight clients send single-row requests without pause while one replica's process is killed.

    What is asserted: every answer that arrives is right; a request that fails was sent before the
    kill and failed after it (it was in flight, on the killed replica, when it died: Ray retries
    only requests not yet sent to a replica), with at most one failure per client; the same request
    sent again succeeds; the deployment is back to two replicas, the killed one replaced."""
    url, handle = text_app
    (victim, survivor) = sorted(replicas(handle))
    stop_load = threading.Event()
    killed_at: list[float] = []
    results: list[tuple[int, float, float, int | str]] = []  # text, sent, answered, status or error

    def client(c: int) -> None:
        n = 0
        while not stop_load.is_set():
            i = (c + n) % len(TEXTS)
            n += 1
            sent = time.monotonic()
            try:
                response = requests.post(f"{url}/invocations", json={"inputs": [TEXTS[i]]}, timeout=120)
                outcome: int | str = response.status_code
                if response.status_code == 200 and compare_outputs(
                        expected[1].iloc[[i]].reset_index(drop=True), predictions(response)):
                    outcome = "a wrong answer"
            except requests.RequestException as error:
                outcome = type(error).__name__
            results.append((i, sent, time.monotonic(), outcome))

    clients = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(3)  # under load
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = replicas(handle)
            if len(now) == 2 and victim not in now:
                break
        time.sleep(2)  # and some load on the new pair
    finally:
        stop_load.set()
        for thread in clients:
            thread.join()
    now = replicas(handle)
    assert survivor in now and victim not in now and len(now) == 2
    failed = [r for r in results if r[3] != 200]
    assert len(results) > len(failed) and len(failed) <= len(clients)
    for i, sent, answered, outcome in failed:
        assert sent < killed_at[0] < answered, (outcome, sent, killed_at, answered)
        assert outcome in (500, 502, 503, "ConnectionError"), outcome
        again = requests.post(f"{url}/invocations", json={"inputs": [TEXTS[i]]}, timeout=120)
        assert compare_outputs(expected[1].iloc[[i]].reset_index(drop=True), predictions(again)) == []
    assert any(sent > killed_at[0] and outcome == 200 for _, sent, _, outcome in results)


def test_the_serving_ray_example_runs_from_its_readme(tmp_path):
    """The README's commands as written, in a copy of the example projects: train the text example,
    serve it on two replicas with Ray, score, stop; nothing of Ray left running."""
    readme = (EXAMPLES / "serving_ray" / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Run it\n.*?```bash\n(.*?)```", readme, flags=re.DOTALL)[1]
    for project in ("serving_ray", "text_classifier"):
        shutil.copytree(EXAMPLES / project, tmp_path / "example_projects" / project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # what activating does
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    before = {pid for pid, _ in leftover_processes()}
    process = start(["bash", "-e", "-c", block], env, cwd=tmp_path)
    try:
        process.wait(timeout=900)
    except subprocess.TimeoutExpired:
        stop(process)
        raise
    output = server_log(process, chars=None)
    stop(process)
    assert process.returncode == 0, output[-4000:]
    answers = [json.loads(line) for line in output.splitlines() if line.startswith('{"text"')]
    assert len(answers) == 4 and all(a["label"] in ("negative", "neutral", "positive") for a in answers), output[-3000:]
    assert "Replicas: 2" in output
    wait_until_gone(before, "The example")
