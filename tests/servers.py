"""The servers the tests start (`mlflow models serve`, `mlflow server`, `mlflow-fullmodel serve`):
each in its own process group, on loopback, waited for with a deadline, and always stopped.

Every process started here is remembered until it is stopped, so that ``stop_all`` (the session's
end, an interrupted run, the interpreter's exit) stops what a failed set-up or test left running;
``leftover_processes`` finds any descendant of the test run still alive, whoever started it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

__all__ = ["become_subreaper", "free_port", "leftover_processes", "serve", "serve_fullmodel", "server_log", "serving",
           "start",
           "stop", "stop_all", "wait_for"]

#: The process groups started and not yet stopped, by their leader.
_running: dict[int, subprocess.Popen] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str], cwd: str | Path | None = None) -> subprocess.Popen:
    """Start a server in its own process group, its output in a log file: a pipe nobody reads
    fills up and blocks the server in its next log line."""
    log = tempfile.NamedTemporaryFile(prefix="fullmodel-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    process.log_path = log.name  # type: ignore[attr-defined]
    _running[process.pid] = process
    return process


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop the process and every process of its group (a server's workers), waiting for them."""
    _running.pop(process.pid, None)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # The group outlives its leader when a worker ignores SIGTERM or the leader exited first.
    deadline = time.monotonic() + grace_s
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def stop_all() -> None:
    """Stop every process group started here and not stopped yet."""
    for process in list(_running.values()):
        stop(process, grace_s=5)


atexit.register(stop_all)


def server_log(process: subprocess.Popen, chars: int | None = 3000) -> str:
    """What a server started by ``start`` printed (stdout and stderr): its last ``chars``, or all."""
    with open(process.log_path, errors="replace") as f:  # type: ignore[attr-defined]
        text = f.read()
    return text if chars is None else text[-chars:]


def wait_for(url: str, process: subprocess.Popen, what: str, seconds: float = 180) -> None:
    """Wait until ``url`` answers 200, or stop ``process`` and fail with what it printed.

    On a busy machine a server may be slow to answer, or answer with an error while it starts:
    every request error is retried until the deadline."""
    deadline = time.monotonic() + seconds
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with code {process.returncode}:\n{server_log(process)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{what} did not answer {url} within {seconds:.0f} s:\n{server_log(process)}")
            try:
                if requests.get(url, timeout=min(10.0, max(remaining, 0.1))).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
    except BaseException:
        stop(process)
        raise


def serve(model_uri: str, tracking_uri: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow models serve` on loopback and wait until it answers /ping; stopped if it does not."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **(extra_env or {}))
    # `mlflow models serve --env-manager local` runs uvicorn from PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    process = start(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ping", process, "mlflow models serve")
    return process, url


def serve_fullmodel(model_uri: str, tracking_uri: str, *options: str, seconds: float = 240,
                    extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow-fullmodel serve` on loopback and wait until it is ready (the model verified,
    loaded and warmed up: /ready answers 200); stopped if it is not."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **(extra_env or {}))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    process = start([sys.executable, "-m", "mlflow_fullmodel.cli", "serve", model_uri, "--host", "127.0.0.1",
                     "--port", str(port), *options], env)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ready", process, f"mlflow-fullmodel serve {' '.join(options)}".strip(), seconds=seconds)
    return process, url


@contextmanager
def serving(model_uri: str, tracking_uri: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow models serve` for the length of a ``with`` block; its URL."""
    process, url = serve(model_uri, tracking_uri, extra_env)
    try:
        yield url
    finally:
        stop(process)


def become_subreaper() -> None:
    """Make this process adopt its orphaned descendants (Linux): a server's worker whose parent died
    is then still found by ``leftover_processes`` instead of vanishing under init."""
    if sys.platform.startswith("linux"):
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def leftover_processes(parent: int | None = None) -> list[tuple[int, str]]:
    """The live descendants of ``parent`` (this process), as (pid, command line); zombies are reaped."""
    parent = os.getpid() if parent is None else parent
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[tuple[int, str]] = []
    pending = list(children.get(parent, []))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        if table[pid][0] == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((pid, command.strip()))
    return found


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (a group of zombies is as good as gone)."""
    return any(group == pgid and state != "Z" for state, _, group in _process_table().values())


def _process_table() -> dict[int, tuple[str, int, int]]:
    """Every process of the machine: pid -> (state, parent pid, process group), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        state, ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
        table[int(entry.name)] = (state, int(ppid), int(pgid))
    return table
