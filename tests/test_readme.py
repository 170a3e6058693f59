"""The README's "Use" section runs as written: its script in a fresh folder with MLflow's default
tracking store, then its serve command and its request against what the script registered."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from servers import free_port, start, stop, wait_for

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    return text[start : re.compile(r"\n##+ ").search(text, start + 1).start()]


def use_section() -> str:
    return section("Use")


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_the_use_section_has_one_script_and_one_serve_and_request_block():
    section = use_section()
    assert len(code_blocks(section, "python")) == 1 and len(code_blocks(section, "bash")) == 1


def test_the_readme_script_trains_logs_and_registers_and_its_serve_command_answers_its_request(tmp_path):
    section = use_section()
    script, = code_blocks(section, "python")
    (tmp_path / "use.py").write_text(script, encoding="utf-8")
    # As a user runs it: a fresh folder, MLflow's default tracking store, nothing of the tests' setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run([sys.executable, "use.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "top_labels" in result.stdout  # the script prints its in-memory answer
    # The picture in the README is the one this model carries.
    picture, = (tmp_path / "mlruns").rglob("pipeline.svg")
    assert picture.read_text() == (README.parent / "docs" / "pipeline.svg").read_text()

    lines = code_blocks(section, "bash")[0].replace("\\\n", " ").splitlines()
    serve = shlex.split(next(line for line in lines if line.startswith("mlflow models serve")))
    curl = shlex.split(next(line for line in lines if line.startswith("curl")))
    port = free_port()
    serve[serve.index("-p") + 1] = str(port)
    process = start([sys.executable, "-m", *serve, "-h", "127.0.0.1", "-w", "1"], env, cwd=tmp_path)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, "the README's mlflow models serve")
        payload = json.loads(curl[curl.index("-d") + 1])
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        prediction, = answer.json()["predictions"]
        assert set(prediction["top_labels"]) == {"negative", "positive"}
        assert prediction["label"] == prediction["top_labels"][0]
    finally:
        stop(process)


def test_the_promote_section_runs_as_written_after_the_demo(tmp_path):
    """Its commands in the order written, from the repository's root (here a folder with the example
    projects) where `make demo` left its store."""
    (tmp_path / "example_projects").symlink_to(README.parent / "example_projects")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # what activating does
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # What `make demo` does for the text example (example_projects/demo.py).
    demo = subprocess.run([sys.executable, "example_projects/text_classifier/train.py", "--registered-model-name",
                           "text-classifier"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-4000:]

    block, = code_blocks(section("Promote a version"), "bash")
    commands = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    assert commands[0] == ". .venv/bin/activate"
    *steps, serve = commands[1:]
    for command in steps:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    assert "Promoted text-classifier version 2 to @champion (it was on version 1)" in result.stdout

    arguments = shlex.split(serve)
    assert arguments[:3] == ["mlflow", "models", "serve"]
    port = free_port()
    arguments[arguments.index("-p") + 1] = str(port)
    process = start([sys.executable, "-m", *arguments, "-h", "127.0.0.1", "-w", "1"], env, cwd=tmp_path)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, "the README's mlflow models serve")
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": ["What a film!"]}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        stop(process)

    # Its audit trail, as written: the promotion above is in it, a dry run records nothing, the
    # rollback goes back to the version the demo made champion.
    block, = code_blocks(section("Audit trail and rollback"), "bash")
    outputs = []
    for command in [line.split("  #")[0].strip() for line in block.splitlines()]:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
        outputs.append(result.stdout)
    assert "Dry run: text-classifier version 1 passes the gate" in outputs[1]
    assert "Rolled back text-classifier version 1 to @champion (it was on version 2)" in outputs[2]
    events = json.loads(outputs[3])
    assert [(e["action"], e["from_version"], e["to_version"], e["result"]) for e in events] == [
        ("rollback", "2", "1", "moved"), ("promote", "1", "2", "moved")]
