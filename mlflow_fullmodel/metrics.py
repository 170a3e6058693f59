"""The Prometheus metrics of ``mlflow-fullmodel serve``, scraped at ``GET /metrics``.

Each served request ends in one ``ServerMetrics.observe`` call with its ``telemetry.RequestRecord``.
A server of several worker processes shares its metrics through ``prometheus_client``'s
multiprocess mode: the server sets ``PROMETHEUS_MULTIPROC_DIR`` before its workers start, and a
scrape of any worker adds up all of them.

The metrics to alert on (README, "Operating a served model"): the rate of 5xx in
``mlflow_fullmodel_requests_total``, the p99 of ``mlflow_fullmodel_request_duration_seconds``,
``mlflow_fullmodel_refusals_total`` by reason, ``mlflow_fullmodel_ready`` and
``mlflow_fullmodel_rollout_failed``.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlflow_fullmodel.telemetry import RequestRecord

__all__ = ["CONTENT_TYPE", "MULTIPROCESS_VARIABLE", "ModelInfo", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Where the worker processes of one server keep their metrics (prometheus_client's own variable).
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000)

#: The model a server answers with: registered name, version, digest and module format.
ModelInfo = tuple[str, str, str, str]


class ServerMetrics:
    """The metrics of one server process, in a registry of their own (a second server in the same
    process, as in tests, counts apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("mlflow_fullmodel_requests", "Requests answered, by route and HTTP status code.",
                                ["route", "code"], registry=registry)
        self.duration = Histogram("mlflow_fullmodel_request_duration_seconds",
                                  "Time from taking a request to its answer, by route.", ["route"],
                                  buckets=_SECONDS, registry=registry)
        self.stages = Histogram("mlflow_fullmodel_stage_duration_seconds",
                                "Time of each stage of a prediction request: admission (waiting for a thread "
                                "and a slot), preprocess, forward, postprocess.", ["stage"],
                                buckets=_SECONDS, registry=registry)
        self.rows = Histogram("mlflow_fullmodel_request_rows", "Rows per prediction request.",
                              buckets=_COUNTS, registry=registry)
        self.batches = Histogram("mlflow_fullmodel_forward_batch_size", "Examples per forward batch.",
                                 buckets=_COUNTS, registry=registry)
        self.refusals = Counter("mlflow_fullmodel_refusals", "Refused requests, by reason: limit, admission "
                                "(503), deadline (504), bad_input (other 4xx).", ["reason"], registry=registry)
        self.in_flight = Gauge("mlflow_fullmodel_requests_in_flight", "Requests taken and not yet answered.",
                               registry=registry, multiprocess_mode="livesum")
        self.ready = Gauge("mlflow_fullmodel_ready", "1 when the server answers predictions (every worker "
                           "verified, loaded and warmed its model), else 0.", registry=registry,
                           multiprocess_mode="livemin")
        self.model = Gauge("mlflow_fullmodel_model_info", "1 for the model being served.",
                           ["name", "version", "digest", "format"], registry=registry, multiprocess_mode="livemax")
        self.rollouts = Counter("mlflow_fullmodel_rollouts", "Versions an alias moved to, by result: swapped in, "
                                "or refused (it failed verification or warm-up; the old one kept serving).",
                                ["result"], registry=registry)
        self.rollout_failed = Gauge("mlflow_fullmodel_rollout_failed", "1 while the version the followed alias "
                                    "holds failed to roll out and an older one serves.", registry=registry,
                                    multiprocess_mode="livemax")

    def observe(self, record: RequestRecord, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(record.route, str(status)).inc()
        self.duration.labels(record.route).observe(seconds)
        for stage, spent in record.stages.items():
            self.stages.labels(stage).observe(spent)
        if record.rows is not None:
            self.rows.observe(record.rows)
        for size in record.forward_batches:
            self.batches.observe(size)
        if record.refusal is not None:
            self.refusals.labels(record.refusal).inc()

    def serving(self, info: ModelInfo, previous: ModelInfo | None = None) -> None:
        """``info`` is the model now answering (in place of ``previous``)."""
        if previous is not None and previous != info:
            self.model.labels(*previous).set(0)
        self.model.labels(*info).set(1)

    def scrape(self) -> bytes:
        """The text exposition of every metric, of all the server's workers."""
        if os.environ.get(MULTIPROCESS_VARIABLE):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def process_ended(pid: int) -> None:
    """Drop a worker's live gauges once it has stopped (multiprocess mode only)."""
    if os.environ.get(MULTIPROCESS_VARIABLE):
        multiprocess.mark_process_dead(pid)
