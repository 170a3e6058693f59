"""The main job, end to end: train each example project, log and register it on the local MLflow
store, serve the `champion` alias with `mlflow models serve`, send a request and print the answer.

    python example_projects/demo.py        (or: make demo)

Runs against MLFLOW_TRACKING_URI, by default sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def digit_png_base64(index: int = 0) -> tuple[str, str]:
    """One of scikit-learn's bundled digits as a base64 PNG (as a JSON request carries images),
    and its true label."""
    sys.path.insert(0, str(HERE / "image_classifier"))
    try:
        from digits import load_pngs
    finally:
        sys.path.pop(0)
    images, labels = load_pngs()
    return base64.b64encode(images[index]).decode("ascii"), labels[index]


def examples() -> list[tuple[str, str, dict]]:
    """Each example: its folder, its registered model name, and one request for it."""
    image, label = digit_png_base64(0)
    logger.info("The image request sends a handwritten %s.", label)
    return [
        ("text_classifier", "text-classifier",
         {"dataframe_records": [{"text": "What a wonderful, brilliant film!"}, {"text": "Dull and boring."}],
          "params": {"k": 2}}),
        ("image_classifier", "image-classifier",
         {"dataframe_records": [{"image": image}], "params": {"tta": 16, "seed": 1, "k": 3}}),
        ("translator", "translator",
         {"dataframe_records": [{"source": "1,234"}, {"source": "42"}], "params": {"n_best": 3}}),
    ]


logger = logging.getLogger("demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("mlflow models serve exited early; see its output above")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def run_example(folder: str, registered_name: str, payload: dict, env: dict[str, str]) -> None:
    logger.info("Training %s ...", folder)
    subprocess.run([sys.executable, str(HERE / folder / "train.py"), "--registered-model-name", registered_name],
                   env=env, check=True)
    port = free_port()
    uri = f"models:/{registered_name}@champion"
    logger.info("Serving %s on 127.0.0.1:%d ...", uri, port)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        answer = post(f"http://127.0.0.1:{port}/invocations", payload)
        shown = json.dumps(payload)
        shown = shown if len(shown) < 300 else shown[:150] + " ... " + shown[-100:]
        print(f"\n{folder}: POST /invocations {shown}")
        print(json.dumps(answer, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    # `mlflow models serve --env-manager local` starts uvicorn from PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if not sys.stdout.isatty():
        # MLflow draws its artifact download bar even when the output is a file.
        env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for folder, registered_name, payload in examples():
        run_example(folder, registered_name, payload, env)


if __name__ == "__main__":
    main()
