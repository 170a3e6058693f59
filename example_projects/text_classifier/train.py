"""Train a review classifier with its own sentencepiece tokenizer and log it as one MLflow model.

The logged model holds the whole data path: ``Normalize`` (this project's code), the sentencepiece
tokenizer trained here (as an artifact), the TorchScript classifier and ``TopK`` post-processing.
It is registered, given the alias ``champion``, and can then be served with nothing of this
project present::

    python train.py                       # synthetic reviews; or --data reviews.csv
    mlflow models serve -m models:/text-classifier@champion --env-manager local -p 5001

Run ``python train.py --help`` for the options. ``main(argv)`` returns a summary dict, so the
script can also be driven in-process (tests do).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import mlflow
import sentencepiece
import torch
from data import LABELS, DataError, read_csv, split, synthetic_reviews
from mlflow import MlflowClient
from model import TextClassifier
from processing import Normalize
from torch import nn
from tqdm import tqdm

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

_logger = logging.getLogger("text_classifier")

# Special ids of the tokenizer: PadCollate pads with 0, so the pad id must be 0.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

EXAMPLE_INPUTS = [
    "What a film!",
    "The plot was DULL and the acting... tedious.",
    "It was okay, nothing special.",
    "The soundtrack was gorgeous but the script was lazy.",
]

#: Option values for --tiny: a run of a few seconds, for tests.
TINY = {"num_examples": 600, "epochs": 10, "vocab_size": 150, "embedding_dim": 32, "hidden_dim": 32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a text classifier with its own sentencepiece tokenizer and log "
        "pre-processing + TorchScript model + post-processing as one MLflow model.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="CSV", help="a CSV file with the columns text,label "
                      "(default: synthetic movie reviews labelled negative/neutral/positive)")
    data.add_argument("--num-examples", type=int, default=3000,
                      help="size of the synthetic corpus (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of the data held out for validation (default: %(default)s)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--vocab-size", type=int, default=600,
                       help="sentencepiece vocabulary size, an upper bound (default: %(default)s)")
    model.add_argument("--max-length", type=int, default=128,
                       help="most tokens kept per text (default: %(default)s)")
    model.add_argument("--embedding-dim", type=int, default=64, help="(default: %(default)s)")
    model.add_argument("--hidden-dim", type=int, default=64, help="(default: %(default)s)")
    model.add_argument("--epochs", type=int, default=8, help="(default: %(default)s)")
    model.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    model.add_argument("--learning-rate", type=float, default=0.005, help="(default: %(default)s)")
    model.add_argument("--seed", type=int, default=0, help="seeds the data, the split and the "
                       "weights (default: %(default)s)")
    model.add_argument("--module-format", choices=["torchscript", "export"], default="torchscript",
                       help="save the network as TorchScript, or as a torch.export program that "
                       "log_model exports from the input example "
                       "(default: %(default)s)")
    model.add_argument("--num-threads", type=int, default=1,
                       help="torch CPU threads while training; a model this small trains fastest "
                       "on one, and more only contend with other processes (default: %(default)s)")
    model.add_argument("--tiny", action="store_true",
                       help="a few seconds' run for tests: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlflow.db "
                          "(default: MLFLOW_TRACKING_URI, else MLflow's default)")
    tracking.add_argument("--experiment", default="text-classifier",
                          help="MLflow experiment name (default: %(default)s)")
    tracking.add_argument("--registered-model-name", default="text-classifier",
                          help="register the model under this name and point the alias at the "
                          "new version; '' to skip registration (default: %(default)s)")
    tracking.add_argument("--alias", default="champion", help="(default: %(default)s)")
    tracking.add_argument("--port", type=int, default=5001,
                          help="port shown in the serving instructions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    positive = ("num_examples", "vocab_size", "max_length", "embedding_dim", "hidden_dim", "epochs",
                "batch_size", "num_threads")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be between 0 and 1")
    return args


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_prefix: str) -> str:
    """Train a sentencepiece model on ``texts`` (already normalised); return the ``.model`` path."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def encode(texts: Sequence[str], steps: Sequence[fm.Transform]) -> list[torch.Tensor]:
    """Apply the model's own pre-processing steps to each text: training sees exactly what the
    logged model will compute at serving time."""
    encoded = []
    for text in texts:
        value: Any = text
        for step in steps:
            value = step(value)
        encoded.append(value)
    return encoded


