"""The tests' own process handling: a server stopped with all its workers, a failed start stopped
too, and a process that escaped its group still found at the session's end."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from servers import free_port, leftover_processes, start, stop, wait_for

#: A "server" that starts a worker in its own process group, like uvicorn's supervisor and workers.
WITH_A_WORKER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"


def descendants() -> set[int]:
    return {pid for pid, _ in leftover_processes()}


def test_stop_ends_the_server_and_every_worker_of_its_group():
    before = descendants()
    process = start([sys.executable, "-c", WITH_A_WORKER], dict(os.environ))
    deadline = time.monotonic() + 60
    while len(descendants() - before) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(descendants() - before) == 2
    stop(process)
    assert descendants() - before == set()


def test_a_server_that_never_answers_is_stopped_when_the_wait_gives_up():
    before = descendants()
    process = start([sys.executable, "-c", WITH_A_WORKER], dict(os.environ))
    with pytest.raises(RuntimeError, match="did not answer"):
        wait_for(f"http://127.0.0.1:{free_port()}/ping", process, "the sleeper", seconds=2)
    assert process.poll() is not None
    assert descendants() - before == set()


def test_a_server_that_exits_at_start_fails_the_wait_with_its_output():
    process = start([sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"], dict(os.environ))
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*cannot bind"):
        wait_for(f"http://127.0.0.1:{free_port()}/ping", process, "the failing server", seconds=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreapers are Linux's")
def test_a_process_that_left_its_group_and_lost_its_parent_is_still_found():
    # A worker that made a session of its own, orphaned: without the subreaper (conftest) it
    # would belong to init, invisible to the check at the end of the run.
    escape = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
              "start_new_session=True)")
    subprocess.run([sys.executable, "-c", escape], check=True, timeout=60)
    orphans = [pid for pid, command in leftover_processes() if "time.sleep(600)" in command]
    assert len(orphans) == 1
    os.kill(orphans[0], 9)
    deadline = time.monotonic() + 30
    while any(pid == orphans[0] for pid, _ in leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(pid != orphans[0] for pid, _ in leftover_processes())


INNER_TEST = '''
import os, sys, time
from servers import start

def test_holds_a_server_until_stopped():
    process = start([sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ))
    with open(os.environ["SERVER_PID_FILE"], "w") as f:
        f.write(str(process.pid))
    time.sleep(600)
'''


def test_a_test_run_stopped_with_sigterm_stops_the_servers_it_started(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pid_file = tmp_path / "server.pid"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SERVER_PID_FILE=str(pid_file), PYTHONPATH=tests)
    # This suite's conftest as a plugin: its SIGTERM handling and its end-of-session check.
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                            "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.2)
        server = int(pid_file.read_text())
        run.send_signal(15)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "KeyboardInterrupt" in output, output
    assert not os.path.exists(f"/proc/{server}") or open(f"/proc/{server}/stat").read().split()[2] == "Z"
