"""The Open Inference Protocol (KServe V2, what Triton and KServe clients speak) beside ``/invocations``.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}`` (metadata from the
signature), ``/v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``. An infer request is
translated into the ``/invocations`` body it means (``dataframe_split`` of its input tensors,
``params`` from its ``parameters``) and answered by the served version's own app, the guard
included: limits, admission, deadlines, refusals and error messages are those of ``/invocations``.
The answer's columns become output tensors; an error answer becomes ``{"error": message}`` with
the same status.

Triton's binary tensor extension is spoken too (tritonclient's default): input tensors whose
``binary_data_size`` says how many bytes after the JSON header hold them, and outputs sent the same
way when asked (``binary_data_output``, or ``binary_data`` on a requested output).
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from typing import Any

import anyio.to_thread
import numpy as np

from mlflow_fullmodel import telemetry
from mlflow_fullmodel.hardened import JsonProblem, Message, Receive, Scope, Send, parse_json

__all__ = ["DATATYPE_OF_TYPE", "ROUTES", "respond", "route_name", "valid_name"]

#: The routes as metrics and the access log name them.
ROUTES = ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
          "/v2/models/{name}/infer")
#: The OIP datatype of each MLflow column type.
DATATYPE_OF_TYPE = {"string": "BYTES", "binary": "BYTES", "datetime": "BYTES", "boolean": "BOOL",
                    "integer": "INT32", "long": "INT64", "float": "FP32", "double": "FP64"}
#: Each OIP datatype's little-endian numpy type, for binary tensor data.
_NUMPY_OF_DATATYPE = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
                      "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
                      "FP32": "<f4", "FP64": "<f8"}
_DATATYPES = sorted([*_NUMPY_OF_DATATYPE, "BYTES"])
#: Request parameters of the protocol's extensions, not the model's: the one this server reads,
#: and those of Triton's that it does not implement (refused, never ignored).
_BINARY_OUTPUT = "binary_data_output"
_UNSUPPORTED = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers")
_HEADER_LENGTH = b"inference-header-content-length"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: A body up to this size is translated on the event loop, a larger one in a worker thread.
_INLINE_BYTES = 16 * 1024


def valid_name(name: str) -> bool:
    """Whether ``name`` can be the model's name in OIP paths (letters, digits, ``._-``)."""
    return bool(_NAME.fullmatch(name))


def route_name(path: str, name: str) -> str:
    """The route template of ``path`` (``/v2/models/{name}/infer``), or "other": never the path,
    nor a model name the server does not serve."""
    if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        return path
    prefix = f"/v2/models/{name}"
    if path == prefix:
        return "/v2/models/{name}"
    if path in (f"{prefix}/ready", f"{prefix}/infer"):
        return "/v2/models/{name}" + path[len(prefix):]
    return "other"


