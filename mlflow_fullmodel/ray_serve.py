"""Ray Serve: a deployment that answers as ``mlflow-fullmodel serve`` does, from each of Ray's replicas.

``deployment(model_uri)`` makes a Ray Serve application. The model URI is pinned once, where the
application is made (``models:/name@alias`` becomes ``models:/name/<version>``), so a replica that
Ray starts later, to replace one that died, serves the same version as the others. Each replica
then does what ``mlflow-fullmodel serve`` does before its first request: ``verify_model`` (digest,
manifest, signature, spec, and the parity check in a clean process, which includes the
batch-invariance check), loads the model as MLflow's scoring server does, checks the golden
example with the installed runtime and warms it up (``rollout.load_version``). Ray routes nothing
to a replica before that is done. A request is answered by the same app as under
``mlflow-fullmodel serve``: ``hardened.Guard`` around MLflow's scoring app, so the payloads
(``/invocations`` with ``dataframe_split``, ``dataframe_records``, ``inputs``, ``instances``, CSV),
the answers and the 4xx JSON errors are the same.

Batching: a request whose rows come to one example to run forward (a single-row request) hands that
forward pass to a ``@serve.batch`` method, which runs the examples of concurrent requests as one
forward round (``batching.MicroBatcher``'s round: length-grouped batches, a failing request's rows
run apart). Only the forward pass is shared: each request still parses, pre-processes and
post-processes its own rows. It is safe because a model that answers a row differently inside a
padded batch fails the parity check and never starts; by default it is on where it pays, as under
``mlflow-fullmodel serve``: on a GPU (on two CPU cores it did not, benchmarks/RESULTS.md). Requests
of several rows run their own forward batches, as they do under ``mlflow-fullmodel serve``.

Ray Serve is the optional ``ray`` extra: ``pip install 'mlflow-fullmodel[ray]'``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow_fullmodel.batching import MicroBatcher, _Job
from mlflow_fullmodel.exceptions import ConfigError
from mlflow_fullmodel.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as error:  # pragma: no cover - the extra is installed in CI
    raise ImportError("mlflow_fullmodel.ray_serve needs Ray Serve: pip install 'mlflow-fullmodel[ray]' "
                      f"({error})") from error

__all__ = ["FullModelDeployment", "deployment"]

_logger = logging.getLogger(__name__)

#: How long a request waits for the forward round its example joined before it fails.
_ROUND_TIMEOUT_S = 300.0


def deployment(
    model_uri: str, *, num_replicas: int = 1, public_key: str | None = None, batching: bool | None = None,
    max_batch_size: int | None = None, batch_wait_timeout_s: float = 0.002, max_ongoing_requests: int = 32,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    ray_actor_options: Mapping[str, Any] | None = None, tracking_uri: str | None = None,
) -> Any:
    """A Ray Serve application that serves ``model_uri`` as ``mlflow-fullmodel serve`` does.

    Args:
        model_uri: ``models:/name/version``, ``models:/name@alias`` (pinned here to its version),
            ``runs:/id/name``, a path, ...
        num_replicas: Replicas, each a process with its own verified copy of the model.
        public_key: A PEM public key (its path): each replica serves only a model signed with its
            private half (``sign_model``).
        batching: Share the forward pass of concurrent single-row requests with ``@serve.batch``.
            None (the default): where it pays, as ``mlflow-fullmodel serve`` decides: on a GPU,
            for a model with ``batch_size`` over 1 (on the CPU intra-op threads already spread one
            example over the cores). Safe either way: the parity check every replica runs first
            refuses a model that answers differently inside a padded batch.
        max_batch_size: The most requests in one forward round; None: the model's ``batch_size``.
        batch_wait_timeout_s: How long a round that is not full waits for more requests.
        max_ongoing_requests: The requests Ray sends a replica at once (Ray Serve's own option).
        max_body_bytes: The largest request body a replica reads (``mlflow-fullmodel serve
            --max-body-bytes``).
        max_json_depth: The deepest JSON nesting a replica parses (``--max-json-depth``).
        ray_actor_options: Ray's options for each replica's actor (``num_cpus``, ``runtime_env``, ...).
        tracking_uri: The MLflow tracking server the replicas download from; by default this
            process's (``mlflow.get_tracking_uri()``).

    Returns:
        The application, for ``serve.run(app, ...)``.

    Raises:
        ConfigError: An argument is out of its range.

    Example::

        import ray
        from ray import serve
        from mlflow_fullmodel.ray_serve import deployment

        ray.init(address="local", include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(deployment("models:/reviews@champion", num_replicas=2), name="reviews", route_prefix="/")
        # POST http://127.0.0.1:8000/invocations {"dataframe_records": [{"text": "What a film!"}]}
    """
    import mlflow

    from mlflow_fullmodel.registry import registered_version

    for name, value in (("num_replicas", num_replicas), ("max_ongoing_requests", max_ongoing_requests),
                        ("max_body_bytes", max_body_bytes), ("max_json_depth", max_json_depth)):
        _check_positive(name, value)
    if max_batch_size is not None:
        _check_positive("max_batch_size", max_batch_size)
    if not isinstance(batch_wait_timeout_s, (int, float)) or batch_wait_timeout_s < 0:
        raise ConfigError(f"batch_wait_timeout_s must be a number of seconds >= 0, got {batch_wait_timeout_s!r}.")
    if batching not in (None, True, False):
        raise ConfigError(f"batching must be True, False or None (on a GPU only), got {batching!r}.")
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    version = registered_version(model_uri)
    pinned = f"models:/{version.name}/{version.version}" if version is not None else model_uri
    options: dict[str, Any] = {"num_replicas": num_replicas, "max_ongoing_requests": max_ongoing_requests}
    if ray_actor_options is not None:
        options["ray_actor_options"] = dict(ray_actor_options)
    # @serve.deployment made the class a Deployment, which its type hints do not say.
    made: Any = FullModelDeployment
    return made.options(**options).bind(
        pinned, tracking_uri=tracking_uri, public_key=public_key, batching=batching, max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth)


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}.")


class _RoundsOnTheLoop(MicroBatcher):
    """A ``MicroBatcher`` whose one-example forward passes join the replica's ``@serve.batch``
    rounds: the request's thread (the scoring app runs ``predict`` in one) hands its job to the
    replica's event loop and waits for the round that ran it. Larger forward passes run at once."""

    def __init__(self, model: Any, replica: FullModelDeployment, loop: asyncio.AbstractEventLoop,
                 max_batch_size: int) -> None:
        super().__init__(model, max_batch_size=max_batch_size, timeout_s=_ROUND_TIMEOUT_S)
        self._replica = replica
        self._loop = loop

    def _forward(self, examples: list[Any], values: Mapping[str, Any], deadline: float | None = None) -> list[Any]:
        if len(examples) != 1:
            return self.model._forward_examples(examples, values, deadline)
        job = self._job(examples, values, deadline)
        asyncio.run_coroutine_threadsafe(self._replica._forward_round(job), self._loop).result(self.timeout_s)
        if job.error is not None:
            raise job.error
        return job.outputs


@serve.deployment
class FullModelDeployment:
    """One replica: the verified, loaded, warmed model behind ``hardened.Guard`` and MLflow's
    scoring app. Made with ``deployment()``, which checks its arguments."""

    def __init__(self, model_uri: str, *, tracking_uri: str, public_key: str | None, batching: bool | None,
                 max_batch_size: int | None, batch_wait_timeout_s: float, max_body_bytes: int,
                 max_json_depth: int) -> None:
        from mlflow_fullmodel._mlflow import pyfunc_implementation

        # Loading ends with requests through the app on an event loop of its own (warm_up_app),
        # which cannot run on this replica's loop: it runs in a thread, the replica waiting for it.
        with ThreadPoolExecutor(1, thread_name_prefix="load model") as pool:
            self._served = pool.submit(_load, model_uri, tracking_uri, public_key, max_body_bytes,
                                       max_json_depth).result()
        fullmodel = self._served.model.get_raw_model()
        if batching is None:  # as mlflow-fullmodel serve decides (ServingSettings.batching)
            batching = fullmodel.batch_size > 1 and fullmodel.device.type == "cuda"
        # Forward rounds run in a thread of their own: the loop's default threads are the scoring
        # app's request threads, and each may be waiting for a round.
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward round")
        self._round_sizes: list[int] = []
        self._batcher: _RoundsOnTheLoop | None = None
        if batching:
            size = max_batch_size or fullmodel.batch_size
            self._batcher = _RoundsOnTheLoop(fullmodel, self, asyncio.get_running_loop(), size)
            rounds: Any = self._forward_round  # @serve.batch's handler, typed as the plain method
            rounds.set_max_batch_size(size)
            rounds.set_batch_wait_timeout_s(batch_wait_timeout_s)
            pyfunc_implementation(self._served.model).batcher = self._batcher
        _logger.info("Replica %s ready: version %s of %s (%s), batching %s", os.getpid(), self._served.info[1] or "-",
                     self._served.info[0] or model_uri, self._served.info[2], "on" if batching else "off")

    async def __call__(self, request: Request) -> Response:
        """``POST /invocations`` (and MLflow's ``/ping``, ``/health``, ``/version``), answered by the
        same app as under ``mlflow-fullmodel serve``."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        # Under a route prefix, Ray gives the full path with the prefix as root_path; the app and its
        # guard route on the path below the prefix (/invocations).
        scope = request.scope
        root = scope.get("root_path", "")
        if root and scope["path"].startswith(root):
            scope = {**scope, "path": scope["path"][len(root):] or "/", "root_path": ""}
        await self._served.app(scope, request.receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])
                   if k.lower() != b"content-length"}
        return Response(b"".join(chunks), status_code=int(start.get("status", 500)), headers=headers)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _forward_round(self, jobs: list[_Job]) -> list[None]:
        """The forward pass of concurrent single-row requests, as one round (each job gets its
        outputs or its error)."""
        assert self._batcher is not None
        await asyncio.get_running_loop().run_in_executor(self._forward_thread, self._batcher._run_jobs, jobs)
        self._round_sizes.append(len(jobs))
        return [None] * len(jobs)

    def round_sizes(self) -> dict[str, Any]:
        """This replica's process id and how many requests each of its batched forward rounds
        served, in order (for tests and operators: ``handle.round_sizes.remote()``)."""
        return {"pid": os.getpid(), "sizes": list(self._round_sizes)}

    def __del__(self) -> None:
        served = getattr(self, "_served", None)
        if served is not None and served.download_dir is not None:
            shutil.rmtree(served.download_dir, ignore_errors=True)
        forward_thread = getattr(self, "_forward_thread", None)
        if forward_thread is not None:
            forward_thread.shutdown(wait=False)


def _load(model_uri: str, tracking_uri: str, public_key: str | None, max_body_bytes: int, max_json_depth: int) -> Any:
    """Verify, load and warm the model as ``mlflow-fullmodel serve`` does: a ``ServedVersion``."""
    import mlflow

    from mlflow_fullmodel._mlflow import SERVER_MODEL_PATH_VARIABLE
    from mlflow_fullmodel.registry import registered_version
    from mlflow_fullmodel.rollout import GuardSettings, load_version, module_format
    from mlflow_fullmodel.verification import verify_model

    mlflow.set_tracking_uri(tracking_uri)
    report = verify_model(model_uri, public_key=public_key)
    try:
        version = registered_version(model_uri)
        info = (version.name, str(version.version)) if version is not None else ("", "")
        # As in a scoring server: this process exists to serve the model (threads, tuning).
        os.environ[SERVER_MODEL_PATH_VARIABLE] = report.local_path
        return load_version(report.local_path, (*info, report.digest, module_format(report.local_path)),
                            GuardSettings(max_body_bytes, max_json_depth), report.download_dir)
    except BaseException:
        if report.download_dir is not None:
            shutil.rmtree(report.download_dir, ignore_errors=True)
        raise
