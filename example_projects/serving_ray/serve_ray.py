"""Serve a registered fullmodel model with Ray Serve on this machine, score a few texts, and stop.

Starts a local Ray cluster (no dashboard) with Serve's HTTP proxy on loopback, deploys
``mlflow_fullmodel.ray_serve.deployment(model_uri)`` on N replicas (each verifies, loads and warms
the model before Ray sends it a request), sends MLflow ``/invocations`` requests from several
threads at once, prints each answer as a JSON line, and shuts Serve and Ray down. With ``--keep``
it keeps serving until Ctrl-C instead.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import requests
from ray import serve

from mlflow_fullmodel.ray_serve import deployment

TEXTS = ["What a wonderful, brilliant film!", "Dull, boring and far too long.", "It was a film.",
         "The acting was superb but the plot was a mess."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri", help="e.g. models:/text-classifier@champion")
    parser.add_argument("--replicas", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="Serve's HTTP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    args = parser.parse_args(argv)

    port = args.port or free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # batching=True: the four concurrent requests below share forward rounds (on the CPU the
        # default leaves it off, as mlflow-fullmodel serve does).
        serve.run(deployment(args.model_uri, num_replicas=args.replicas, batching=True), name="fullmodel",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}/invocations"
        print(f"Replicas: {args.replicas}, serving {args.model_uri} at {url}", flush=True)

        def score(text: str) -> dict:
            response = requests.post(url, json={"dataframe_records": [{"text": text}], "params": {"k": 2}}, timeout=120)
            response.raise_for_status()
            return {"text": text, **response.json()["predictions"][0]}

        with ThreadPoolExecutor(len(TEXTS)) as pool:  # concurrent single-row requests share forward rounds
            for answer in pool.map(score, TEXTS):
                print(json.dumps(answer), flush=True)
        if args.keep:
            print(f"Serving until Ctrl-C; try:\n  curl -s {url} -H 'Content-Type: application/json' "
                  """-d '{"inputs": ["What a film!"], "params": {"k": 2}}'""", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
