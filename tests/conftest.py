"""Shared fixtures: a sentencepiece tokenizer trained here, a TorchScript network, a FullModel, a
real MLflow tracking store and registry, and one `mlflow models serve` process for all HTTP tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
import torch
from sample_steps import LABELS, BagOfIds, Normalize, corpus, train_tokenizer

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

EXAMPLE_TEXTS = ["What a GREAT film!", "Dull  and boring.", "The plot was superb, the actor wonderful"]


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([text for text, _ in corpus(400)], str(folder / "spm"))


#: The special tokens of ``hf_tokenizer_path``, by id: the pad id is not 0, so that padding the
#: ids and padding the attention mask take different values.
HF_SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A WordPiece ``tokenizer.json`` trained here with Hugging Face ``tokenizers`` (lower-casing,
    ``[CLS] text [SEP]`` added), its padding and truncation saved on, as ``Tokenizer.save`` keeps
    them: the steps must replace both."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=HF_SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator([text for text, _ in corpus(400)], trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]", length=40)
    tokenizer.enable_truncation(6)
    path = tmp_path_factory.mktemp("hf-tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def scripted_net() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return fm.script(BagOfIds(vocab_size=64, classes=len(LABELS)))


@pytest.fixture(scope="session")
def text_model(spm_path: str, scripted_net: torch.jit.ScriptModule) -> fm.FullModel:
    return fm.FullModel(
        preprocess=[Normalize(), SentencePieceEncode(fm.Artifact(spm_path), max_length=32)],
        module=scripted_net,
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        batch_size=2,
    )


@pytest.fixture(scope="session")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite tracking store and registry, with artifacts under a temporary folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("tests", artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def registered_reviews(tracking: str, text_model: fm.FullModel) -> mlflow.models.model.ModelInfo:
    """The text model logged, registered as "reviews" and aliased "champion"."""
    with mlflow.start_run():
        info = fm.log_model(
            text_model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name="reviews"
        )
    mlflow.MlflowClient().set_registered_model_alias("reviews", "champion", info.registered_model_version)
    return info


EXAMPLES = Path(__file__).resolve().parents[1] / "example_projects"
#: The registered names of the example models trained once per test session.
TEXT_EXAMPLE, IMAGE_EXAMPLE = "example-text", "example-images"


def train_example(project: str, tracking_uri: str, workdir: Path, *arguments: str) -> str:
    """One tiny training run of an example project, as a user runs it: a script in its own process;
    returns what it printed."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / project / "train.py"), "--tiny", "--tracking-uri", tracking_uri, *arguments],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=""),  # the script must find its own modules by itself
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="session")
def text_example(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The text classifier example, trained once and registered as ``example-text@champion``."""
    stdout = train_example("text_classifier", tracking, tmp_path_factory.mktemp("text_classifier"),
                           "--registered-model-name", TEXT_EXAMPLE)
    assert f"mlflow models serve -m models:/{TEXT_EXAMPLE}@champion" in stdout
    return {"run": latest_run("text-classifier"), "stdout": stdout}


def latest_run(experiment: str) -> mlflow.entities.Run:
    return mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id], order_by=["start_time DESC"]
    )[0]


@pytest.fixture(scope="session")
def image_example(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The image classifier example, trained once: both variants registered as versions of
    ``example-images``, the tta one as champion."""
    stdout = train_example("image_classifier", tracking, tmp_path_factory.mktemp("image_classifier"),
                           "--registered-model-name", IMAGE_EXAMPLE)
    assert f"mlflow models serve -m models:/{IMAGE_EXAMPLE}@champion" in stdout
    client = mlflow.MlflowClient()
    versions = {v.tags["variant"]: v for v in client.search_model_versions(f"name='{IMAGE_EXAMPLE}'")}
    runs = {variant: client.get_run(v.run_id) for variant, v in versions.items()}
    return {"versions": versions, "runs": runs, "stdout": stdout}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, tracking_uri: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow models serve` on loopback and wait until it answers /ping."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **(extra_env or {}))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    process = start(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ping", process, "mlflow models serve")
    return process, url


def stop(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def champion_server(tracking: str, registered_reviews) -> Iterator[str]:
    process, url = serve("models:/reviews@champion", tracking)
    yield url
    stop(process)


def start(command: list[str], env: dict[str, str], cwd: str | Path | None = None) -> subprocess.Popen:
    """Start a server in its own process group, its output in a log file: a pipe nobody reads
    fills up and blocks the server in its next log line."""
    log = tempfile.NamedTemporaryFile(prefix="fullmodel-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log_path = log.name  # type: ignore[attr-defined]
    return process


def server_log(process: subprocess.Popen) -> str:
    with open(process.log_path, errors="replace") as f:  # type: ignore[attr-defined]
        return f.read()[-3000:]


def wait_for(url: str, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    """Wait until ``url`` answers 200, or fail with what ``process`` printed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{server_log(process)}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"{what} did not answer {url} within {seconds:.0f} s")


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own, in a temporary data directory, on loopback only; its
    SQLAlchemy URI. PostgreSQL refuses to run as root, so as root it runs as the postgres user."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("needs PostgreSQL (apt-get install postgresql; .ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="fullmodel-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True, timeout=120)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class TrackingServer:
    url: str
    artifacts: Path  # the server's --artifacts-destination


@pytest.fixture(scope="session")
def tracking_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """A team's tracking server: `mlflow server` on loopback with the PostgreSQL backend store and
    proxied artifacts (clients see mlflow-artifacts: URIs), shared by every test that needs one."""
    folder = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    process = start(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env, cwd=folder,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health", process, "mlflow server", seconds=180)
    yield TrackingServer(url, folder / "artifacts")
    stop(process)


@contextmanager
def tracking_uri(uri: str, experiment: str = "tests") -> Iterator[None]:
    """Point this process's MLflow client at ``uri`` (and its experiment ``experiment``) for a while."""
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
              mlflow.tracking.fluent._get_experiment_id())
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment)
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before[0]
        mlflow.set_tracking_uri(before[1])
        mlflow.set_registry_uri(before[2])
        if before[3] is not None:
            mlflow.set_experiment(experiment_id=before[3])