def batches(
    examples: Sequence[torch.Tensor],
    targets: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(ids, lengths, targets)`` batches, shuffled when ``generator`` is given, padded by
    the same ``PadCollate`` the logged model uses."""
    collate = fm.PadCollate(pad_value=PAD_ID)
    if generator is not None:
        order = torch.randperm(len(examples), generator=generator)
    else:
        order = torch.arange(len(examples))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size].tolist()
        batch = collate([examples[i] for i in index])
        yield batch.inputs, batch.lengths, targets[index]


def accuracy(
    net: nn.Module, examples: Sequence[torch.Tensor], targets: torch.Tensor, batch_size: int
) -> float:
    net.eval()
    correct = 0
    with torch.inference_mode():
        for ids, lengths, y in batches(examples, targets, batch_size, None):
            correct += int((net(ids, lengths).argmax(dim=1) == y).sum())
    return correct / len(examples)


def fit(
    net: nn.Module,
    train: tuple[list[torch.Tensor], torch.Tensor],
    val: tuple[list[torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
) -> float:
    """Train ``net`` and log the loss and validation accuracy of each epoch; return the last
    validation accuracy."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    val_accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        net.train()
        total, count = 0.0, 0
        progress = tqdm(batches(train[0], train[1], args.batch_size, generator), desc=f"epoch {epoch}",
                        total=-(-len(train[0]) // args.batch_size), unit="batch", leave=False, disable=None)
        for ids, lengths, y in progress:
            optimizer.zero_grad()
            loss = loss_fn(net(ids, lengths), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        train_loss = total / count
        val_accuracy = accuracy(net, val[0], val[1], args.batch_size)
        mlflow.log_metrics({"train_loss": train_loss, "val_accuracy": val_accuracy}, step=epoch)
        _logger.info("epoch %d/%d: train loss %.4f, validation accuracy %.3f",
                     epoch, args.epochs, train_loss, val_accuracy)
    return val_accuracy


def compile_module(net: nn.Module, module_format: str) -> Any:
    """The trained network in a form that travels without its Python class: TorchScript, or the
    network itself, which log_model exports with torch.export from the input example (batch and
    text length dynamic)."""
    if module_format == "torchscript":
        return fm.script(net)  # fm.script keeps torch.jit's deprecation notice quiet
    return net.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, log, register and alias the model.

    Returns:
        ``run_id``; ``model_uri`` (the logged model); ``registered_model_uri``
        (``models:/<name>@<alias>``, None without registration); ``version`` (None without
        registration); ``val_accuracy``; ``labels``; ``vocab_size`` (the tokenizer's real size);
        ``train_seconds``; ``tracking_uri``.
    """
    args = parse_args(argv)
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    tracking_uri = mlflow.get_tracking_uri()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    if args.data:
        texts, labels_of = read_csv(args.data)
        source = os.path.abspath(args.data)
    else:
        texts, labels_of = synthetic_reviews(args.num_examples, seed=args.seed)
        source = f"synthetic(num_examples={args.num_examples}, seed={args.seed})"
    labels = sorted(set(labels_of)) if args.data else list(LABELS)
    (train_texts, train_labels), (val_texts, val_labels) = split(
        texts, labels_of, args.validation_fraction, args.seed
    )
    _logger.info("data: %s; %d training and %d validation examples, labels %s",
                 source, len(train_texts), len(val_texts), labels)

    mlflow.set_experiment(args.experiment)
    with tempfile.TemporaryDirectory(prefix="text-classifier-") as workdir, mlflow.start_run() as run:
        started = time.perf_counter()
        normalize = Normalize()
        # The tokenizer learns from the training split only, normalised as the model will do it.
        spm_path = train_tokenizer([normalize(t) for t in train_texts], args.vocab_size,
                                   os.path.join(workdir, "spm"))
        tokenizer = SentencePieceEncode(fm.Artifact(spm_path), max_length=args.max_length)
        preprocess = [normalize, tokenizer]
        vocab_size = sentencepiece.SentencePieceProcessor(model_file=spm_path).get_piece_size()
        _logger.info("sentencepiece tokenizer: %d pieces (asked for %d)", vocab_size, args.vocab_size)

        label_index = {label: i for i, label in enumerate(labels)}
        train = (encode(train_texts, preprocess), torch.tensor([label_index[x] for x in train_labels]))
        val = (encode(val_texts, preprocess), torch.tensor([label_index[x] for x in val_labels]))

        net = TextClassifier(vocab_size, len(labels), args.embedding_dim, args.hidden_dim, pad_id=PAD_ID)
        mlflow.log_params({
            "data": source, "num_train": len(train_texts), "num_validation": len(val_texts),
            "labels": ",".join(labels), "vocab_size_requested": args.vocab_size,
            "vocab_size": vocab_size, "max_length": args.max_length,
            "embedding_dim": args.embedding_dim, "hidden_dim": args.hidden_dim, "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "seed": args.seed,
            "num_threads": args.num_threads,
        })
        threads = torch.get_num_threads()
        torch.set_num_threads(args.num_threads)
        try:
            val_accuracy = fit(net, train, val, args)
        finally:
            torch.set_num_threads(threads)
        train_seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", train_seconds)
        _logger.info("trained in %.1f s; validation accuracy %.3f (chance %.3f)",
                     train_seconds, val_accuracy, 1 / len(labels))

        model = fm.FullModel(
            preprocess=preprocess,
            module=compile_module(net, args.module_format),
            postprocess=[TopK(labels=labels, k=fm.Param(1, minimum=1, maximum=len(labels)))],
            collate=fm.PadCollate(pad_value=PAD_ID),
        )
        _logger.info("logging %r", model)
        # log_model reloads the model in a clean process and checks it reproduces these examples.
        info = fm.log_model(
            model,
            name="model",
            input_example=EXAMPLE_INPUTS,
            registered_model_name=args.registered_model_name or None,
        )

    version = info.registered_model_version
    registered_uri = None
    if args.registered_model_name:
        MlflowClient().set_registered_model_alias(args.registered_model_name, args.alias, version)
        registered_uri = f"models:/{args.registered_model_name}@{args.alias}"
        _logger.info("registered %s version %s as %s", args.registered_model_name, version, registered_uri)

    serve_uri = registered_uri or info.model_uri
    print(f"\nServe the model (pre-processing, tokenizer, network and top-k in one):\n"
          f"  MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {serve_uri} "
          f"--env-manager local -p {args.port}\n"
          f"Then score raw text:\n"
          f"  curl -s localhost:{args.port}/invocations -H 'Content-Type: application/json' "
          f"-d '{{\"dataframe_records\": [{{\"text\": \"What a film!\"}}], \"params\": {{\"k\": 2}}}}'")
    return {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "registered_model_uri": registered_uri,
        "version": version,
        "val_accuracy": val_accuracy,
        "labels": labels,
        "vocab_size": vocab_size,
        "train_seconds": train_seconds,
        "tracking_uri": tracking_uri,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
