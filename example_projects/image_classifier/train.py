"""Train a digit classifier twice, with two pre-processings, and register both as versions of one
MLflow model.

Both variants read PNG files (scikit-learn's digits, rendered by ``digits.py``), decode them to
grayscale and resize them; they differ in how they crop, in training and at inference:

- ``center`` (version 1): the centre crop, one forward pass per image;
- ``tta`` (version 2): random crops while training; at inference ``tta`` random crops per image
  (a request parameter, default 8), chosen by ``seed`` (also a parameter) and the image's content,
  with the class probabilities averaged over the crops (test-time augmentation).

Both normalise with the mean and standard deviation of the training split's pixels, computed here
and saved in each model as ``NormalizeImage`` arguments. ``--preprocessing torchvision`` builds the
same data path from this project's own steps over ``torchvision.transforms.v2.functional``
(``tv_processing.py``, saved with the model as code), keeping mlflow_fullmodel's ``DecodeImage``
and ``RandomCrops``. Each logged model holds its whole data path,
so the registry's two versions answer the same PNG each with its own pre-processing. The ``tta``
version gets the alias ``champion``, the ``center`` version ``challenger``::

    python train.py
    mlflow models serve -m models:/image-classifier@champion --env-manager local -p 5002

Run ``python train.py --help`` for the options. ``main(argv)`` returns a summary dict, so the
script can also be driven in-process.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlflow
import torch
from digits import LABELS, load_pngs, split
from mlflow import MlflowClient
from network import DigitCNN
from torch import nn
from tqdm import tqdm

import mlflow_fullmodel as fm
from mlflow_fullmodel.forward import AverageOverSamples, CallModule
from mlflow_fullmodel.transforms import (
    CenterCrop,
    DecodeImage,
    NormalizeImage,
    RandomCrops,
    Resize,
    TopK,
    ToTensor,
)

_logger = logging.getLogger("image_classifier")

VARIANTS = ("center", "tta")
#: --preprocessing: mlflow_fullmodel's image steps, or this project's over torchvision (tv_processing.py).
PREPROCESSINGS = ("builtin", "torchvision")

#: Option values for --tiny: a run of a few seconds, for tests.
TINY = {"num_examples": 600, "epochs": 8, "batch_size": 32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a digit classifier with two pre-processings (centre crop; random crops "
        "with test-time augmentation) and register both as versions of one MLflow model.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--num-examples", type=int, default=None,
                      help="use this many of scikit-learn's 1,797 digits (default: all)")
    data.add_argument("--render-size", type=int, default=40,
                      help="width and height of the PNG files the digits are rendered to (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of the data held out for validation (default: %(default)s)")
    model = parser.add_argument_group("pre-processing, model and training")
    model.add_argument("--preprocessing", choices=PREPROCESSINGS, default="builtin",
                       help="builtin: mlflow_fullmodel's Resize, CenterCrop, ToTensor and NormalizeImage; "
                       "torchvision: the steps of tv_processing.py, written with torchvision.transforms.v2."
                       "functional (needs torchvision; the saved model lists it) (default: %(default)s)")
    model.add_argument("--module-format", choices=["torchscript", "export"], default="torchscript",
                       help="save the network as TorchScript, or as a torch.export program that log_model "
                       "exports from the input example (default: %(default)s)")
    model.add_argument("--image-size", type=int, default=32,
                       help="Resize: the shorter side of the image (default: %(default)s)")
    model.add_argument("--crop-size", type=int, default=28,
                       help="CenterCrop / RandomCrops: the square the network sees (default: %(default)s)")
    model.add_argument("--tta", type=int, default=8,
                       help="random crops per image at inference, the default of the request "
                       "parameter 'tta' of the tta variant (default: %(default)s)")
    model.add_argument("--width", type=int, default=16, help="channels of the first convolution (default: %(default)s)")
    model.add_argument("--epochs", type=int, default=15, help="(default: %(default)s)")
    model.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    model.add_argument("--learning-rate", type=float, default=0.003, help="(default: %(default)s)")
    model.add_argument("--seed", type=int, default=0, help="seeds the data, the split, the weights "
                       "and the training crops (default: %(default)s)")
    model.add_argument("--num-threads", type=int, default=1,
                       help="torch CPU threads while training; a network this small trains fastest "
                       "on one, and more only contend with other processes (default: %(default)s)")
    model.add_argument("--tiny", action="store_true",
                       help="a few seconds' run for tests: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlflow.db "
                          "(default: MLFLOW_TRACKING_URI, else MLflow's default)")
    tracking.add_argument("--experiment", default="image-classifier",
                          help="MLflow experiment name (default: %(default)s)")
    tracking.add_argument("--registered-model-name", default="image-classifier",
                          help="register both variants as versions of this model and set the "
                          "aliases; '' to skip registration (default: %(default)s)")
    tracking.add_argument("--alias", default="champion",
                          help="alias of the tta version (default: %(default)s)")
    tracking.add_argument("--challenger-alias", default="challenger",
                          help="alias of the center version (default: %(default)s)")
    tracking.add_argument("--port", type=int, default=5002,
                          help="port shown in the serving instructions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    positive = ("render_size", "image_size", "crop_size", "tta", "width", "epochs", "batch_size", "num_threads")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_examples is not None and args.num_examples < 20:
        parser.error("--num-examples must be at least 20")
    if args.crop_size > args.image_size:
        parser.error(f"--crop-size {args.crop_size} is larger than --image-size {args.image_size}")
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be between 0 and 1")
    if args.registered_model_name and args.alias == args.challenger_alias:
        parser.error("--alias and --challenger-alias must differ")
    if args.preprocessing == "torchvision":
        try:
            import tv_processing  # noqa: F401
        except Exception as error:  # a torchvision built for another torch raises RuntimeError
            parser.error(f"--preprocessing torchvision needs torchvision, the release built for torch "
                         f"{torch.__version__} (pip install torchvision): {type(error).__name__}: {error}")
    return args


def apply(steps: Sequence[fm.Transform], value: Any) -> Any:
    """Run ``value`` through ``steps`` with their default parameters: training prepares its inputs
    with the very step objects the logged model holds."""
    for step in steps:
        value = step(value)
    return value


def pixel_statistics(images: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every pixel of ``images`` ``(C, H, W)``."""
    pixels = torch.cat([image.flatten(1) for image in images], dim=1).double()
    return [round(float(m), 6) for m in pixels.mean(dim=1)], [round(float(s), 6) for s in pixels.std(dim=1)]


