"""Shared fixtures: a sentencepiece tokenizer trained here, a TorchScript network, a FullModel, a
real MLflow tracking store and registry, and one `mlflow models serve` process for all HTTP tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from sample_steps import LABELS, BagOfIds, Normalize, corpus, train_tokenizer
from servers import become_subreaper, free_port, leftover_processes, serve, start, stop, stop_all, wait_for
from support import (
    EXAMPLE_TEXTS,
    HF_SPECIAL_TOKENS,
    IMAGE_EXAMPLE,
    TEXT_EXAMPLE,
    TRANSLATOR_EXAMPLE,
    latest_run,
    train_example,
)

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

#: A tracking store of the run's own for the tests that use no other: MLflow's default,
#: sqlite:///mlflow.db in the working directory, would put a store in the checkout, whose schema
#: is the first MLflow's to write it (the oldest supported MLflow then refuses it).
_SESSION_STORE = tempfile.mkdtemp(prefix="fullmodel-tests-store-")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_STORE}/mlflow.db")
    # A server's worker orphaned by a crash is adopted by this process, so the check at the end finds it.
    become_subreaper()
    # A run stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: fixtures stop their servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker (started with a spawned worker) lives until the interpreter
    exits, by design: end it now, as the interpreter would."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()


@pytest.hookimpl(trylast=True)  # after the session's fixtures have stopped their servers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test run leaves no process behind: whatever is still running now failed to stop in its
    fixture; it is stopped here, and the run fails naming it."""
    stop_all()
    _stop_resource_tracker()
    shutil.rmtree(_SESSION_STORE, ignore_errors=True)
    left = leftover_processes()
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leftover_processes()  # reaps them
    listing = "\n".join(f"  {pid}: {command[:200]}" for pid, command in left)
    session.config.get_terminal_writer().line(f"\nThe test run left {len(left)} process(es) running (now killed):\n"
                                               f"{listing}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([text for text, _ in corpus(400)], str(folder / "spm"))


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


@pytest.fixture(scope="session")
def text_example(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The text classifier example, trained once and registered as ``example-text@champion``."""
    stdout = train_example("text_classifier", tracking, tmp_path_factory.mktemp("text_classifier"),
                           "--registered-model-name", TEXT_EXAMPLE)
    assert f"mlflow models serve -m models:/{TEXT_EXAMPLE}@champion" in stdout
    return {"run": latest_run("text-classifier"), "stdout": stdout}


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


@pytest.fixture(scope="session")
def translator_example(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The translator example, trained once and registered as ``example-translator@champion``."""
    stdout = train_example("translator", tracking, tmp_path_factory.mktemp("translator"),
                           "--registered-model-name", TRANSLATOR_EXAMPLE)
    assert f"mlflow models serve -m models:/{TRANSLATOR_EXAMPLE}@champion" in stdout
    return {"run": latest_run("translator"), "stdout": stdout}


@pytest.fixture(scope="session")
def champion_server(tracking: str, registered_reviews) -> Iterator[str]:
    process, url = serve("models:/reviews@champion", tracking)
    yield url
    stop(process)


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
