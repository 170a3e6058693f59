"""Train a digits -> words translator with two sentencepiece tokenizers and log it, with its beam
search, as one MLflow model.

The logged model holds the whole data path: ``NormalizeNumber`` (this project's code), the source
tokenizer, the TorchScript encoder-decoder, beam search (``beam_size``, ``n_best``, ``max_length``
and ``length_penalty`` as runtime parameters) and the target tokenizer that turns token ids back into
words. It is registered, given the alias ``champion``, and can then be served with nothing of this
project present::

    python train.py
    mlflow models serve -m models:/translator@champion --env-manager local -p 5002

Run ``python train.py --help`` for the options. ``main(argv)`` returns a summary dict, so the
script can also be driven in-process.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import mlflow
import sentencepiece
import torch
from data import parallel_corpus, split
from mlflow import MlflowClient
from model import Translator, entry_points
from processing import NormalizeNumber
from torch import nn
from tqdm import tqdm

import mlflow_fullmodel as fm
from mlflow_fullmodel.decoding import BeamSearch, GreedySearch
from mlflow_fullmodel.transforms import SentencePieceDecode, SentencePieceEncode

_logger = logging.getLogger("translator")

# Special ids of both tokenizers: PadCollate pads with 0, so the pad id must be 0.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

#: The input column of the logged model.
INPUT_COLUMN = "source"

EXAMPLE_INPUTS = ["7", "42", "1,234", "8 020"]
#: The most source tokens kept.
SOURCE_MAX_LENGTH = 32

#: Option values for --tiny: a run of a few seconds, for tests.
TINY = {"num_examples": 1500, "epochs": 6}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a digits -> words translator with source and target sentencepiece "
        "tokenizers and log pre-processing + TorchScript encoder-decoder + beam search + "
        "detokenisation as one MLflow model.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--num-examples", type=int, default=6000,
                      help="number of distinct numbers in the generated corpus (default: %(default)s)")
    data.add_argument("--max-number", type=int, default=9999,
                      help="largest number of the corpus, at most 999999 (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the corpus held out for validation (default: %(default)s)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--source-vocab-size", type=int, default=32,
                       help="source sentencepiece vocabulary size, an upper bound (default: %(default)s)")
    model.add_argument("--target-vocab-size", type=int, default=64,
                       help="target sentencepiece vocabulary size, an upper bound (default: %(default)s)")
    model.add_argument("--embedding-dim", type=int, default=32, help="(default: %(default)s)")
    model.add_argument("--hidden-dim", type=int, default=64, help="(default: %(default)s)")
    model.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    model.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    model.add_argument("--learning-rate", type=float, default=0.005, help="(default: %(default)s)")
    model.add_argument("--beam-size", type=int, default=4,
                       help="beam width saved with the model; requests may override it (default: %(default)s)")
    model.add_argument("--module-format", choices=["torchscript", "export"], default="torchscript",
                       help="save the network as TorchScript (one module with encode and decode_step), or "
                       "as two torch.export programs, encoder and decoder, that log_model exports from "
                       "the input example (default: %(default)s)")
    model.add_argument("--seed", type=int, default=0, help="seeds the data, the split and the "
                       "weights (default: %(default)s)")
    model.add_argument("--num-threads", type=int, default=1,
                       help="torch CPU threads while training; a model this small trains fastest "
                       "on one, and more only contend with other processes (default: %(default)s)")
    model.add_argument("--tiny", action="store_true",
                       help="a few seconds' run for tests: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlflow.db "
                          "(default: MLFLOW_TRACKING_URI, else MLflow's default)")
    tracking.add_argument("--experiment", default="translator",
                          help="MLflow experiment name (default: %(default)s)")
    tracking.add_argument("--registered-model-name", default="translator",
                          help="register the model under this name and point the alias at the "
                          "new version; '' to skip registration (default: %(default)s)")
    tracking.add_argument("--alias", default="champion", help="(default: %(default)s)")
    tracking.add_argument("--port", type=int, default=5002,
                          help="port shown in the serving instructions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    positive = ("num_examples", "source_vocab_size", "target_vocab_size", "embedding_dim", "hidden_dim",
                "epochs", "batch_size", "beam_size", "num_threads")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 9 <= args.max_number <= 999_999:
        parser.error("--max-number must be from 9 to 999999")
    if args.num_examples > args.max_number + 1:
        parser.error(f"--num-examples must be at most --max-number + 1 = {args.max_number + 1} "
                     "(the numbers are distinct)")
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be between 0 and 1")
    return args


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_prefix: str, split_digits: bool = False) -> str:
    """Train a sentencepiece model on ``texts``; return the ``.model`` path."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        split_digits=split_digits,  # one piece per digit: "1234" and "1243" share their pieces
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
    sources: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    batch_size: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(src, lengths, target_in, target_out)``, shuffled when ``generator`` is given.

    ``targets`` end with EOS; ``target_in`` is BOS followed by the target shifted one step right,
    so the decoder learns to predict each next token, EOS included (the EOS that reaches
    ``target_in`` sits where ``target_out`` is padding, which the loss ignores). Both sides are
    padded by the same ``PadCollate`` the logged model uses."""
    collate = fm.PadCollate(pad_value=PAD_ID)
    if generator is not None:
        order = torch.randperm(len(sources), generator=generator)
    else:
        order = torch.arange(len(sources))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size].tolist()
        source = collate([sources[i] for i in index])
        target_out = collate([targets[i] for i in index]).inputs
        bos = torch.full((len(index), 1), BOS_ID, dtype=torch.long)
        target_in = torch.cat([bos, target_out[:, :-1]], dim=1)
        yield source.inputs, source.lengths, target_in, target_out


def mean_loss(
    net: nn.Module, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], batch_size: int
) -> float:
    """The cross-entropy per target token (EOS included), with teacher forcing."""
    net.eval()
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_ID, reduction="sum")
    total, count = 0.0, 0
    with torch.inference_mode():
        for src, lengths, target_in, target_out in batches(sources, targets, batch_size, None):
            logits = net(src, lengths, target_in)
            total += loss_fn(logits.flatten(0, 1), target_out.flatten()).item()
            count += int((target_out != PAD_ID).sum())
    return total / count


def fit(
    net: nn.Module,
    train: tuple[list[torch.Tensor], list[torch.Tensor]],
    val: tuple[list[torch.Tensor], list[torch.Tensor]],
    args: argparse.Namespace,
) -> float:
    """Train ``net`` with teacher forcing and log the training and validation loss (per target
    token) of each epoch; return the last validation loss."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learning_rate)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_ID)
    val_loss = float("nan")
    for epoch in range(1, args.epochs + 1):
        net.train()
        total, count = 0.0, 0
        progress = tqdm(batches(train[0], train[1], args.batch_size, generator), desc=f"epoch {epoch}",
                        total=-(-len(train[0]) // args.batch_size), unit="batch", leave=False, disable=None)
        for src, lengths, target_in, target_out in progress:
            optimizer.zero_grad()
            loss = loss_fn(net(src, lengths, target_in).flatten(0, 1), target_out.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # recurrent nets: the odd exploding step
            optimizer.step()
            total += loss.item() * len(src)
            count += len(src)
        train_loss = total / count
        val_loss = mean_loss(net, val[0], val[1], args.batch_size)
        mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss}, step=epoch)
        _logger.info("epoch %d/%d: train loss %.4f, validation loss %.4f",
                     epoch, args.epochs, train_loss, val_loss)
    return val_loss


def exact_match(model: fm.FullModel, sources: Sequence[str], references: Sequence[str]) -> float:
    """The share of ``sources`` the model translates exactly into ``references``, through the
    model's whole data path (pre-processing, decoding, detokenisation), as served."""
    translations = model.predict(list(sources))["translation"].tolist()
    return sum(t == r for t, r in zip(translations, references)) / len(references)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, log, register and alias the translator.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None); see ``--help``.

    Returns:
        A dict with ``run_id``; ``model_uri`` (the logged model); ``registered_model_uri``
        (``models:/<name>@<alias>``, None without registration); ``version`` (None without
        registration); ``val_exact_match`` (greedy decoding) and ``val_exact_match_beam`` (beam
        search with the saved defaults); ``source_vocab_size`` and ``target_vocab_size`` (the
        tokenizers' real sizes); ``train_seconds``; ``tracking_uri``.

    Example::

        import train
        result = train.main(["--tiny", "--tracking-uri", "sqlite:///mlflow.db"])
    """
    args = parse_args(argv)
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    tracking_uri = mlflow.get_tracking_uri()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    pairs = parallel_corpus(args.num_examples, args.max_number, seed=args.seed)
    train_pairs, val_pairs = split(pairs, args.validation_fraction)
    _logger.info("data: %d training and %d validation pairs, numbers 0 to %d",
                 len(train_pairs), len(val_pairs), args.max_number)

    mlflow.set_experiment(args.experiment)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    with tempfile.TemporaryDirectory(prefix="translator-") as workdir, mlflow.start_run() as run:
        started = time.perf_counter()
        normalize = NormalizeNumber()
        # Each tokenizer learns from its side of the training split only, the source side
        # normalised as the model will do it.
        source_spm = train_tokenizer([normalize(s) for s, _ in train_pairs], args.source_vocab_size,
                                     os.path.join(workdir, "source"), split_digits=True)
        target_spm = train_tokenizer([t for _, t in train_pairs], args.target_vocab_size,
                                     os.path.join(workdir, "target"))
        preprocess = [normalize, SentencePieceEncode(fm.Artifact(source_spm), max_length=SOURCE_MAX_LENGTH)]
        target_encode = SentencePieceEncode(fm.Artifact(target_spm), max_length=64, add_eos=True)
        source_vocab = sentencepiece.SentencePieceProcessor(model_file=source_spm).get_piece_size()
        target_vocab = sentencepiece.SentencePieceProcessor(model_file=target_spm).get_piece_size()
        _logger.info("tokenizers: %d source and %d target pieces", source_vocab, target_vocab)

        train = (encode([s for s, _ in train_pairs], preprocess),
                 encode([t for _, t in train_pairs], [target_encode]))
        val = (encode([s for s, _ in val_pairs], preprocess), encode([t for _, t in val_pairs], [target_encode]))
        # Room for the longest training target, EOS included, and a little more.
        max_length = max(len(t) for t in train[1]) + 4

        net = Translator(source_vocab, target_vocab, args.embedding_dim, args.hidden_dim, pad_id=PAD_ID)
        mlflow.log_params({
            "num_train": len(train_pairs), "num_validation": len(val_pairs), "max_number": args.max_number,
            "source_vocab_size": source_vocab, "target_vocab_size": target_vocab,
            "embedding_dim": args.embedding_dim, "hidden_dim": args.hidden_dim, "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "beam_size": args.beam_size,
            "max_length": max_length, "seed": args.seed, "num_threads": args.num_threads,
            "module_format": args.module_format,
        })
        try:
            fit(net, train, val, args)
            train_seconds = time.perf_counter() - started
            decode = SentencePieceDecode(fm.Artifact(target_spm))
            common = {"collate": fm.PadCollate(pad_value=PAD_ID), "input_columns": [INPUT_COLUMN]}
            if args.module_format == "torchscript":
                modules: Any = fm.script(net)  # TorchScript, with encode and decode_step exported
                entry = {"encoder": "main.encode", "decoder": "main.decode_step"}
            else:
                modules, entry = entry_points(net), {"encoder": "encoder", "decoder": "decoder"}
                # torch.export fixes a GRU's sequence length: every source is padded to the longest
                # the tokenizer keeps (the encoder never reads past a source's own length).
                common["collate"] = fm.PadCollate(pad_value=PAD_ID, length=SOURCE_MAX_LENGTH)
            model = fm.FullModel(
                preprocess=preprocess,
                module=modules,
                forward=BeamSearch(
                    bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, **entry,
                    beam_size=fm.Param(args.beam_size, minimum=1, maximum=32),
                    n_best=fm.Param(1, minimum=1, maximum=32),
                    max_length=fm.Param(max_length, minimum=1, maximum=256),
                    length_penalty=fm.Param(1.0, minimum=0.0),
                ),
                postprocess=[decode],
                **common,
            )
            greedy = fm.FullModel(
                preprocess, modules, [decode], **common,
                forward=GreedySearch(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_length=max_length, **entry),
            )
            sources, references = [s for s, _ in val_pairs], [t for _, t in val_pairs]
            val_exact_match = exact_match(greedy, sources, references)
            val_exact_match_beam = exact_match(model, sources, references)
        finally:
            torch.set_num_threads(threads)
        mlflow.log_metrics({"train_seconds": train_seconds, "val_exact_match": val_exact_match,
                            "val_exact_match_beam": val_exact_match_beam})
        _logger.info("trained in %.1f s; validation exact match %.3f greedy, %.3f with beam search",
                     train_seconds, val_exact_match, val_exact_match_beam)

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
    print(f"\nServe the model (normalisation, two tokenizers, network and beam search in one):\n"
          f"  MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {serve_uri} "
          f"--env-manager local -p {args.port}\n"
          f"Then translate raw numbers, asking for three candidates:\n"
          f"  curl -s localhost:{args.port}/invocations -H 'Content-Type: application/json' "
          f"-d '{{\"dataframe_records\": [{{\"{INPUT_COLUMN}\": \"1,234\"}}], \"params\": {{\"n_best\": 3}}}}'")
    return {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "registered_model_uri": registered_uri,
        "version": version,
        "val_exact_match": val_exact_match,
        "val_exact_match_beam": val_exact_match_beam,
        "source_vocab_size": source_vocab,
        "target_vocab_size": target_vocab,
        "train_seconds": train_seconds,
        "tracking_uri": tracking_uri,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