def decode_and_resize(args: argparse.Namespace) -> list[fm.Transform]:
    """The first steps of both variants: decode to grayscale (so a colour PNG works too), refusing
    images over 4 megapixels before decoding their pixels, then resize. With ``--preprocessing
    torchvision`` the image is a uint8 tensor from here on, a PIL image otherwise."""
    decode = DecodeImage(mode="L", max_pixels=2048 * 2048)
    if args.preprocessing == "torchvision":
        import tv_processing as tv  # only this option needs torchvision

        return [decode, tv.ToImage(), tv.Resize(args.image_size)]
    return [decode, Resize(args.image_size)]


def preprocessing(variant: str, args: argparse.Namespace, mean: list[float], std: list[float]) -> list[fm.Transform]:
    """The pre-processing steps of ``variant``: ``decode_and_resize`` and then, for ``center``,
    crop, tensor and normalise; for ``tta``, tensor, random crops and normalise."""
    decode = decode_and_resize(args)
    crops = RandomCrops(
        args.crop_size,
        tta=fm.Param(args.tta, minimum=1, maximum=64),  # a request may trade time for accuracy
        seed=fm.Param(0),
    )
    if args.preprocessing == "torchvision":
        import tv_processing as tv

        normalize: fm.Transform = tv.Normalize(mean=mean, std=std)
        if variant == "center":
            return [*decode, tv.CenterCrop(args.crop_size), tv.ToFloat(), normalize]
        return [*decode, tv.ToFloat(), crops, normalize]
    normalize = NormalizeImage(mean=mean, std=std)
    if variant == "center":
        return [*decode, CenterCrop(args.crop_size), ToTensor(), normalize]
    return [*decode, ToTensor(), crops, normalize]


