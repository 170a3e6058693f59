"""Benchmark 2: serving. The fullmodel flavor and the hand-written PythonModel, each under
`mlflow models serve` (one worker) on loopback, single-row requests from 1, 8 and 32 concurrent
clients, a bounded number of requests per level: requests/s, p50 and p99 latency, server CPU per
request."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
from tqdm import tqdm

from benchmarks.common import group_pids, percentile, saved_models, table
from benchmarks.models import texts

CLIENTS = (1, 8, 32)
REQUESTS_PER_CLIENT = {1: 200, 8: 60, 32: 25}
WARMUP = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, env: dict[str, str] | None = None, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environment = dict(os.environ, **(env or {}))
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment.get("PATH", "")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", path, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"server for {path} did not start")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every process in the server's process group."""
    total = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def load(url: str, clients: int, per_client: int, bodies: list[bytes]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(per_client):
                body = rng.choice(bodies)
                started = time.perf_counter()
                async with session.post(f"{url}/invocations", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.perf_counter() - started, latencies


def measure(servers_to_start: dict[str, tuple[str, dict[str, str]]], bodies: list[bytes],
            repeats: int = 2, clients_levels: tuple[int, ...] = CLIENTS,
            workers: dict[str, int] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """All servers (name -> model path, environment) up at once, the load alternating between
    them, each level ``repeats`` times; per server and level the run with the most requests/s
    counts (the least disturbed one)."""
    servers = {name: start_server(path, env, (workers or {}).get(name, 1))
               for name, (path, env) in servers_to_start.items()}
    # The load generator shares this process with torch, MLflow and pandas; a full collection of
    # their objects would stall it for tens of ms and show up as server latency.
    gc.collect()
    gc.freeze()
    try:
        for _, url in servers.values():
            asyncio.run(load(url, 4, WARMUP // 4, bodies))
        results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in servers}
        runs = [(clients, name) for clients in clients_levels for _ in range(repeats) for name in servers]
        for clients, name in tqdm(runs, desc="serving", unit="run", leave=False, disable=None):
            process, url = servers[name]
            per_client = REQUESTS_PER_CLIENT[clients]
            cpu_before = group_cpu_seconds(process.pid)
            wall, latencies = asyncio.run(load(url, clients, per_client, bodies))
            cpu = group_cpu_seconds(process.pid) - cpu_before
            count = clients * per_client
            run = {"rps": count / wall, "p50": percentile(latencies, 50) * 1000,
                   "p99": percentile(latencies, 99) * 1000, "cpu_ms": cpu / count * 1000}
            if run["rps"] > results[name].get(clients, {"rps": 0})["rps"]:
                results[name][clients] = run
        return results
    finally:
        for process, _ in servers.values():
            stop_server(process)


HEADER = ["model", "clients", "ceiling req/s", "bound req/s", "hand req/s", "fullmodel req/s (x hand)",
          "fullmodel/limit", "fullmodel/bound", "p50 ms hand / fullmodel (ratio)", "p99 ms hand / fullmodel (ratio)",
          "CPU ms/req ceiling / hand / fullmodel", "batching on: req/s (x hand)", "batching on: p50 / p99 ms"]


def main(limits: dict[str, float], singles: dict[str, float]) -> list[list[object]]:
    """``limits``: forward-only rows/s on sorted batches; ``singles``: rows/s one example per call on
    one thread (both from the batch benchmark)."""
    bodies = [json.dumps({"dataframe_records": [{"text": t}]}).encode() for t in texts(300, seed=5)]
    rows = []
    for size in ("tiny", "medium"):
        paths = saved_models(size)
        results = measure({"ceiling": (paths["ceiling"], {}), "handwritten": (paths["handwritten"], {}),
                           "fullmodel": (paths["fullmodel"], {}),
                           "batching": (paths["fullmodel"], {"MLFLOW_FULLMODEL_BATCHING": "true"})}, bodies)
        for clients in CLIENTS:
            c, h, o, b = (results[name][clients] for name in ("ceiling", "handwritten", "fullmodel", "batching"))
            # The most any model could serve here: no more than the ceiling, and on these cores
            # each request costs at least what the server spends on a model that does nothing plus
            # one forward pass on one core.
            bound = min(c["rps"], (os.cpu_count() or 1) / (c["cpu_ms"] / 1000 + 1 / singles[size]))
            rows.append([
                size, clients, f"{c['rps']:.0f}", f"{bound:.0f}", f"{h['rps']:.0f}",
                f"{o['rps']:.0f} ({o['rps'] / h['rps']:.2f}x)", f"{o['rps'] / limits[size]:.2f}",
                f"{o['rps'] / bound:.2f}",
                f"{h['p50']:.1f} / {o['p50']:.1f} ({o['p50'] / h['p50']:.2f})",
                f"{h['p99']:.1f} / {o['p99']:.1f} ({o['p99'] / h['p99']:.2f})",
                f"{c['cpu_ms']:.1f} / {h['cpu_ms']:.1f} / {o['cpu_ms']:.1f}",
                f"{b['rps']:.0f} ({b['rps'] / h['rps']:.2f}x)", f"{b['p50']:.1f} / {b['p99']:.1f}",
            ])
    print("\nServing, single-row requests, one worker (best of 2 alternating runs; the ceiling is a model "
          "that does no work)")
    print(table(rows, HEADER))
    return rows


WORKERS_HEADER = ["model", "workers", "threads per worker", "req/s at 32 clients", "x 1 worker", "p50 ms", "p99 ms",
                  "CPU ms/req"]


def workers_main() -> list[list[object]]:
    """The fullmodel server with 1 and 2 workers (``mlflow models serve -w N``) at 32 clients, each
    worker with the thread count the model picks for N workers (``serving.default_thread_count``)."""
    from mlflow_fullmodel.serving import default_thread_count

    bodies = [json.dumps({"dataframe_records": [{"text": t}]}).encode() for t in texts(300, seed=5)]
    rows = []
    for size in ("tiny", "medium"):
        path = saved_models(size)["fullmodel"]
        results = measure({"1": (path, {}), "2": (path, {})}, bodies, repeats=3, clients_levels=(32,),
                          workers={"1": 1, "2": 2})
        for n in ("1", "2"):
            r = results[n][32]
            rows.append([size, n, default_thread_count(int(n)), f"{r['rps']:.0f}",
                         f"{r['rps'] / results['1'][32]['rps']:.2f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                         f"{r['cpu_ms']:.1f}"])
    print("\nServing with several workers, single-row requests, 32 clients (best of 3 alternating runs)")
    print(table(rows, WORKERS_HEADER))
    return rows


if __name__ == "__main__":
    from benchmarks import bench_batch

    main(*bench_batch.forward_rates(bench_batch.main()))
