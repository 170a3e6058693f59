"""The Open Inference Protocol (KServe V2) beside `/invocations` in `mlflow-fullmodel serve`.

In-process, on ``operations.Operations`` with a real saved model: the metadata, an infer request in
JSON and in Triton's binary form (built and read by tritonclient's own code), bad requests answered
with the message `/invocations` gives, and each request counted under its route template. Then on
real servers of the example models, through ``tritonclient.http.InferenceServerClient``: the
answers equal `/invocations`' for the text, image and translator examples. And the KServe
manifest of the docs, read against the serve command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
import yaml
from asgi import Answer, call, loaded, samples, value
from click.testing import CliRunner
from images import b64, png
from servers import serve_fullmodel, stop
from support import EXAMPLE_TEXTS, IMAGE_EXAMPLE, TEXT_EXAMPLE, TRANSLATOR_EXAMPLE

import mlflow_fullmodel as fm
from mlflow_fullmodel import oip
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.metrics import ServerMetrics
from mlflow_fullmodel.operations import Operations
from mlflow_fullmodel.rollout import ModelSlot, ServedVersion

MAX_BODY = 20_000
NAME = "reviews"
INFER = f"/v2/models/{NAME}/infer"
ROOT = Path(__file__).resolve().parents[1]


# -- in-process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def version(text_model, tmp_path_factory) -> ServedVersion:
    path = str(tmp_path_factory.mktemp("oip") / "reviews")
    fm.save_model(text_model, path, input_example=EXAMPLE_TEXTS)
    return loaded(path, (NAME, "3", "sha256:test", "torchscript"), MAX_BODY)


@pytest.fixture
def operations(version) -> Operations:
    slot = ModelSlot()
    slot.swap(version)
    return Operations(slot, ServerMetrics(), name=NAME)


def texts_request(texts: list[Any], **parameters: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                                           "data": texts}]}
    if parameters:
        request["parameters"] = parameters
    return request


def invocations(app: Operations, texts: list[Any], **params: Any) -> Answer:
    body: dict[str, Any] = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}
    if params:
        body["params"] = params
    return call(app, "/invocations", json.dumps(body))


def as_columns(predictions: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {column: [row[column] for row in predictions] for column in predictions[0]}


def test_the_metadata_gives_each_column_its_oip_datatype_and_shape_and_the_params_their_defaults(operations):
    answer = call(operations, f"/v2/models/{NAME}", method="GET")
    assert answer.status == 200
    assert answer.json() == {
        "name": NAME, "versions": ["3"], "platform": "mlflow-fullmodel",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probability", "datatype": "FP64", "shape": [-1]},
                    {"name": "top_labels", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "top_probabilities", "datatype": "FP64", "shape": [-1, -1]}],
        "parameters": {"k": 1, "on_error": "raise"},
    }


def test_an_infer_request_is_answered_as_invocations_answers_its_rows_one_tensor_a_column(operations):
    answer = call(operations, INFER, json.dumps({"id": "q-1", **texts_request(EXAMPLE_TEXTS, k=2)}))
    assert answer.status == 200, answer.body
    expected = as_columns(invocations(operations, EXAMPLE_TEXTS, k=2).json()["predictions"])
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (NAME, "3", "q-1")
    rows = len(EXAMPLE_TEXTS)
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("label", "BYTES", [rows]), ("probability", "FP64", [rows]), ("top_labels", "BYTES", [rows, 2]),
        ("top_probabilities", "FP64", [rows, 2])]
    for output in body["outputs"]:
        data = np.array(output["data"], dtype=object).reshape(output["shape"]).tolist()
        assert data == expected[output["name"]], output["name"]


def test_tritonclients_binary_request_is_answered_in_binary_with_the_same_values(operations):
    """The body tritonclient sends by default (its inputs and outputs in binary), built and read
    by its own code."""
    text = triton.InferInput("text", [len(EXAMPLE_TEXTS), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in EXAMPLE_TEXTS], dtype=object))
    body, header_length = triton.InferenceServerClient.generate_request_body([text], parameters={"k": 2})
    answer = call(operations, INFER, body, headers={"Inference-Header-Content-Length": str(header_length)})
    assert answer.status == 200, answer.body
    result = triton.InferenceServerClient.parse_response_body(
        answer.body, header_length=int(answer.headers["inference-header-content-length"]))
    expected = as_columns(invocations(operations, EXAMPLE_TEXTS, k=2).json()["predictions"])
    assert [t.decode() for t in result.as_numpy("label")] == expected["label"]
    assert result.as_numpy("top_labels").shape == (3, 2)
    assert [[t.decode() for t in row] for row in result.as_numpy("top_labels")] == expected["top_labels"]
    assert result.as_numpy("top_probabilities").tolist() == expected["top_probabilities"]
    assert result.as_numpy("probability").dtype == np.float64


def test_only_the_requested_outputs_come_back_in_the_order_asked(operations):
    request = {**texts_request(EXAMPLE_TEXTS), "outputs": [{"name": "probability"}, {"name": "label"}]}
    answer = call(operations, INFER, json.dumps(request))
    assert [o["name"] for o in answer.json()["outputs"]] == ["probability", "label"]
    request["outputs"] = [{"name": "logits"}]
    answer = call(operations, INFER, json.dumps(request))
    assert answer.status == 400
    assert answer.json()["error"] == ("The model has no output ['logits']; its outputs are ['label', 'probability', "
                                      "'top_labels', 'top_probabilities'].")


#: Bad requests /invocations refuses, as an OIP request: the same message is expected.
SAME_AS_INVOCATIONS = {
    "a misspelled param": (["fine"], {"K": 2}),
    "a param out of bounds": (["fine"], {"k": 99}),
    "a param of the wrong type": (["fine"], {"k": "two"}),
    "a null text": (["fine", None], {}),
    "an empty text": (["fine", ""], {}),
    "a number for a text": (["fine", 42], {}),
}


@pytest.mark.parametrize("kind", SAME_AS_INVOCATIONS)
def test_a_bad_request_is_an_oip_error_with_the_message_invocations_gives(operations, kind):
    texts, params = SAME_AS_INVOCATIONS[kind]
    expected = invocations(operations, texts, **params)
    answer = call(operations, INFER, json.dumps(texts_request(texts, **params)))
    assert expected.status >= 400 and answer.status == expected.status
    assert set(answer.json()) == {"error", "request_id"}
    assert answer.json()["error"] == expected.json()["message"]


#: OIP requests wrong as OIP requests: (body, headers, status, the message).
MALFORMED = {
    "not JSON": ("{inputs", {}, 400, "The body is not valid JSON"),
    "a list": ("[]", {}, 400, 'An inference request is a JSON object with "inputs", got list.'),
    "no inputs": ("{}", {}, 400, "The request has no \"inputs\": send one tensor per input column of the model, "
                                 "['text']."),
    "nested too deep": ('{"inputs": ' + "[" * 40 + "]" * 40 + "}", {}, 400, "nested 41 levels deep"),
    "a key twice": ('{"inputs": [], "inputs": []}', {}, 400, "a key twice"),
    "an unknown datatype": (json.dumps({"inputs": [{"name": "text", "datatype": "STRING", "shape": [1],
                                                    "data": ["a"]}]}), {}, 400, "The datatype of text is not one"),
    "a shape the data does not fill": (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
                                                               "data": ["a"]}]}), {}, 400,
                                       "Text holds 1 values, its shape [3] says 3."),
    "a 2-D text tensor": (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2],
                                                  "data": ["a", "b"]}]}), {}, 400,
                          "The shape of text is [1, 2]: each row of a column holds one value"),
    "an input twice": (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}] * 2}),
                       {}, 400, "Input 'text' is given twice"),
    "Triton's sequence parameters": (json.dumps(texts_request(["a"], sequence_id=4)), {}, 400,
                                     "does not implement Triton's request parameters ['sequence_id']"),
    "a header length past the body": (json.dumps(texts_request(["a"])), {"Inference-Header-Content-Length": "999"},
                                      400, "The Inference-Header-Content-Length header is not a number of bytes"),
    "binary data that is not BYTES elements": (
        json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 3}}]}) + "abc", {"binary": "yes"}, 400,
        "The binary data of text is not a list of BYTES elements"),
    "binary text that is not UTF-8": (
        json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 6}}]}) + "\x02\x00\x00\x00\xff\xfe",
        {"binary": "yes"}, 400, "An element of text is not UTF-8 text."),
    "a compressed body": (json.dumps(texts_request(["a"])), {"Content-Encoding": "gzip"}, 415, "gzip-encoded"),
    "a body over the limit": (json.dumps(texts_request(["long " * 5_000])), {}, 413,
                              f"The request body is over {MAX_BODY} bytes"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_oip_request_is_a_4xx_oip_error_naming_the_problem(operations, kind):
    text, headers, status, message = MALFORMED[kind]
    body = text.encode("latin-1")
    if headers.get("binary"):  # the JSON header, then its binary data
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    answer = call(operations, INFER, body, headers=headers)
    assert answer.status == status, answer.body
    assert message in answer.json()["error"]


def test_each_request_is_counted_under_its_route_template_and_refusals_by_reason(operations):
    assert call(operations, INFER, json.dumps(texts_request(EXAMPLE_TEXTS))).status == 200
    assert call(operations, INFER, json.dumps(texts_request(["fine"], k=99))).status == 400
    assert call(operations, INFER, json.dumps(texts_request(["long " * 5_000]))).status == 413
    assert call(operations, f"/v2/models/{NAME}", method="GET").status == 200
    assert call(operations, "/v2/models/secret-name/infer", json.dumps(texts_request(["a"]))).status == 404
    scraped = samples(call(operations, "/metrics", method="GET").body.decode())
    counted = {labels: n for (metric, labels), n in scraped.items() if metric == "mlflow_fullmodel_requests_total"}
    assert counted == {
        frozenset({("route", "/v2/models/{name}/infer"), ("code", "200")}): 1,
        frozenset({("route", "/v2/models/{name}/infer"), ("code", "400")}): 1,
        frozenset({("route", "/v2/models/{name}/infer"), ("code", "413")}): 1,
        frozenset({("route", "/v2/models/{name}"), ("code", "200")}): 1,
        frozenset({("route", "other"), ("code", "404")}): 1,
    }
    assert value(scraped, "mlflow_fullmodel_refusals_total", reason="bad_input") == 2  # k=99, and the 404
    assert value(scraped, "mlflow_fullmodel_refusals_total", reason="limit") == 1
    assert value(scraped, "mlflow_fullmodel_request_rows_count") == 2  # the 200, and k=99's rows


def test_health_and_readiness_follow_the_slot_and_an_unknown_name_is_a_404(version):
    slot = ModelSlot()
    app = Operations(slot, ServerMetrics(), name=NAME)
    assert call(app, "/v2/health/live", method="GET").json() == {"live": True}
    for path in ("/v2/health/ready", f"/v2/models/{NAME}/ready", f"/v2/models/{NAME}", INFER):
        answer = call(app, path, json.dumps(texts_request(["a"])))
        assert answer.status == 503 and answer.json()["error"].startswith("Not ready: the model is being verified")
    slot.swap(version)
    assert call(app, "/v2/health/ready", method="GET").json() == {"ready": True}
    assert call(app, f"/v2/models/{NAME}/ready", method="GET").json() == {"name": NAME, "ready": True}
    assert call(app, "/v2", method="GET").json()["extensions"] == ["binary_tensor_data"]
    for path in ("/v2/models/other/ready", "/v2/models/other", "/v2/models/other/infer", "/v2/repository/index"):
        answer = call(app, path, method="GET")
        assert answer.status == 404 and f"this server serves '{NAME}'" in answer.json()["error"]
    assert call(app, INFER, method="GET").status == 405
    scraped = samples(call(app, "/metrics", method="GET").body.decode())
    assert value(scraped, "mlflow_fullmodel_refusals_total", reason="not_ready") == 1  # the infer request only


def test_route_names_are_templates_and_never_the_path_or_another_name():
    assert oip.route_name("/v2/models/reviews/infer", "reviews") == "/v2/models/{name}/infer"
    assert oip.route_name("/v2/models/reviews", "reviews") == "/v2/models/{name}"
    assert oip.route_name("/v2/models/other/infer", "reviews") == "other"
    assert oip.route_name("/v2/models/reviews/infer/x", "reviews") == "other"


def test_serve_refuses_a_name_that_cannot_be_a_path_segment():
    result = CliRunner().invoke(main, ["serve", "models:/reviews/1", "--name", "two words"])
    assert result.exit_code == 2 and "Invalid value for '--name'" in result.output


# -- end to end: `mlflow-fullmodel serve` and tritonclient ------------------------------------------

#: The examples served, each with its input column, good values and a param to send.
EXAMPLES = {
    "text": (TEXT_EXAMPLE, "text", ["A wonderful, moving film.", "Dull and far too long."], {"k": 2}),
    "image": (IMAGE_EXAMPLE, "image", [png(40, 40, color=c) for c in (30, 200)], {"k": 2, "seed": 5}),
    "translator": (TRANSLATOR_EXAMPLE, "source", ["42", "1,234", "8000"], {"n_best": 3}),
}


@pytest.fixture(scope="module")
def servers(request, tracking) -> Iterator[Callable[[str], str]]:
    """One `mlflow-fullmodel serve` per example, started when a test first asks for it."""
    started: dict[str, Any] = {}

    def url(example: str) -> str:
        if example not in started:
            request.getfixturevalue({"text": "text_example", "image": "image_example",
                                     "translator": "translator_example"}[example])
            started[example] = serve_fullmodel(f"models:/{EXAMPLES[example][0]}@champion", tracking)
        return started[example][1]

    yield url
    for process, _ in started.values():
        stop(process)


def invocations_columns(url: str, column: str, values: list[Any], params: dict[str, Any]) -> dict[str, list[Any]]:
    sent = [b64(v) if isinstance(v, bytes) else v for v in values]
    answer = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": [column], "data": [[v] for v in sent]},
                                                         "params": params}, timeout=120)
    assert answer.status_code == 200, answer.text
    return as_columns(answer.json()["predictions"])


def plain(array: np.ndarray) -> list[Any]:
    return [plain(a) for a in array] if isinstance(array, np.ndarray) else \
        array.decode() if isinstance(array, bytes) else array.item() if isinstance(array, np.generic) else array


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("example", EXAMPLES)
def test_tritonclient_gets_the_answers_of_invocations(servers, example, binary):
    name, column, values, params = EXAMPLES[example]
    url = servers(example)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [(column, "BYTES")]
        assert set(params) <= set(metadata["parameters"])
        tensor = triton.InferInput(column, [len(values)], "BYTES")
        # Binary data carries an image's bytes as they are; JSON carries text, so base64 for an image.
        data = values if binary or example != "image" else [b64(v) for v in values]
        tensor.set_data_from_numpy(np.array([v.encode() if isinstance(v, str) else v for v in data], dtype=object),
                                   binary_data=binary)
        outputs = None if binary else [triton.InferRequestedOutput(o["name"], binary_data=False)
                                       for o in metadata["outputs"]]
        result = client.infer(name, [tensor], outputs=outputs, parameters=params)
    finally:
        client.close()
    expected = invocations_columns(url, column, values, params)
    answered = {o["name"]: plain(result.as_numpy(o["name"])) for o in result.get_response()["outputs"]}
    assert answered == expected
    assert [o["name"] for o in metadata["outputs"]] == list(expected)


@pytest.mark.slow
def test_tritonclient_gets_the_invocations_error_message_for_a_bad_request(servers):
    name, column, values, _ = EXAMPLES["image"]
    url = servers("image")
    not_an_image = [values[0], b"this is not an image"]
    expected = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": [column], "data": [
        [b64(v)] for v in not_an_image]}}, timeout=120)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        tensor = triton.InferInput(column, [2], "BYTES")
        tensor.set_data_from_numpy(np.array(not_an_image, dtype=object))
        with pytest.raises(triton.InferenceServerException) as raised:
            client.infer(name, [tensor])
        with pytest.raises(triton.InferenceServerException) as unknown:
            client.infer("no-such-model", [tensor])
    finally:
        client.close()
    assert expected.status_code == 400 and raised.value.status() == "400"
    assert raised.value.message() == expected.json()["message"]
    assert "Row 1: preprocess[0] DecodeImage" in raised.value.message()
    assert unknown.value.status() == "404"


# -- the KServe manifest ---------------------------------------------------------------------------


def test_the_kserve_manifest_runs_the_serve_command_with_oip_probes_on_its_port():
    """Not validated against KServe's CRD (no schema of it installs from PyPI without KServe's
    server): read against what the server and the Dockerfile beside it do."""
    manifest = yaml.safe_load((ROOT / "docs" / "kserve" / "inferenceservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = manifest["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow-fullmodel", "serve"]
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    name = command[command.index("--name") + 1]
    assert oip.valid_name(name)
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    grace = int(command[command.index("--grace-period") + 1]) if "--grace-period" in command else 30
    assert predictor["terminationGracePeriodSeconds"] > grace
    dockerfile = (ROOT / "docs" / "kserve" / "Dockerfile").read_text()
    entrypoint = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))[10:])
    assert command[:len(entrypoint)] == entrypoint


@pytest.mark.parametrize("uri, name", [("/models/medium+int8/", "medium-int8"), ("runs:/0a1b/model", "model"),
                                       ("/models/..v2.1", "v2.1"), ("/tmp/+++", "model")])
def test_a_model_outside_the_registry_is_named_after_its_last_part_made_fit_for_the_protocol_paths(uri, name):
    from mlflow_fullmodel.cli import _name_of_uri
    from mlflow_fullmodel.oip import valid_name

    assert _name_of_uri(uri) == name and valid_name(name)
