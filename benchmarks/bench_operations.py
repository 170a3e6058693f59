"""Benchmark 6: operating a served model (`mlflow-fullmodel serve`), three measurements.

1. What the Prometheus metrics cost: `mlflow-fullmodel serve` against `mlflow-fullmodel serve
   --no-metrics` (and `mlflow models serve`, for reference), the same saved model, single-row
   requests from 1, 8 and 32 clients. The servers are up at once and take turns (A B, then B A,
   round after round); each round gives a ratio with/without, and the table has their median and
   range. Beside it, the pieces timed in-process: the request record, ``ServerMetrics.observe``
   and the in-flight gauge, with prometheus_client's single-process and multiprocess values.
2. The first request after ready: start the server, poll /ready until 200, time the first request,
   then the p50 of the next requests. For comparison, the same with `mlflow models serve` (no
   warm-up; ready when /ping answers). Each a fresh server, 3 times, alternating.
3. An alias rollout under load: a registered model (SQLite store in a temporary folder) with
   versions 1 and 2 (different weights) and 3 (a byte of its tokenizer changed in the artifact
   store after logging); `serve models:/NAME@live --follow-alias --poll-s 1` answers 8 clients
   while the alias moves 1 -> 2 -> 3. Every request must succeed; version 3 must be refused.

    python -m benchmarks.bench_operations [--quick] [--only cost|first|swap]

``--quick`` runs each part at a small size on the tiny model (about a minute and a half).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from benchmarks.bench_serving import free_port, group_cpu_seconds, load
from benchmarks.common import WORKDIR, percentile, saved_models, subject_of, table
from benchmarks.models import texts

CLIENTS = (1, 8, 32)
REQUESTS_PER_CLIENT = {1: 200, 8: 60, 32: 25}
WARMUP = 60
#: The servers of part 1, in the order they take turns.
COST_SERVERS = ("metrics", "no-metrics", "mlflow")


# -- servers ----------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: IO[bytes]
    #: perf_counter() when the process was started.
    launched: float

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]


def _fullmodel_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow-fullmodel"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mlflow_fullmodel.cli import main; main()"]


def launch(kind: str, model: str, *options: str, env: dict[str, str] | None = None) -> Server:
    """Start a server in a process group of its own: ``kind`` "fullmodel" (`mlflow-fullmodel
    serve`, its access log to /dev/null) or "mlflow" (`mlflow models serve`, one worker)."""
    port = free_port()
    environment = dict(os.environ, **(env or {}))
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment.get("PATH", "")
    if kind == "fullmodel":
        command = [*_fullmodel_command(), "serve", model, "--host", "127.0.0.1", "-p", str(port), *options]
    else:
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port), "-w", "1", *options]
    log = tempfile.TemporaryFile()
    launched = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=log,
                               start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", log, launched)


def stop(server: Server) -> None:
    """SIGTERM to the server's whole process group; SIGKILL if it has not ended in 60 s."""
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    server.log.close()


async def wait_ready(session: aiohttp.ClientSession, server: Server, path: str, seconds: float = 300,
                     every: float = 0.02) -> float:
    """Poll ``path`` until it answers 200; returns perf_counter() at that answer."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            async with session.get(f"{server.url}{path}") as response:
                await response.read()
                if response.status == 200:
                    return time.perf_counter()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(every)
    raise RuntimeError(f"{server.url}{path} did not answer 200 in {seconds} s:\n{server.log_tail()}")


def started(kind: str, model: str, *options: str, env: dict[str, str] | None = None) -> Server:
    server = launch(kind, model, *options, env=env)

    async def ready() -> None:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, server, "/ready" if kind == "fullmodel" else "/ping", every=0.2)

    try:
        asyncio.run(ready())
    except BaseException:
        stop(server)
        raise
    return server


def bodies_of(n: int = 300, seed: int = 5) -> list[bytes]:
    return [json.dumps({"dataframe_records": [{"text": t}]}).encode() for t in texts(n, seed=seed)]


def spread(values: list[float], digits: int = 3) -> str:
    """Median [min-max]."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