def to_float_tensor(args: argparse.Namespace) -> list[fm.Transform]:
    """``decode_and_resize`` and the step to a float tensor: what the statistics are computed on."""
    if args.preprocessing == "torchvision":
        import tv_processing as tv

        return [*decode_and_resize(args), tv.ToFloat()]
    return [*decode_and_resize(args), ToTensor()]


def training_inputs(
    variant: str, steps: Sequence[fm.Transform], resized: Sequence[Any], seed: int, start: int
) -> Callable[[int], torch.Tensor]:
    """A function of the epoch giving the training inputs ``(N, C, crop, crop)`` of that epoch,
    from the decoded and resized images ``resized``: ``steps[:start]`` made them.

    ``center`` sees the same centre crops every epoch. ``tta`` sees one random crop per image and
    epoch, drawn by the model's own ``RandomCrops`` with a seed per epoch: the augmentation in
    training is the one the model averages over at inference.
    """
    if variant == "center":
        fixed = torch.stack([apply(steps[start:], image) for image in resized])  # crop, tensor, normalise
        return lambda epoch: fixed
    to_tensor, crops, normalize = steps[start:]
    tensors = [to_tensor(image) for image in resized]

    def epoch_inputs(epoch: int) -> torch.Tensor:
        return torch.stack([normalize(crops(image, tta=1, seed=seed * 1000 + epoch))[0] for image in tensors])

    return epoch_inputs