class _Refused(Exception):
    """An OIP request refused before the model: status, message, ``telemetry.REFUSALS`` reason."""

    def __init__(self, status: int, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


async def respond(path: str, scope: Scope, receive: Receive, send: Send, served: Any, name: str,
                  waiting_for: str) -> None:
    """Answer one request under ``/v2``: ``served`` is the version answering now (None while there
    is none: ``waiting_for`` says why), ``name`` the model's name in the paths."""
    route = route_name(path, name)
    if route == "/v2/health/live":
        await _json(send, 200, {"live": True})
    elif route == "/v2":
        from mlflow_fullmodel import __version__

        await _json(send, 200, {"name": "mlflow-fullmodel", "version": __version__,
                                "extensions": ["binary_tensor_data"]})
    elif route == "other":
        await _error(send, 404, f"No such route of the Open Inference Protocol, or no model of that name: this server "
                                f"serves '{name}' (GET /v2/models/{name}, POST /v2/models/{name}/infer).")
    elif served is None:
        if route == "/v2/models/{name}/infer":
            telemetry.refused("not_ready")
        await _error(send, 503, f"Not ready: {waiting_for}; retry in a moment.", [(b"retry-after", b"1")])
    elif route in ("/v2/health/ready", "/v2/models/{name}/ready"):
        await _json(send, 200, {"name": name, "ready": True} if route != "/v2/health/ready" else {"ready": True})
    elif route == "/v2/models/{name}":
        await _json(send, 200, metadata(served, name))
    elif scope.get("method") != "POST":
        await _error(send, 405, f"Send an inference request with POST, not {scope.get('method')}.")
    else:
        await _infer(scope, receive, send, served, name)


def metadata(served: Any, name: str) -> dict[str, Any]:
    """The model's OIP metadata: its inputs and outputs from the signature, with OIP datatypes and
    shapes (-1 for any number of rows; ``[-1, -1]`` for a list column), and its runtime parameters
    with their defaults."""
    signature = served.model.metadata
    inputs, outputs, params = signature.get_input_schema(), signature.get_output_schema(), \
        signature.get_params_schema()
    found: dict[str, Any] = {
        "name": name, "versions": [served.version] if served.version else [], "platform": "mlflow-fullmodel",
        "inputs": [_tensor_metadata(spec.to_dict()) for spec in inputs.inputs] if inputs is not None else [],
        "outputs": [_tensor_metadata(spec.to_dict()) for spec in outputs.inputs] if outputs is not None else [],
    }
    if params is not None:
        found["parameters"] = {spec.name: _plain(spec.default) for spec in params.params}
    return found


def _tensor_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    datatype, dimensions = _datatype_of_spec(spec)
    return {"name": spec.get("name"), "datatype": datatype, "shape": [-1] * dimensions}


def _datatype_of_spec(spec: dict[str, Any]) -> tuple[str, int]:
    """The OIP datatype of an MLflow column (or tensor) spec, and its number of dimensions."""
    kind = spec.get("type")
    if kind == "array" and isinstance(spec.get("items"), dict):
        datatype, dimensions = _datatype_of_spec(spec["items"])
        return datatype, dimensions + 1
    if kind == "tensor":
        tensor = spec.get("tensor-spec", {})
        numpy = np.dtype(tensor.get("dtype", "object"))
        found = next((d for d, n in _NUMPY_OF_DATATYPE.items() if np.dtype(n) == numpy.newbyteorder("<")), "BYTES")
        return found, max(len(tensor.get("shape") or [-1]), 1)
    return DATATYPE_OF_TYPE.get(str(kind), "BYTES"), 1


def _plain(value: Any) -> Any:
    """A parameter's default as JSON has it."""
    return value.item() if isinstance(value, np.generic) else value


# -- infer -----------------------------------------------------------------------------------------


async def _infer(scope: Scope, receive: Receive, send: Send, served: Any, name: str) -> None:
    guard = served.app
    body = await guard.read_body(scope, receive, _as_oip_errors(send))
    if body is None:
        return
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    try:
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            raise _Refused(415, f"The request body is {encoding}-encoded; send it uncompressed.")
        translate = _Translation(served, guard.max_json_depth, headers.get(_HEADER_LENGTH))
        if len(body) <= _INLINE_BYTES:
            invocation = translate.request(body)
        else:
            invocation = await anyio.to_thread.run_sync(translate.request, body)
    except _Refused as refusal:
        telemetry.refused(refusal.reason)
        await _error(send, refusal.status, refusal.message)
        return
    start: Message = {}
    chunks: list[bytes] = []

    async def replay() -> Message:
        return {"type": "http.request", "body": invocation, "more_body": False}

    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    inner = {**scope, "method": "POST", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(invocation)).encode())]}
    await guard(inner, replay, capture)
    status, answer = int(start.get("status", 500)), b"".join(chunks)
    if status >= 400:
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"retry-after"]
        await _error(send, status, _message_of(answer, status), kept)
        return
    try:
        header, blobs = translate.response(json.loads(answer), name, served.version)
    except _Refused as refusal:
        telemetry.refused(refusal.reason)
        await _error(send, refusal.status, refusal.message)
        return
    if not blobs:
        await _json(send, 200, header)
        return
    head = json.dumps(header).encode()
    payload = head + b"".join(blobs)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"), (_HEADER_LENGTH, str(len(head)).encode()),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class _Translation:
    """One infer request: its OIP body to the ``/invocations`` body, and the answer back."""

    def __init__(self, served: Any, max_json_depth: int, header_length: bytes | None) -> None:
        signature = served.model.metadata
        inputs, outputs = signature.get_input_schema(), signature.get_output_schema()
        self.input_types = {str(s.name): s.to_dict() for s in inputs.inputs} if inputs is not None else {}
        self.output_types = {str(s.name): s.to_dict() for s in outputs.inputs} if outputs is not None else {}
        self.max_json_depth = max_json_depth
        self.header_length = header_length
        self.request_id: str | None = None
        self.requested: list[tuple[str, bool]] | None = None
        self.binary_output = False

    def request(self, body: bytes) -> bytes:
        header, binary = self._split(body)
        try:
            request = parse_json(header, self.max_json_depth)
        except JsonProblem as problem:
            raise _Refused(400, problem.message, problem.reason) from None
        if not isinstance(request, dict):
            raise _Refused(400, f"An inference request is a JSON object with \"inputs\", got {_kind(request)}.")
        if isinstance(request.get("id"), str):
            self.request_id = request["id"]
        params = self._params(request.get("parameters"))
        self.requested = self._outputs(request.get("outputs"))
        inputs = request.get("inputs")
        expected = list(self.input_types)
        if not isinstance(inputs, list) or not inputs:
            raise _Refused(400, f"The request has no \"inputs\": send one tensor per input column of the model, "
                                f"{expected}.")
        columns: dict[str, list[Any]] = {}
        offset = 0
        for index, tensor in enumerate(inputs):
            column, values, offset = self._column(index, tensor, binary, offset)
            if column in columns:
                raise _Refused(400, f"Input '{column}' is given twice; send each input tensor once.")
            columns[column] = values
        if offset != len(binary):
            raise _Refused(400, f"The body holds {len(binary) - offset} bytes after the JSON header and its inputs' "
                                "binary data (binary_data_size); send only what the inputs declare.")
        rows = {len(values) for values in columns.values()}
        if len(rows) > 1:
            counts = {column: len(values) for column, values in columns.items()}
            raise _Refused(400, f"The input tensors hold different numbers of rows, {counts}; each row of the "
                                "request needs a value of every input.")
        names = list(columns)
        data = [[columns[column][row] for column in names] for row in range(rows.pop())]
        invocation: dict[str, Any] = {"dataframe_split": {"columns": names, "data": data}}
        if params:
            invocation["params"] = params
        return json.dumps(invocation).encode()

    def _split(self, body: bytes) -> tuple[bytes, bytes]:
        """The JSON header and the binary data after it."""
        if self.header_length is None:
            return body, b""
        given = self.header_length.decode("latin-1").strip()
        if not given.isdigit() or int(given) > len(body):
            raise _Refused(400, f"The Inference-Header-Content-Length header is not a number of bytes up to the "
                                f"body's {len(body)}.")
        return body[:int(given)], body[int(given):]

    def _params(self, given: Any) -> dict[str, Any]:
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise _Refused(400, f"\"parameters\" must be an object of parameter names and values, got {_kind(given)}.")
        unsupported = sorted(set(given) & set(_UNSUPPORTED))
        if unsupported:
            raise _Refused(400, f"This server does not implement Triton's request parameters {unsupported} "
                                "(sequences, priorities, timeouts, headers); leave them out.")
        self.binary_output = given.get(_BINARY_OUTPUT) is True
        return {key: value for key, value in given.items() if key != _BINARY_OUTPUT}

    def _outputs(self, given: Any) -> list[tuple[str, bool]] | None:
        if given is None:
            return None
        if not isinstance(given, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in given):
            raise _Refused(400, "\"outputs\" must be a list of objects, each with the \"name\" of an output.")
        return [(o["name"], (o.get("parameters") or {}).get("binary_data") is True) for o in given]

    def _column(self, index: int, tensor: Any, binary: bytes, offset: int) -> tuple[str, list[Any], int]:
        """An input tensor's column name and values (one a row), and where the next one's binary
        data starts."""
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise _Refused(400, f"Input {index} is not an object with a \"name\".")
        column = tensor["name"]
        known = column if column in self.input_types else f"input {index}"
        datatype, shape, parameters = tensor.get("datatype"), tensor.get("shape"), tensor.get("parameters") or {}
        if datatype not in _DATATYPES:
            raise _Refused(400, f"The datatype of {known} is not one of the protocol's, {_DATATYPES}.")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _Refused(400, f"The shape of {known} is not a list of sizes: send [rows] (or [rows, 1]).")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise _Refused(400, f"The shape of {known} is {shape}: each row of a column holds one value, so send "
                                "[rows] (or [rows, 1]).")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _Refused(400, f"The binary_data_size of {known} is not a number of the bytes after the JSON "
                                    "header.")
            values = self._decoded(binary[offset:offset + size], datatype, known, column)
            offset += size
        elif "data" in tensor:
            values = _flat(tensor["data"])
        else:
            raise _Refused(400, f"{known.capitalize()} has neither \"data\" nor binary data (binary_data_size).")
        if len(values) != shape[0] * (shape[1] if len(shape) == 2 else 1):
            raise _Refused(400, f"{known.capitalize()} holds {len(values)} values, its shape {shape} says "
                                f"{math.prod(shape)}.")
        return column, values, offset

    def _decoded(self, data: bytes, datatype: str, known: str, column: str) -> list[Any]:
        """Binary tensor data as the JSON values of its column: BYTES elements as text (base64 for
        a binary column, as ``/invocations`` takes it), numbers as numbers."""
        if datatype != "BYTES":
            kind = np.dtype(_NUMPY_OF_DATATYPE[datatype])
            if len(data) % kind.itemsize:
                raise _Refused(400, f"The binary data of {known} is not a whole number of {datatype} values.")
            return np.frombuffer(data, dtype=kind).tolist()
        elements, at = [], 0
        while at < len(data):
            if at + 4 > len(data) or at + 4 + struct.unpack_from("<I", data, at)[0] > len(data):
                raise _Refused(400, f"The binary data of {known} is not a list of BYTES elements (each a 4-byte "
                                    "little-endian length, then that many bytes).")
            length = struct.unpack_from("<I", data, at)[0]
            elements.append(data[at + 4:at + 4 + length])
            at += 4 + length
        if self.input_types.get(column, {}).get("type") == "binary":
            return [base64.b64encode(element).decode("ascii") for element in elements]
        try:
            return [element.decode("utf-8") for element in elements]
        except UnicodeDecodeError:
            raise _Refused(400, f"An element of {known} is not UTF-8 text.") from None

    def response(self, answer: Any, name: str, version: str) -> tuple[dict[str, Any], list[bytes]]:
        """The ``/invocations`` answer as OIP outputs: one tensor per column, and the binary data
        of those sent as binary."""
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(predictions, list):
            predictions = [] if predictions is None else [predictions]
        if predictions and all(isinstance(row, dict) for row in predictions):
            # The signature's order; then any column it does not name (on_error="return"'s "error").
            found = list(dict.fromkeys(column for row in predictions for column in row))
            names = [c for c in self.output_types if c in found] + [c for c in found if c not in self.output_types]
            columns = {column: [row.get(column) for row in predictions] for column in names}
        else:
            columns = {"predictions": predictions}
        requested = self.requested or [(column, self.binary_output) for column in columns]
        missing = [column for column, _ in requested if column not in columns]
        if missing:
            raise _Refused(400, f"The model has no output {missing}; its outputs are {list(columns)}.")
        outputs, blobs = [], []
        for column, binary in requested:
            tensor, values = _output(column, columns[column], self.output_types.get(column))
            if binary:
                blob = _encoded(values, tensor["datatype"])
                tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = values
            outputs.append(tensor)
        header: dict[str, Any] = {"model_name": name, "outputs": outputs}
        if version:
            header["model_version"] = version
        if self.request_id is not None:
            header["id"] = self.request_id
        return header, blobs


