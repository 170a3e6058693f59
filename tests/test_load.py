"""Bounded load tests on loopback, at a reduced size (the full ones: python -m benchmarks.load_test):
concurrent requests to the served text model, no errors, the answers of sequential requests, and
resident memory that does not grow; light image requests answered while heavy ones keep the
server busy; and image bombs that leave the server's memory as it was."""

from __future__ import annotations

import json

import pytest
import requests
from images import b64, claimed_size_png, png
from sample_steps import corpus
from servers import serve, stop
from support import IMAGE_EXAMPLE

from benchmarks.load_test import MixedReport, group_rss_bytes, image_bodies, run_load, run_mixed

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


@pytest.fixture(scope="module")
def image_server(tracking, image_example):
    process, url = serve(f"models:/{IMAGE_EXAMPLE}@champion", tracking)
    yield process, url
    stop(process)


def test_light_image_requests_are_answered_while_heavy_ones_keep_the_server_busy(image_server):
    _, url = image_server
    light, heavy = image_bodies(rows_per_heavy=60, tta=64)
    report = run_mixed(url, light, heavy, light_requests=200, light_clients=4, heavy_clients=8)
    print(report.summary())
    assert report.light_errors == []
    # Heavy ones run, and those over the server's bound are refused at once, not queued.
    assert report.heavy_statuses.get(200, 0) >= 1 and set(report.heavy_statuses) <= {200, 503}
    # A light request does not wait for heavy ones to finish: its p99 is well under a heavy one's time.
    assert MixedReport.percentile(report.light_mixed_s, 0.99) < 0.5 * MixedReport.percentile(report.heavy_s, 0.5)


def test_image_bombs_leave_the_servers_memory_as_it_was(image_server):
    process, url = image_server
    good = image_bodies()[0][0]
    assert requests.post(f"{url}/invocations", data=good, headers={"Content-Type": "application/json"}).status_code == 200
    before = group_rss_bytes(process.pid)
    bombs = [json.dumps({"dataframe_records": [{"image": b64(image)}] * 4}).encode()
             for image in (png(262_144, 1), claimed_size_png(100_000, 100_000))]
    for _ in range(10):
        for body in bombs:
            response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60)
            assert response.status_code == 400 and "max_pixels" in response.json()["message"]
    assert group_rss_bytes(process.pid) < 1.10 * before
