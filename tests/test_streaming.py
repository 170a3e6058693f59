"""Streaming for generation models: the decoding strategies' ``stream``, ``predict_stream`` through
pyfunc, and ``POST /invocations`` with ``Accept: text/event-stream`` through ``operations.Operations``
(in-process, a real saved model) and a real ``mlflow-fullmodel serve``.

The model is a translator made of real parts: sentencepiece in, a TorchScript encoder-decoder,
beam search, sentencepiece out. Its decoder (``CountingDecoder``) counts the steps it ran, so that
a test can see the decoding stop, and fails at a step a test sets, so that a stream can fail midway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
import torch
from asgi import loaded
from prometheus_client.parser import text_string_to_metric_families
from servers import serve_fullmodel, stop
from support import train_example
from test_decoding import EOS, PAD, MarkovDecoder, random_sources, random_table
from torch import Tensor

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import PadCollate
from mlflow_fullmodel.decoding import BeamSearch, GreedySearch
from mlflow_fullmodel.metrics import ServerMetrics
from mlflow_fullmodel.modules import ModuleSet
from mlflow_fullmodel.operations import ACCESS_LOGGER, Operations
from mlflow_fullmodel.rollout import ModelSlot, ServedVersion
from mlflow_fullmodel.serving import ServingError, serve
from mlflow_fullmodel.settings import ServingSettings
from mlflow_fullmodel.transforms import SentencePieceDecode, SentencePieceEncode

MAX_LENGTH = 12
NEVER = 1 << 40


class CountingDecoder(MarkovDecoder):
    """``MarkovDecoder`` that counts its decoding steps (``steps``) and raises at step ``fail_at``."""

    def __init__(self, table: Tensor) -> None:
        super().__init__(table)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("fail_at", torch.full((), NEVER, dtype=torch.long))

    @torch.jit.export
    def decode_step(self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        self.steps += 1
        if bool(self.steps >= self.fail_at):
            raise RuntimeError("the decoder failed at the step the test asked for")
        key = (memory.squeeze(-1) * src_mask.float()).sum(1).long() % self.table.shape[0]
        return self.table[key, state % 2, tokens], state + tokens


def run(strategy: fm.ForwardStrategy, module: Any, sources: list[list[int]], **params: Any) -> tuple[Any, list[Any]]:
    """``strategy``'s answer for one padded batch, and its stream's events, as FullModel runs them."""
    batch = PadCollate(pad_value=PAD)([torch.tensor(s) for s in sources])
    modules, cpu = ModuleSet.of(module), torch.device("cpu")
    with torch.inference_mode():
        return strategy(modules, batch, cpu, **params), list(strategy.stream(modules, batch, cpu, **params))


def steps_of(module: Any) -> int:
    return int(module.steps)


# -- the strategies ------------------------------------------------------------------------------


class TestStreamingStrategies:
    @pytest.mark.parametrize("params", [{"max_length": 8}, {"max_length": 3}])
    def test_greedy_emits_the_tokens_so_far_at_each_token_then_its_answer(self, params):
        module = fm.script(MarkovDecoder(random_table()))
        for source in random_sources(12):
            answer, events = run(GreedySearch(), module, [source], **params)
            assert events[-1] == answer
            (ids, _), = answer[0]
            partial = [event[0][0][0] for event in events[:-1]]
            # One event per token, the first i tokens of the answer; the answer itself is the last
            # token's when max_length cut it short.
            assert partial == [ids[:i] for i in range(1, len(partial) + 1)]
            assert len(partial) == (len(ids) if len(ids) < params["max_length"] else len(ids) - 1)

    def test_greedy_streams_a_batch_each_example_stopping_at_its_own_eos(self):
        module = fm.script(MarkovDecoder(random_table()))
        sources = random_sources(9, seed=3)
        answer, events = run(GreedySearch(), module, sources, max_length=8)
        assert events[-1] == answer
        for b, ((ids, _),) in enumerate(answer):
            seen = [event[b][0][0] for event in events[:-1]]
            assert seen == [ids[:i] for i in range(1, len(seen) + 1)]  # an example done stays as it was

    @pytest.mark.parametrize("n_best", [1, 3])
    def test_beam_search_emits_its_best_live_hypothesis_each_step_then_the_n_best(self, n_best):
        table = random_table()
        for source in random_sources(8, seed=5):
            module = fm.script(CountingDecoder(table))
            answer, events = run(BeamSearch(), module, [source], beam_size=3, n_best=n_best, max_length=7)
            assert events[-1] == answer and len(answer[0]) == n_best
            assert all(len(event[0]) == 1 for event in events[:-1])  # one hypothesis while searching
            # Each step but the last (which finishes every hypothesis) made an event: the module ran
            # twice per step here, once for the answer and once for the stream.
            assert len(events) - 1 == steps_of(module) // 2 - 1

    def test_beam_search_with_a_beam_of_one_streams_what_greedy_streams(self):
        module = fm.script(MarkovDecoder(random_table()))
        for source in random_sources(10, seed=6):
            _, greedy = run(GreedySearch(), module, [source], max_length=9)
            _, beam = run(BeamSearch(), module, [source], beam_size=1, n_best=1, max_length=9, length_penalty=0.0)
            assert [e[0][0][0] for e in beam[:-1]] == [e[0][0][0] for e in greedy[:-1]]
            assert [e[0][0][1] for e in beam] == pytest.approx([e[0][0][1] for e in greedy], rel=1e-6)

    def test_the_answer_does_not_depend_on_whether_it_was_streamed(self):
        # The batch path's answer as before streaming existed: the strategies' own tests check it
        # against references; here, the stream's last event against it, with the params that change
        # the search.
        module = fm.script(MarkovDecoder(random_table()))
        sources = random_sources(7, seed=7)
        for params in ({"beam_size": 4, "n_best": 4, "length_penalty": 0.0}, {"beam_size": 2, "max_length": 4}):
            answer, events = run(BeamSearch(), module, sources, **params)
            assert events[-1] == answer

    def test_closing_a_stream_stops_the_decoding(self):
        table = random_table()
        table[..., EOS] = -30.0
        module = fm.script(CountingDecoder(table))
        batch = PadCollate(pad_value=PAD)([torch.tensor([4, 5])])
        with torch.inference_mode():
            stream = GreedySearch().stream(ModuleSet.of(module), batch, torch.device("cpu"), max_length=500)
            next(stream), next(stream)
            stream.close()
        assert steps_of(module) == 2

    def test_a_strategy_that_computes_its_answer_in_one_call_cannot_stream(self, text_model):
        with pytest.raises(fm.StreamingError, match=r"The forward strategy CallModule computes its answer in one call"):
            list(text_model.predict_stream("What a film!"))


# -- a saved translator, through pyfunc ----------------------------------------------------------


def translator(spm_path: str, forward: fm.ForwardStrategy | None = None) -> fm.FullModel:
    size = SentencePieceDecode(fm.Artifact(spm_path))._processor.get_piece_size()
    table = random_table(vocab=size, seed=9)
    table[..., EOS] = -30.0  # every answer is max_length tokens long: a request decides how many
    return fm.FullModel(
        preprocess=[SentencePieceEncode(fm.Artifact(spm_path))],
        module=fm.script(CountingDecoder(table)),
        forward=forward or BeamSearch(max_length=fm.Param(MAX_LENGTH, minimum=1, maximum=1000)),
        postprocess=[SentencePieceDecode(fm.Artifact(spm_path))],
        collate=PadCollate(pad_value=PAD),
    )


TEXTS = ["a great film", "the plot was superb", "dull"]
SECRET = "SECRET-TOKEN-4711"


@pytest.fixture(scope="module")
def saved(spm_path, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("streaming") / "translator")
    fm.save_model(translator(spm_path), path, input_example=TEXTS)
    return path


@pytest.fixture(scope="module")
def pyfunc_model(saved) -> Any:
    return mlflow.pyfunc.load_model(saved)


class TestPredictStream:
    @pytest.mark.parametrize("params", [None, {"beam_size": 2, "n_best": 2}, {"max_length": 5}])
    def test_the_last_event_is_the_answer_of_predict(self, pyfunc_model, params):
        for text in TEXTS:
            events = list(pyfunc_model.predict_stream({"text": text}, params=params))
            answer = pyfunc_model.predict(pd.DataFrame({"text": [text]}), params=params).to_dict("records")[0]
            assert events[-1] == answer
            assert all(list(event) == ["translation", "candidates", "scores"] for event in events)
            assert len(events) == (params or {}).get("max_length", MAX_LENGTH)

    def test_a_stream_goes_step_by_step_and_stops_when_closed(self, pyfunc_model):
        module = pyfunc_model.get_raw_model().module["main"]
        before = steps_of(module)
        stream = pyfunc_model.predict_stream({"text": "a great film"}, params={"max_length": 500})
        next(stream)
        assert steps_of(module) - before <= 2  # lazily: no more than the event asked for
        stream.close()
        assert steps_of(module) - before <= 2

    def test_a_model_whose_forward_cannot_stream_says_why(self, text_model, tmp_path):
        fm.save_model(text_model, str(tmp_path / "reviews"), input_example=["What a film!"], check_parity=False)
        loaded = mlflow.pyfunc.load_model(str(tmp_path / "reviews"))
        with pytest.raises(mlflow.exceptions.MlflowException, match="The forward strategy CallModule computes its "
                                                                     "answer in one call, so there is nothing to stream"):
            list(loaded.predict_stream({"text": "What a film!"}))

    def test_limits_and_params_are_those_of_predict(self, spm_path):
        served = serve(translator(spm_path), ServingSettings(max_text_chars=10), ["translation"])
        with pytest.raises(ServingError, match="over the limit max_text_chars=10"):
            list(served.predict_stream({"text": "the plot was superb"}))
        with pytest.raises(ServingError, match=r"Parameter 'n_best' \(3\) must be at most beam_size \(2\)"):
            list(served.predict_stream({"text": "dull"}, params={"beam_size": 2, "n_best": 3}))
        with pytest.raises(ServingError, match="A stream answers one row, got 2"):
            list(served.predict_stream(["dull", "a film"]))
        with pytest.raises(ServingError, match="leave 'on_error' at 'raise'"):
            list(served.predict_stream({"text": "dull"}, params={"on_error": "return"}))


# -- server-sent events through Operations ---------------------------------------------------------


class Streamed:
    def __init__(self, status: int, headers: dict[str, str], chunks: list[bytes]) -> None:
        self.status, self.headers, self.chunks = status, headers, chunks
        self.body = b"".join(chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str, Any]]:
        """The server-sent events: (event type, parsed data)."""
        parsed = []
        for block in self.body.decode().split("\n\n"):
            if not block:
                continue
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            parsed.append((fields.get("event", "message"), json.loads(fields["data"])))
        return parsed


def call(app: Any, body: str, stream: bool = True, request_id: str = "req-1", leave_after: int | None = None,
         fail_send_after: int | None = None) -> Streamed:
    """``POST /invocations`` to an ASGI app as uvicorn makes it; the client disconnects after
    ``leave_after`` body chunks, or its connection fails on the send after ``fail_send_after``."""
    data = body.encode()
    headers = {"content-type": "application/json", "content-length": str(len(data)), "x-request-id": request_id,
               **({"accept": "text/event-stream"} if stream else {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 5000)}
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def go() -> None:
        received = False
        left = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": data, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if fail_send_after is not None and len(chunks) >= fail_send_after:
                raise OSError("the connection was reset")
            chunks.append(message.get("body", b""))
            if leave_after is not None and len(chunks) >= leave_after:
                left.set()

        await app(scope, receive, send)

    asyncio.run(go())
    headers_of = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Streamed(start["status"], headers_of, chunks)


def rows(*texts: str, **params: Any) -> str:
    return json.dumps({"dataframe_records": [{"text": t} for t in texts], **({"params": params} if params else {})})


@pytest.fixture(scope="module")
def version(saved) -> ServedVersion:
    return loaded(saved, ("translator", "3", "sha256:test", "torchscript"), 20_000)


@pytest.fixture
def operations(version) -> Operations:
    slot = ModelSlot()
    slot.swap(version)
    return Operations(slot, ServerMetrics())


@pytest.fixture
def decoder(version) -> Any:
    module = version.model.get_raw_model().module["main"]
    yield module
    module.fail_at.fill_(NEVER)


class TestEventStream:
    @pytest.mark.parametrize("params", [{}, {"beam_size": 3, "n_best": 2}, {"max_length": 4}])
    def test_each_event_is_an_answer_and_the_last_is_the_answer_of_invocations(self, operations, params):
        streamed = call(operations, rows("the plot was superb", **params))
        assert streamed.status == 200 and streamed.headers["content-type"] == "text/event-stream"
        assert streamed.headers["x-request-id"] == "req-1" and streamed.headers["x-model-version"] == "3"
        events = streamed.events()
        assert len(events) == params.get("max_length", MAX_LENGTH) and {kind for kind, _ in events} == {"message"}
        assert all(list(data) == ["predictions"] and len(data["predictions"]) == 1 for _, data in events)
        assert len(streamed.chunks) == len(events) + 1  # sent one by one, then the end
        whole = call(operations, rows("the plot was superb", **params), stream=False)
        assert whole.status == 200 and whole.headers["content-type"] == "application/json"
        assert events[-1][1] == whole.json()

    @pytest.mark.parametrize("body", [
        rows("dull", temperature=0.5),                             # unknown param: the guard
        rows("dull", beam_size=2, n_best=3),                       # a bad value: the strategy
        rows(f"{SECRET} " * 3, max_length=0),                      # refused by the param's bounds
        "[" * 40 + "]" * 40,                                       # nested too deep: the guard
        '{"dataframe_records": [{"text": "dull"}',                 # not JSON
        json.dumps({"dataframe_records": [{"txt": SECRET}]}),      # no such column: MLflow's schema check
        json.dumps({"dataframe_records": [{"text": None}]}),       # a null: the guard
        json.dumps({"records": [{"text": "dull"}]}),               # no such format: MLflow's parser
    ])
    def test_a_bad_request_gets_the_json_error_of_invocations(self, operations, body):
        streamed, whole = call(operations, body), call(operations, body, stream=False)
        assert 400 <= streamed.status < 500 and streamed.headers["content-type"] == "application/json"
        assert (streamed.status, streamed.json()) == (whole.status, whole.json())
        assert SECRET not in streamed.body.decode() and "Traceback" not in streamed.body.decode()

    def test_a_request_of_several_rows_is_refused_before_any_event(self, operations):
        streamed = call(operations, rows("dull", "a great film"))
        assert streamed.status == 400
        assert streamed.json()["message"].startswith("A streamed request answers one row, got 2; send each row")
        assert streamed.json()["request_id"] == "req-1"

    @pytest.mark.parametrize("leave", [{"leave_after": 1}, {"fail_send_after": 1}], ids=["disconnect", "send fails"])
    def test_a_client_that_goes_away_stops_the_decoding(self, operations, decoder, leave):
        before = steps_of(decoder)
        call(operations, rows("a great film", max_length=500), **leave)
        stopped = steps_of(decoder) - before
        whole = steps_of(decoder)
        call(operations, rows("a great film", max_length=500))
        assert steps_of(decoder) - whole == 500  # a client that stays gets every step ...
        assert stopped < 10  # ... one that left a few beyond the event it had, not 500

    def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event(self, operations, decoder, caplog):
        decoder.fail_at.fill_(steps_of(decoder) + 4)
        with caplog.at_level(logging.ERROR):
            streamed = call(operations, rows(f"{SECRET} film"))
        assert streamed.status == 200
        events = streamed.events()
        assert [kind for kind, _ in events] == ["message"] * 3 + ["error"]
        error = events[-1][1]
        assert error["error_code"] == "INTERNAL_ERROR" and error["request_id"] == "req-1"
        assert error["message"].startswith("Model error (not caused by the request) in forward BeamSearch: Row 0: "
                                           "forward BeamSearch failed:")
        assert "the decoder failed at the step the test asked for" in caplog.text  # the trace: in the log only
        assert "Traceback" not in streamed.body.decode() and SECRET not in streamed.body.decode()

    def test_metrics_and_the_access_log_count_a_streamed_request_once(self, operations, decoder, caplog):
        def scrape() -> dict[tuple[str, frozenset], float]:
            text = operations.metrics.scrape().decode()
            return {(s.name, frozenset(s.labels.items())): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}

        def grew(after: dict, before: dict, name: str, **labels: str) -> float:
            key = (name, frozenset(labels.items()))
            return after.get(key, 0.0) - before.get(key, 0.0)

        before = scrape()
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
            call(operations, rows("dull"), request_id="good")
            call(operations, rows("dull", "a great film"), request_id="two-rows")
            call(operations, rows("a great film", max_length=500), request_id="left", leave_after=2)
        after = scrape()
        assert grew(after, before, "mlflow_fullmodel_requests_total", route="/invocations", code="200") == 2
        assert grew(after, before, "mlflow_fullmodel_requests_total", route="/invocations", code="400") == 1
        assert grew(after, before, "mlflow_fullmodel_refusals_total", reason="bad_input") == 1
        assert grew(after, before, "mlflow_fullmodel_request_duration_seconds_count", route="/invocations") == 3
        assert grew(after, before, "mlflow_fullmodel_request_rows_count") == 2  # the two one-row streams
        assert grew(after, before, "mlflow_fullmodel_forward_batch_size_count") == 2
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
        assert [(line["request_id"], line["status"], line["rows"]) for line in lines] == [
            ("good", 200, 1), ("two-rows", 400, None), ("left", 200, 1)]


# -- a real server ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_served_translator_streams_over_http_and_its_last_event_is_the_answer(tracking, tmp_path):
    train_example("translator", tracking, tmp_path, "--registered-model-name", "streaming-translator")
    process, url = serve_fullmodel("models:/streaming-translator@champion", tracking)
    try:
        body = {"dataframe_records": [{"source": "1,234"}], "params": {"beam_size": 2}}
        with requests.post(f"{url}/invocations", json=body, headers={"Accept": "text/event-stream"},
                           stream=True, timeout=60) as response:
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "text/event-stream"
            data = [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
                    if line.startswith("data: ")]
        whole = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert whole.status_code == 200 and len(data) > 1
        assert data[-1] == whole.json()
        bad = requests.post(f"{url}/invocations", json={**body, "params": {"n_best": 9}},
                            headers={"Accept": "text/event-stream"}, timeout=60)
        assert bad.status_code == 400 and "Parameter 'n_best'" in bad.json()["message"]
    finally:
        stop(process)