def _output(column: str, values: list[Any], spec: dict[str, Any] | None) -> tuple[dict[str, Any], list[Any]]:
    """An output column as an OIP tensor (without its data) and its data, flattened: the datatype
    from the signature (else from the values), shape ``[rows]``, or ``[rows, k]`` for a list
    column. A column no tensor can hold (a null, lists of different lengths) is BYTES of each
    row's JSON text, with ``"content_type": "json"``."""
    rows = len(values)
    datatype = _datatype_of_spec(spec)[0] if spec is not None else _datatype_of_values(values)
    if all(isinstance(v, list) for v in values) and rows and len({len(v) for v in values}) == 1:
        flat = [item for row in values for item in row]
        if spec is None:
            datatype = _datatype_of_values(flat)
        if datatype is not None and _fits(flat, datatype):
            return {"name": column, "datatype": datatype, "shape": [rows, len(values[0])]}, flat
    elif datatype is not None and _fits(values, datatype):
        return {"name": column, "datatype": datatype, "shape": [rows]}, values
    return ({"name": column, "datatype": "BYTES", "shape": [rows], "parameters": {"content_type": "json"}},
            [json.dumps(v) for v in values])


def _datatype_of_values(values: list[Any]) -> str | None:
    if all(isinstance(v, str) for v in values):
        return "BYTES"
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "FP64"
    return None