def accuracy(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy on ``(N, C, H, W)`` inputs, or on ``(N, S, C, H, W)`` with the probabilities
    averaged over the ``S`` samples, as ``AverageOverSamples`` does in the logged model."""
    net.eval()
    with torch.inference_mode():
        if inputs.dim() == 5:
            scores = net(inputs.flatten(0, 1)).double().softmax(dim=-1)
            scores = scores.view(inputs.shape[0], inputs.shape[1], -1).mean(dim=1)
        else:
            scores = net(inputs)
    return float((scores.argmax(dim=1) == targets).double().mean())


def fit(
    net: nn.Module,
    inputs_of_epoch: Callable[[int], torch.Tensor],
    targets: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> float:
    """Train ``net``, log the loss and validation accuracy of each epoch; return the last accuracy."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    val_accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        inputs = inputs_of_epoch(epoch)
        net.train()
        total = 0.0
        order = torch.randperm(len(targets), generator=generator)
        steps = range(0, len(order), args.batch_size)
        for start in tqdm(steps, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
            index = order[start : start + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(inputs[index]), targets[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        train_loss = total / len(targets)
        val_accuracy = accuracy(net, *val)
        mlflow.log_metrics({"train_loss": train_loss, "val_accuracy": val_accuracy}, step=epoch)
        _logger.info("epoch %d/%d: train loss %.4f, validation accuracy %.3f", epoch, args.epochs, train_loss,
                     val_accuracy)
    return val_accuracy


def train_variant(
    variant: str,
    args: argparse.Namespace,
    train: tuple[list[bytes], list[str]],
    val: tuple[list[bytes], list[str]],
    mean: list[float],
    std: list[float],
    example_inputs: list[bytes],
) -> dict[str, Any]:
    """Train, log and register one variant in its own MLflow run."""
    steps = preprocessing(variant, args, mean, std)
    label_index = {label: i for i, label in enumerate(LABELS)}
    train_targets = torch.tensor([label_index[x] for x in train[1]])
    val_targets = torch.tensor([label_index[x] for x in val[1]])
    start = len(decode_and_resize(args))
    resized = [apply(steps[:start], png) for png in train[0]]  # DecodeImage, (ToImage,) Resize
    val_inputs = torch.stack([apply(steps, png) for png in val[0]])  # with the default tta and seed

    with mlflow.start_run(run_name=variant) as run:
        started = time.perf_counter()
        mlflow.log_params({
            "variant": variant, "preprocessing": args.preprocessing, "num_train": len(train[0]),
            "num_validation": len(val[0]),
            "render_size": args.render_size, "image_size": args.image_size, "crop_size": args.crop_size,
            "tta": args.tta if variant == "tta" else 1, "normalize_mean": mean, "normalize_std": std,
            "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "seed": args.seed, "num_threads": args.num_threads,
            "module_format": args.module_format,
        })
        torch.manual_seed(args.seed)  # both variants start from the same weights
        net = DigitCNN(num_classes=len(LABELS), in_channels=len(mean), width=args.width)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.num_threads)
        try:
            val_accuracy = fit(net, training_inputs(variant, steps, resized, args.seed, start), train_targets,
                               (val_inputs, val_targets), args)
        finally:
            torch.set_num_threads(threads)
        train_seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", train_seconds)

        model = fm.FullModel(
            preprocess=steps,
            # A plain module is exported with torch.export by log_model, from the input example.
            module=fm.script(net) if args.module_format == "torchscript" else net.eval(),
            forward=AverageOverSamples() if variant == "tta" else CallModule(),
            # AverageOverSamples returns probabilities already.
            postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)), softmax=variant != "tta")],
            input_columns=["image"],
        )
        _logger.info("%s: trained in %.1f s, validation accuracy %.3f; logging %r",
                     variant, train_seconds, val_accuracy, model)
        # log_model reloads the model in a clean process and checks it reproduces these examples.
        info = fm.log_model(model, name="model", input_example=example_inputs,
                            registered_model_name=args.registered_model_name or None)
    return {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "version": info.registered_model_version,
        "val_accuracy": val_accuracy,
        "train_seconds": train_seconds,
        "model": model,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both variants, log them, register them as two versions of one model, set the aliases.

    Returns:
        ``variants``: for ``"center"`` and ``"tta"``, a dict with ``run_id``, ``model_uri``,
        ``version`` (None without registration), ``alias``, ``val_accuracy``, ``train_seconds``
        and ``model`` (the ``FullModel`` as logged, in memory); ``registered_model_uri``
        (``models:/<name>@<alias>``, the tta
        version; None without registration); ``labels``; ``mean`` and ``std`` (the normalisation
        statistics of the training split); ``tracking_uri``.
    """
    args = parse_args(argv)
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    tracking_uri = mlflow.get_tracking_uri()

    images, labels = load_pngs(args.num_examples, size=args.render_size, seed=args.seed)
    train, val = split(images, labels, args.validation_fraction, args.seed)
    _logger.info("data: scikit-learn digits as %dx%d PNG files; %d training and %d validation images",
                 args.render_size, args.render_size, len(train[0]), len(val[0]))
    # The statistics come from the training split only, after the steps before NormalizeImage.
    tensor_steps = to_float_tensor(args)
    mean, std = pixel_statistics([apply(tensor_steps, png) for png in train[0]])
    _logger.info("training pixels: mean %s, std %s", mean, std)
    example_inputs = val[0][:4]

    mlflow.set_experiment(args.experiment)
    results = {variant: train_variant(variant, args, train, val, mean, std, example_inputs) for variant in VARIANTS}

    name = args.registered_model_name
    registered_uri = None
    aliases = {"tta": args.alias, "center": args.challenger_alias}
    if name:
        client = MlflowClient()
        for variant, result in results.items():
            client.set_registered_model_alias(name, aliases[variant], result["version"])
            client.set_model_version_tag(name, result["version"], "variant", variant)
            _logger.info("registered %s version %s (%s) as models:/%s@%s",
                         name, result["version"], variant, name, aliases[variant])
        registered_uri = f"models:/{name}@{args.alias}"
    for variant, result in results.items():
        result["alias"] = aliases[variant] if name else None

    serve_uri = registered_uri or results["tta"]["model_uri"]
    print(f"\nServe the model (decoding, resizing, random crops, normalisation, network, averaging and top-k in one):\n"
          f"  MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {serve_uri} "
          f"--env-manager local -p {args.port}\n"
          f"Then score a PNG file, sent as base64:\n"
          f"  python digits.py --index 0 --out digit.png\n"
          f"  curl -s localhost:{args.port}/invocations -H 'Content-Type: application/json' "
          f"-d '{{\"dataframe_records\": [{{\"image\": \"'$(base64 -w0 digit.png)'\"}}], "
          f"\"params\": {{\"tta\": 16, \"seed\": 1, \"k\": 3}}}}'")
    return {
        "variants": results,
        "registered_model_uri": registered_uri,
        "labels": LABELS,
        "mean": mean,
        "std": std,
        "tracking_uri": tracking_uri,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
