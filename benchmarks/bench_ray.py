"""Benchmark: the Ray Serve deployment (``mlflow_fullmodel.ray_serve``) beside ``mlflow-fullmodel
serve``, for the same saved model, single-row requests from 1, 8 and 32 clients (bench_serving's
load generator): requests/s, p50 and p99 latency. All servers up at once, taking turns, each level
twice; the run with the most requests/s counts.

Ray runs a local cluster on loopback (no dashboard); its replicas are processes of Ray's, so no CPU
per request is given. ``python -m benchmarks.bench_ray`` (needs the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.bench_operations import bodies_of, started, stop
from benchmarks.bench_serving import CLIENTS, REQUESTS_PER_CLIENT, WARMUP, free_port, load
from benchmarks.common import percentile, saved_models, table

HEADER = ["model", "server", "clients", "req/s", "x fullmodel serve", "p50 ms", "p99 ms"]


def ray_servers(path: str, variants: dict[str, dict[str, Any]]) -> tuple[dict[str, str], Callable[[], None]]:
    """A local Ray cluster with one application per variant (``deployment`` keyword arguments),
    each under its own route prefix; their URLs and how to stop it all."""
    import ray
    from ray import serve

    from mlflow_fullmodel.ray_serve import deployment

    temp = tempfile.mkdtemp(prefix="ray-")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ray.init(address="local", include_dashboard=False, _temp_dir=temp, log_to_driver=False)

    def shutdown() -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)

    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = {}
        for index, (name, options) in enumerate(variants.items()):
            # Replicas ask for no whole CPU: the variants share this machine's cores, as the servers
            # beside them do.
            serve.run(deployment(path, ray_actor_options={"num_cpus": 0.1}, **options), name=f"v{index}",
                      route_prefix=f"/v{index}")
            urls[name] = f"http://127.0.0.1:{port}/v{index}"
    except BaseException:
        shutdown()
        raise
    return urls, shutdown


def main(size: str = "tiny", repeats: int = 2) -> list[list[object]]:
    path = saved_models(size)["fullmodel"]
    bodies = bodies_of()
    server = started("fullmodel", path, "--no-metrics")
    variants = {"Ray, 1 replica, batching on": {"num_replicas": 1, "batching": True},
                "Ray, 2 replicas, batching on": {"num_replicas": 2, "batching": True},
                "Ray, 2 replicas, batching off": {"num_replicas": 2, "batching": False}}
    try:
        urls, shutdown = ray_servers(path, variants)
    except BaseException:
        stop(server)
        raise
    urls = {"mlflow-fullmodel serve": server.url, **urls}
    gc.collect()
    gc.freeze()
    try:
        for url in urls.values():
            asyncio.run(load(url, 4, WARMUP // 4, bodies))
        results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in urls}
        for clients in CLIENTS:
            for _ in range(repeats):
                for name, url in urls.items():
                    per_client = REQUESTS_PER_CLIENT[clients]
                    wall, latencies = asyncio.run(load(url, clients, per_client, bodies))
                    run = {"rps": clients * per_client / wall, "p50": percentile(latencies, 50) * 1000,
                           "p99": percentile(latencies, 99) * 1000}
                    if run["rps"] > results[name].get(clients, {"rps": 0})["rps"]:
                        results[name][clients] = run
                    time.sleep(0.5)
    finally:
        shutdown()
        stop(server)
    rows = []
    for clients in CLIENTS:
        base = results["mlflow-fullmodel serve"][clients]["rps"]
        for name in urls:
            r = results[name][clients]
            rows.append([size, name, clients, f"{r['rps']:.0f}", f"{r['rps'] / base:.2f}", f"{r['p50']:.1f}",
                         f"{r['p99']:.1f}"])
    print(f"\nRay Serve beside mlflow-fullmodel serve (one worker), single-row requests, best of {repeats} "
          "alternating runs")
    print(table(rows, HEADER))
    return rows


if __name__ == "__main__":
    main()
