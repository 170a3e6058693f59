"""A bounded load test on loopback, at a reduced size (the full one: python -m benchmarks.load_test):
concurrent requests to the served text model, no errors, the answers of sequential requests, and
resident memory that does not grow."""

from __future__ import annotations

import json

import pytest
from conftest import serve, stop
from sample_steps import corpus

from benchmarks.load_test import run_load

pytestmark = pytest.mark.slow


def test_concurrent_requests_get_the_sequential_answers_without_errors_or_memory_growth(tracking, registered_reviews):
    process, url = serve("models:/reviews@champion", tracking)
    try:
        bodies = [json.dumps({"inputs": [text], "params": {"k": 2}}).encode() for text, _ in corpus(100, seed=5)]
        report = run_load(url, bodies, requests=3_000, clients=32, pgid=process.pid)
    finally:
        stop(process)
    assert report.errors == [] and report.mismatches == 0
    assert report.rss_after_warmup > 0 and report.rss_growth < 0.10, report