def _fits(values: list[Any], datatype: str) -> bool:
    if datatype == "BYTES":
        return all(isinstance(v, str) for v in values)
    if datatype == "BOOL":
        return all(isinstance(v, bool) for v in values)
    if datatype.startswith("FP"):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _encoded(values: list[Any], datatype: str) -> bytes:
    """Values as binary tensor data: BYTES elements each after its 4-byte little-endian length."""
    if datatype != "BYTES":
        return np.asarray(values, dtype=_NUMPY_OF_DATATYPE[datatype]).tobytes()
    encoded = [v.encode("utf-8") for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def _flat(data: Any) -> list[Any]:
    """Tensor data, nested or flat, in row-major order."""
    if not isinstance(data, list):
        return [data]
    return [item for part in data for item in _flat(part)]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _message_of(answer: bytes, status: int) -> str:
    """The message of the guard's error body ``{"error_code", "message"}``."""
    try:
        error = json.loads(answer)
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return f"HTTP {status}"


def _as_oip_errors(send: Send) -> Send:
    """``send``, with the guard's error bodies rewritten as OIP's ``{"error": message}``."""
    held: list[Message] = []

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and int(message["status"]) >= 400:
            held.append(message)
            return
        if not held or message["type"] != "http.response.body":
            await send(message)
            return
        start = held.pop()
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"retry-after"]
        await _error(send, int(start["status"]), _message_of(message.get("body", b""), int(start["status"])), kept)

    return sending


async def _error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _json(send, status, {"error": message}, headers)


async def _json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})