# -- 1. the metrics' cost ----------------------------------------------------------------------------


COST_HEADER = ["model", "clients", "req/s metrics / no-metrics / mlflow (median)", "req/s ratio metrics/no-metrics",
               "p99 ms metrics / no-metrics / mlflow (median)", "p99 ratio metrics/no-metrics",
               "CPU ms/req metrics / no-metrics / mlflow", "CPU ratio metrics/no-metrics"]


def metrics_cost(size: str, rounds: int, scale: float = 1.0) -> list[list[object]]:
    """Part 1 for one model size: one row per client level."""
    path = saved_models(size)["fullmodel"]
    bodies = bodies_of()
    servers: dict[str, Server] = {}
    try:
        servers["metrics"] = started("fullmodel", path)
        servers["no-metrics"] = started("fullmodel", path, "--no-metrics")
        servers["mlflow"] = started("mlflow", path)
        gc.collect()
        gc.freeze()  # the load generator's own collections would show as server latency
        for server in servers.values():
            asyncio.run(load(server.url, 4, WARMUP // 4, bodies))
        runs: dict[str, dict[int, list[dict[str, float]]]] = {n: {c: [] for c in CLIENTS} for n in servers}
        for round_ in range(rounds):
            for clients in CLIENTS:
                # A B C, then C B A: drift in the machine's load falls on each server alike.
                order = COST_SERVERS if round_ % 2 == 0 else COST_SERVERS[::-1]
                for name in order:
                    server = servers[name]
                    per_client = max(2, int(REQUESTS_PER_CLIENT[clients] * scale))
                    cpu_before = group_cpu_seconds(server.process.pid)
                    wall, latencies = asyncio.run(load(server.url, clients, per_client, bodies))
                    cpu = group_cpu_seconds(server.process.pid) - cpu_before
                    count = clients * per_client
                    runs[name][clients].append({"rps": count / wall, "p99": percentile(latencies, 99) * 1000,
                                                "cpu_ms": cpu / count * 1000})
            print(f"  {size}: round {round_ + 1}/{rounds} done", file=sys.stderr)
    finally:
        for server in servers.values():
            stop(server)
        gc.unfreeze()
    rows = []
    for clients in CLIENTS:
        m, n, f = (runs[name][clients] for name in COST_SERVERS)

        def med(runs_: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in runs_)

        def ratios(key: str) -> list[float]:
            return [a[key] / b[key] for a, b in zip(m, n)]

        rows.append([
            size, clients, f"{med(m, 'rps'):.0f} / {med(n, 'rps'):.0f} / {med(f, 'rps'):.0f}", spread(ratios("rps")),
            f"{med(m, 'p99'):.1f} / {med(n, 'p99'):.1f} / {med(f, 'p99'):.1f}", spread(ratios("p99")),
            f"{med(m, 'cpu_ms'):.2f} / {med(n, 'cpu_ms'):.2f} / {med(f, 'cpu_ms'):.2f}", spread(ratios("cpu_ms")),
        ])
    return rows


PIECES_CHILD = r"""
import json, sys, time, timeit
from mlflow_fullmodel import telemetry
from mlflow_fullmodel.metrics import ServerMetrics

metrics = ServerMetrics()
def a_request():
    record = telemetry.RequestRecord("0123456789abcdef0123456789abcdef", "/invocations")
    with telemetry.recording(record):
        telemetry.rows(1)
        telemetry.admitted()
        for name in ("preprocess", "forward", "postprocess"):
            with telemetry.stage(name):
                pass
        telemetry.forward_batch(1)
    return record
record = a_request()
def observe():
    metrics.in_flight.inc()
    metrics.in_flight.dec()
    metrics.observe(record, 200, 0.004)
def best(fn, n=20000):
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
print(json.dumps({"record": best(a_request), "observe": best(observe), "scrape": best(metrics.scrape, 200)}))
"""


def piece_costs() -> dict[str, dict[str, float]]:
    """Microseconds per request of the telemetry record and of the metrics, in a process of
    prometheus_client's single-process mode and one of its multiprocess mode (chosen at import)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-prometheus-") as folder:
        for mode, env in (("single-process", {}), ("multiprocess", {"PROMETHEUS_MULTIPROC_DIR": folder})):
            environment = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            result = subprocess.run([sys.executable, "-c", PIECES_CHILD], env={**environment, **env},
                                    capture_output=True, text=True, check=True)
            results[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return results


PIECES_HEADER = ["prometheus_client mode", "request record + 3 stages (us)", "observe + in-flight inc/dec (us)",
                 "scrape (us)"]


#: One request at a time through each layer of the served app, in-process (no HTTP, no client):
#: MLflow's scoring app alone, with ``hardened.Guard`` around it, and ``operations.Operations``
#: around that without and with metrics; blocks of 200 requests, the layers taking turns.
LAYERS_CHILD = r"""
import asyncio, gc, json, logging, os, statistics, sys, time
from mlflow_fullmodel._mlflow import SERVER_MODEL_PATH_VARIABLE

path, blocks = sys.argv[1], int(sys.argv[2])
os.environ[SERVER_MODEL_PATH_VARIABLE] = path  # tuned as in a server
from mlflow_fullmodel.metrics import ServerMetrics
from mlflow_fullmodel.operations import ACCESS_LOGGER, Operations
from mlflow_fullmodel.rollout import GuardSettings, ModelSlot, load_version
from mlflow_fullmodel.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH

served = load_version(path, ("m", "1", "d", "f"), GuardSettings(DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH))
access = logging.getLogger(ACCESS_LOGGER)  # as the server logs it, into /dev/null
access.addHandler(logging.StreamHandler(open(os.devnull, "w")))
access.setLevel(logging.INFO)
access.propagate = False
slot = ModelSlot()
slot.swap(served)
apps = {"scoring app": served.app.app, "+ Guard": served.app, "+ Operations, --no-metrics": Operations(slot, None),
        "+ Operations, metrics": Operations(slot, ServerMetrics())}
body = json.dumps({"dataframe_records": [{"text": "kaba lode mifi suhu teja"}]}).encode()
scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

async def call(app):
    sent = False
    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
    async def send(message):
        pass
    await app(dict(scope), receive, send)

async def main():
    for app in apps.values():
        for _ in range(50):
            await call(app)
    gc.collect()
    gc.freeze()
    times = {name: [] for name in apps}
    for block in range(blocks):
        for name, app in (list(apps.items()) if block % 2 == 0 else list(apps.items())[::-1]):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(200):
                await call(app)
            times[name].append(((time.perf_counter() - wall) / 200 * 1e6, (time.process_time() - cpu) / 200 * 1e6))
    print(json.dumps({name: [statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)]
                      for name, ts in times.items()}))

asyncio.run(main())
"""


def asgi_layers(size: str, blocks: int = 16) -> list[list[object]]:
    """Microseconds per single-row request (wall and process CPU, median of ``blocks``) through
    each layer of the app `mlflow-fullmodel serve` runs, in a process of its own."""
    result = subprocess.run([sys.executable, "-c", LAYERS_CHILD, saved_models(size)["fullmodel"], str(blocks)],
                            capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    if result.returncode != 0:
        raise RuntimeError(f"the in-process layer timing failed:\n{result.stderr[-3000:]}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    base_wall, base_cpu = timings["scoring app"]
    return [[size, layer, f"{wall:.0f}", f"{wall - base_wall:+.0f}", f"{cpu:.0f}", f"{cpu - base_cpu:+.0f}"]
            for layer, (wall, cpu) in timings.items()]


LAYERS_HEADER = ["model", "app", "wall us/request", "vs scoring app", "CPU us/request", "vs scoring app"]


# -- 2. the first request after ready ----------------------------------------------------------------


FIRST_HEADER = ["server", "run", "launch to ready s", "first request ms", "same request later ms (median of 5)",
                "steady p50 ms", "first / p50", "first / same later"]


async def _first_requests(server: Server, path: str, steady: int, first_body: bytes, bodies: list[bytes],
                          ) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        ready = await wait_ready(session, server, path)

        async def timed(body: bytes) -> float:
            started_at = time.perf_counter()
            async with session.post(f"{server.url}/invocations", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            return time.perf_counter() - started_at

        first = await timed(first_body)
        rng = random.Random(3)
        latencies = [await timed(rng.choice(bodies)) for _ in range(steady)]
        same = [await timed(first_body) for _ in range(5)]
        return {"ready_s": ready - server.launched, "first": first * 1000, "same": statistics.median(same) * 1000,
                "p50": percentile(latencies, 50) * 1000}


def first_request(size: str, repeats: int = 3, steady: int = 200) -> list[list[object]]:
    path = saved_models(size)["fullmodel"]
    bodies = bodies_of()
    # A text of about median length (the texts have 3 to 120 words), the same first request every time.
    first_body = json.dumps({"dataframe_records": [{"text": " ".join(texts(1, seed=77)[0].split()[:60])}]}).encode()
    rows = []
    results: dict[str, list[dict[str, float]]] = {"mlflow-fullmodel serve": [], "mlflow models serve": []}
    for run in range(repeats):
        order = list(results) if run % 2 == 0 else list(results)[::-1]
        for name in order:
            kind, ready_path = ("fullmodel", "/ready") if name == "mlflow-fullmodel serve" else ("mlflow", "/ping")
            server = launch(kind, path)
            try:
                result = asyncio.run(_first_requests(server, ready_path, steady, first_body, bodies))
            finally:
                stop(server)
            results[name].append(result)
            rows.append([f"{name} ({size})", run + 1, f"{result['ready_s']:.1f}", f"{result['first']:.1f}",
                         f"{result['same']:.1f}", f"{result['p50']:.1f}", f"{result['first'] / result['p50']:.2f}",
                         f"{result['first'] / result['same']:.2f}"])
    rows.sort(key=lambda row: (row[0], row[1]))
    return rows


# -- 3. an alias rollout under load ------------------------------------------------------------------


@dataclass
class Answer:
    started: float
    ended: float
    status: int
    version: str
    body: int
    text: str

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class SwapRun:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    moved_to_2: float = 0.0
    first_from_2: float = 0.0
    moved_to_3: float = 0.0
    refused_seen: float = 0.0


REFUSED = re.compile(r'^mlflow_fullmodel_rollouts_total\{result="refused"\} ([0-9.]+)$', re.M)


def _registered_versions(size: str, store: Path, name: str) -> None:
    """Versions 1, 2 (other weights) and 3 (tampered after logging) of ``name``; alias live on 1."""
    import mlflow
    import torch

    import mlflow_fullmodel as fm
    from benchmarks.models import Medium, Subject, Tiny

    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("rollout", artifact_location=(store / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    subject = subject_of(size)
    example = texts(4, seed=9)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = fm.script({"tiny": Tiny, "medium": Medium}[size]())
        model = Subject(subject.name, subject.folder, subject.spm, net).fullmodel
        with mlflow.start_run():
            info = fm.log_model(model, name="model", input_example=example, registered_model_name=name)
    client = mlflow.MlflowClient()
    # Version 3: a byte of its tokenizer changed in the artifact store, after logging.
    logged = client.get_logged_model(info.model_id)
    spm = next(Path(logged.artifact_location.removeprefix("file://")).rglob("spm.model"))
    data = bytearray(spm.read_bytes())
    data[len(data) // 2] ^= 0x01
    spm.write_bytes(bytes(data))
    client.set_registered_model_alias(name, "live", "1")


async def _swap_load(server: Server, name: str, bodies: list[bytes], clients: int, baseline_s: float,
                     settle_s: float) -> SwapRun:
    import mlflow

    run = SwapRun()
    done = asyncio.Event()
    client = mlflow.MlflowClient()

    def move(version: str) -> float:
        client.set_registered_model_alias(name, "live", version)
        return time.perf_counter()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 1),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await wait_ready(session, server, "/ready")

        async def loader(seed: int) -> None:
            rng = random.Random(seed)
            while not done.is_set():
                index = rng.randrange(len(bodies))
                started_at = time.perf_counter()
                try:
                    async with session.post(f"{server.url}/invocations", data=bodies[index],
                                            headers={"Content-Type": "application/json"}) as response:
                        text = await response.text()
                        answer = Answer(started_at, time.perf_counter(), response.status,
                                        response.headers.get("X-Model-Version", ""), index, text)
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    run.errors.append(f"{type(error).__name__}: {error}")
                    continue
                run.answers.append(answer)
                if answer.status != 200:
                    run.errors.append(f"HTTP {answer.status}: {text[:200]}")
                elif answer.version == "2" and not run.first_from_2:
                    run.first_from_2 = answer.ended

        async def refused_count() -> float:
            async with session.get(f"{server.url}/metrics") as response:
                found = REFUSED.search(await response.text())
                return float(found.group(1)) if found else 0.0

        async def conductor() -> None:
            try:
                await asyncio.sleep(baseline_s)
                run.moved_to_2 = await asyncio.to_thread(move, "2")
                deadline = time.perf_counter() + 240
                while not run.first_from_2 and time.perf_counter() < deadline:
                    await asyncio.sleep(0.05)
                if not run.first_from_2:
                    raise RuntimeError(f"no answer from version 2 in 240 s:\n{server.log_tail()}")
                await asyncio.sleep(settle_s)
                run.moved_to_3 = await asyncio.to_thread(move, "3")
                while await refused_count() < 1 and time.perf_counter() < run.moved_to_3 + 240:
                    await asyncio.sleep(0.1)
                if await refused_count() < 1:
                    raise RuntimeError(f"version 3 was not refused in 240 s:\n{server.log_tail()}")
                run.refused_seen = time.perf_counter()
                await asyncio.sleep(settle_s)
            finally:
                done.set()

        await asyncio.gather(conductor(), *(loader(i) for i in range(clients)))
    return run


SWAP_HEADER = ["model", "requests", "failed", "answers by version", "same body, same version: one answer",
               "v1 and v2 answer differently", "alias move -> first v2 answer s", "alias move -> v3 refused s",
               "p50 / p99 / max ms outside the swaps", "p50 / p99 ms in the swaps", "longest request in the swaps ms"]


def swap(size: str, clients: int = 8, baseline_s: float = 8.0, settle_s: float = 5.0,
         poll_s: str = "1") -> tuple[list[list[object]], str]:
    name = f"rollout-{size}"
    bodies = bodies_of(100, seed=21)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-", dir=str(WORKDIR)) as folder:
        store = Path(folder)
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
               "MLFLOW_REGISTRY_URI": f"sqlite:///{store / 'mlflow.db'}"}
        # In a process of its own: logging the versions leaves MLflow's tracking state set.
        register = ("import sys; from pathlib import Path; from benchmarks import bench_operations; "
                    "bench_operations._registered_versions(sys.argv[1], Path(sys.argv[2]), sys.argv[3])")
        child = subprocess.run([sys.executable, "-c", register, size, folder, name],
                               cwd=str(Path(__file__).resolve().parent.parent), env={**os.environ, **env},
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"registering the versions failed:\n{child.stderr[-3000:]}")
        os.environ.update(env)  # this process moves the alias
        server = launch("fullmodel", f"models:/{name}@live", "--follow-alias", "--poll-s", poll_s, env=env)
        try:
            gc.collect()
            gc.freeze()
            run = asyncio.run(_swap_load(server, name, bodies, clients, baseline_s, settle_s))
            log = server.log_tail(6000)
        finally:
            stop(server)
            gc.unfreeze()
            for key in env:
                os.environ.pop(key, None)
    windows = [(run.moved_to_2, run.first_from_2 + 1.0), (run.moved_to_3, run.refused_seen + 1.0)]

    def in_window(a: Answer) -> bool:
        return any(a.started < end and a.ended > begin for begin, end in windows)

    inside = [a.seconds * 1000 for a in run.answers if in_window(a)]
    outside = [a.seconds * 1000 for a in run.answers if not in_window(a)]
    by_version: dict[str, int] = {}
    answers: dict[tuple[int, str], set[str]] = {}
    for a in run.answers:
        by_version[a.version] = by_version.get(a.version, 0) + 1
        if a.status == 200:
            answers.setdefault((a.body, a.version), set()).add(a.text)
    consistent = all(len(texts_) == 1 for texts_ in answers.values())
    both = [b for b in range(len(bodies)) if (b, "1") in answers and (b, "2") in answers]
    differ = sum(answers[(b, "1")] != answers[(b, "2")] for b in both)
    after_3 = {a.version for a in run.answers if a.started > run.moved_to_3}
    versions = ", ".join(f"v{k}: {v}" for k, v in sorted(by_version.items()))
    row = [size, len(run.answers) + sum(1 for e in run.errors if not e.startswith("HTTP")), len(run.errors),
           f"{versions} (after the move to 3: {', '.join(sorted(after_3))})",
           "yes" if consistent else "NO", f"{differ} of {len(both)} texts",
           f"{run.first_from_2 - run.moved_to_2:.1f}", f"{run.refused_seen - run.moved_to_3:.1f}",
           f"{percentile(outside, 50):.1f} / {percentile(outside, 99):.1f} / {max(outside):.1f}",
           f"{percentile(inside, 50):.1f} / {percentile(inside, 99):.1f}", f"{max(inside):.1f}"]
    if run.errors:
        print("Errors:", *run.errors[:10], sep="\n  ", file=sys.stderr)
    return [row], log


# -- together -----------------------------------------------------------------------------------------


def main(quick: bool = False, only: str | None = None) -> dict[str, list[list[object]]]:
    sizes = ("tiny",) if quick else ("medium", "tiny")
    tables: dict[str, list[list[object]]] = {}
    if only in (None, "cost"):
        tables["pieces"] = [[mode, f"{p['record']:.1f}", f"{p['observe']:.1f}", f"{p['scrape']:.0f}"]
                            for mode, p in piece_costs().items()]
        print("\nThe pieces, in-process (us per request, best of 5)")
        print(table(tables["pieces"], PIECES_HEADER))
        tables["layers"] = asgi_layers("tiny", blocks=4 if quick else 16)
        print("\nOne request at a time through each layer of the app, in-process (median of blocks of 200)")
        print(table(tables["layers"], LAYERS_HEADER))
        tables["cost"] = [row for size in sizes
                          for row in metrics_cost(size, rounds=2 if quick else {"medium": 8}.get(size, 6),
                                                  scale=0.25 if quick else 1.0)]
        print("\nThe metrics' cost: mlflow-fullmodel serve with and without --no-metrics (and mlflow models serve), "
              "single-row requests; ratios per round, median [range]")
        print(table(tables["cost"], COST_HEADER))
    if only in (None, "first"):
        tables["first"] = first_request(sizes[0], repeats=1 if quick else 3, steady=50 if quick else 200)
        print("\nThe first request after ready, against the steady p50 (a fresh server each run)")
        print(table(tables["first"], FIRST_HEADER))
    if only in (None, "swap"):
        rows, log = swap(sizes[0], baseline_s=3.0 if quick else 8.0, settle_s=2.0 if quick else 5.0)
        tables["swap"] = rows
        print("\nAn alias rollout under load (8 clients, --poll-s 1): 1 -> 2, then 2 -> 3 (tampered)")
        print(table(rows, SWAP_HEADER))
        lines = [line for line in log.splitlines() if "Alias" in line or "serving" in line or "rolled out" in line]
        print("\nThe server's rollout log:", *lines, sep="\n  ")
    return tables


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each part at a small size, on the tiny model")
    parser.add_argument("--only", choices=["cost", "first", "swap"], help="run one part")
    arguments = parser.parse_args()
    main(arguments.quick, arguments.only)
