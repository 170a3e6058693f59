"""Benchmark 9: compiled and int8 forward passes (AOTInductor, torchao), side by side in one run.

Two subjects, each saved four ways with ``mlflow_fullmodel.save_model`` into temporary folders:

- **medium**: ``benchmarks.models.Medium`` (a 4-layer ``nn.TransformerEncoder``, d_model 256) behind
  the sentencepiece tokenizer of the other benchmarks;
- **bert**: a BERT-class classifier, ``transformers.BertForSequenceClassification`` with
  ``BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
  num_labels=3)``, behind a WordPiece tokenizer trained here with ``tokenizers`` on the generated
  text (``TokenizerEncode``, ``[CLS] text [SEP]``).

Both are plain ``nn.Module``s taking ``(ids, lengths)``, seeded random initialisation, then
``--train-steps`` (200) steps of Adam on a generated three-class task (a label from the words' counts),
so that the labels spread and the margins are a classifier's rather than a random network's
(near-uniform: every label "negative", or margins of a few thousandths). Speed does not depend on
the weights. The four variants:

- **portable**: the ``torch.export`` program;
- **compiled**: ``compile="aoti"``, the AOTInductor package beside the program;
- **int8**: ``quantize="int8"`` (torchao's dynamic int8 activations and int8 weights on the
  ``nn.Linear`` layers), the portable program;
- **int8+compiled**: both.

Measured, in this order:

1. forward-only: the callable the forward strategy runs (``model.module.runnable``) on collated
   token ids, one torch thread, no tokenisation: one row of 30 tokens, and 512 held-out
   mixed-length texts (3 to 120 words) in 16 length-sorted batches of 32; the variants take turns,
   best of the rounds;
2. why int8 gains what it gains at B=32: the same network with its ``nn.Linear`` layers taken out
   (each replaced by a slice of its input), saved compiled like the variants: what no quantization
   of those layers can make faster; and the int8 program compiled with Inductor's ``freezing``
   (which ``save_model`` does not set); then, once per run, one ``nn.Linear`` of each of the
   subjects' shapes compiled float and int8, beside the matrix products alone (``torch._int_mm``);
3. predict in-process (``fm.load_model(...).predict``), one torch thread: one row per call (256
   texts), and the 512 texts in one call (rows/s); best of the rounds;
4. label agreement of each variant with the portable float model on 1,000 held-out texts, and the
   largest difference of a label's probability (``k=3``: every label's probability compared);
5. served: ``mlflow-fullmodel serve`` of each variant, one at a time and stopped after, single-row
   requests from 1, 8 and 32 clients (bench_serving's load generator): requests/s, p50, p99, server
   CPU per request; two passes in opposite orders, per level the pass with the most requests/s. A
   variant the server refuses to start is served by ``mlflow models serve`` instead, beside the
   portable one under ``mlflow models serve``, and the refusal is printed;
6. start: the time to save each variant and AOTInductor's part of it (from the package's log), a
   fresh process's load + first prediction (bench_coldstart, median of 3), a server's launch to
   ready.

A save that the parity check refuses is printed, and the variant saved again with
``check_parity=False`` so that it is measured all the same.

Ratios are against the portable variant measured in the same run.

    python -m benchmarks.bench_compiled [--quick] [--subjects medium,bert] [--only forward,why,...]
                                        [--train-steps N] [--json results.json]

About 40 minutes on 2 cores; ``--quick`` runs every part small (a smoke run, about 10 minutes:
training and the compiles take most of it). Needs ``transformers`` and ``torchao`` (``pip install
transformers torchao``; torchao 0.18 was measured), the package's ``hf`` extra (``tokenizers``) and a
C++ compiler for AOTInductor; without them it says so and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import importlib.util
import inspect
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import mlflow_fullmodel as fm
from benchmarks.bench_coldstart import cold_start
from benchmarks.bench_operations import bodies_of, started, stop
from benchmarks.bench_serving import group_cpu_seconds, load
from benchmarks.common import percentile, subject_of, table
from benchmarks.models import LABELS, WORDS, Medium, Subject, texts

SUBJECTS = ("medium", "bert")
#: save_model's arguments per variant; the first is the baseline of every ratio.
VARIANTS: dict[str, dict[str, str]] = {
    "portable": {},
    "compiled": {"compile": "aoti"},
    "int8": {"quantize": "int8"},
    "int8+compiled": {"quantize": "int8", "compile": "aoti"},
}
PARTS = ("forward", "why", "layers", "predict", "agreement", "serve", "cold")
CLIENTS = (1, 8, 32)
REQUESTS_PER_CLIENT = {1: 200, 8: 60, 32: 25}
WARMUP = 60
#: Held-out texts: other seeds than the tokenizers' (1), the training's (1000+) and the saved example's (9).
BATCH_SEED, ONE_ROW_SEED, AGREEMENT_SEED = 3, 4, 21


@dataclass
class Sizes:
    """How much of everything a run does (``--quick`` shrinks it)."""

    train_steps: int = 200
    forward_rounds: int = 7
    one_row_calls: int = 100
    batch_rows: int = 512
    one_row_texts: int = 256
    predict_rounds: int = 3
    agreement_rows: int = 1000
    serving_passes: int = 2
    serving_scale: float = 1.0
    cold_runs: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(train_steps=20, forward_rounds=2, one_row_calls=20, batch_rows=128, one_row_texts=32,
                   predict_rounds=1, agreement_rows=200, serving_passes=1, serving_scale=0.2, cold_runs=1)


def missing_requirements() -> str | None:
    """Why this benchmark cannot run here, or None."""
    missing = [name for name in ("transformers", "torchao", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"bench_compiled needs {', '.join(missing)}: pip install {' '.join(missing)} "
                "(with the torch that is installed: add torch==<its version> if pip wants another).")
    options = inspect.signature(fm.save_model).parameters
    if "compile" not in options or "quantize" not in options:
        return "bench_compiled needs mlflow_fullmodel.save_model(..., compile=, quantize=): this version has neither."
    from mlflow_fullmodel.compiled import check_compiler

    try:
        check_compiler()
    except fm.ConfigError as error:
        return f"bench_compiled: {error}"
    return None


# -- the subjects ------------------------------------------------------------------------------------


def short_texts(n: int, seed: int) -> list[str]:
    """Training text: 3 to 40 words (a step on long texts costs several times more, and the task is
    the same)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def task_label(text: str) -> int:
    """The generated task's label: which of two word families ("ka..." against "lo...") is more
    frequent, by at least two words; neutral otherwise."""
    words = text.split()
    lead = sum(w.startswith("ka") for w in words) - sum(w.startswith("lo") for w in words)
    return 2 if lead >= 2 else 0 if lead <= -2 else 1


class BertClassifier(torch.nn.Module):
    """``BertForSequenceClassification`` called as the other benchmarks' modules are: padded token
    ids and their lengths in, logits out."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=1024, vocab_size=vocabulary, num_labels=len(LABELS),
                                         max_position_embeddings=512)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return self.bert(input_ids=ids, attention_mask=mask).logits


def wordpiece_tokenizer(path: str) -> str:
    """A BERT-style WordPiece ``tokenizer.json`` trained on the generated text (every generated word
    is one piece: 140 words, 5 special tokens and the alphabet's pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tokenizer.train_from_iterator(texts(3000, seed=1), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.save(path)
    return path


def build_model(name: str, folder: str) -> fm.FullModel:
    """The subject as a FullModel holding its plain module (exported, compiled, quantized at save)."""
    from mlflow_fullmodel.transforms import TokenizerEncode, TopK

    torch.manual_seed(0)
    if name == "medium":
        spm = subject_of("medium").spm
        # The same FullModel as the other benchmarks' medium, with the plain module instead of TorchScript.
        return Subject(name, folder, spm, Medium()).fullmodel  # type: ignore[arg-type]
    tokenizer = wordpiece_tokenizer(os.path.join(folder, "tokenizer.json"))
    from tokenizers import Tokenizer

    net = BertClassifier(Tokenizer.from_file(tokenizer).get_vocab_size())
    return fm.FullModel(
        preprocess=[TokenizerEncode(fm.Artifact(tokenizer), max_length=256)],
        module=net,
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        batch_size=32,
    )


def collated(model: fm.FullModel, rows: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``rows`` through the model's pre-processing, sorted by length, collated in batches of the
    model's size: (ids, lengths) as the forward strategy passes them."""
    examples = sorted(model.preprocess[0].batch(rows), key=len)
    batches = [model.collate(examples[i : i + model.batch_size]) for i in range(0, len(examples), model.batch_size)]
    return [(b.inputs, b.lengths) for b in batches]


def train(model: fm.FullModel, steps: int) -> float:
    """``steps`` steps of Adam on the generated task, batches of 32 fresh texts; the module is left
    in eval mode. Returns the accuracy on 512 held-out texts."""
    net = model.module["main"]
    if steps:
        optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
        net.train()
        for step in range(steps):
            rows = short_texts(32, seed=1000 + step)
            batch = model.collate(model.preprocess[0].batch(rows))
            target = torch.tensor([task_label(text) for text in rows])
            loss = torch.nn.functional.cross_entropy(net(batch.inputs, batch.lengths), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    held_out = texts(512, seed=77)
    answers = model.predict(held_out)["label"].tolist()
    return statistics.mean(LABELS.index(a) == task_label(t) for a, t in zip(answers, held_out))


# -- measuring ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (None: left as they are)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def compile_log() -> Iterator[list[tuple[float, float]]]:
    """(seconds, MB) of each AOTInductor compile in the block, read from the package's log line
    ("Compiled module '%s' with AOTInductor in %.1f s (%.1f MB).")."""
    found: list[tuple[float, float]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Compiled module") and len(record.args or ()) == 3:
                found.append((float(record.args[1]), float(record.args[2])))  # type: ignore[index]

    logger = logging.getLogger("mlflow_fullmodel.compiled")
    handler, level = Catch(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def taking_turns(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each of ``fns`` (returning seconds per unit) once per round, the order reversed every other
    round so drift in the machine's load falls on each alike; the least disturbed (smallest) of
    each."""
    best: dict[str, float] = {}
    names = list(fns)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            seconds = fns[name]()
            best[name] = min(best.get(name, seconds), seconds)
    return best


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    def timed() -> float:
        started_ = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - started_) / calls

    return timed


def forward_times(reference: fm.FullModel, runs: dict[str, Callable[..., Any]],
                  sizes: Sizes) -> dict[str, dict[str, float]]:
    """ms per call of each of ``runs`` (a module's callable, as the forward strategy calls it): one
    row of 30 tokens, and length-sorted batches of 32 (``reference`` tokenises and collates)."""
    batches = collated(reference, texts(sizes.batch_rows, seed=BATCH_SEED))
    ids, _ = collated(reference, [next(t for t in texts(200, seed=BATCH_SEED) if len(t.split()) >= 40)])[0]
    one = (ids[:, :30].contiguous(), torch.tensor([30]))

    def batch_pass(run: Callable[..., Any]) -> Callable[[], None]:
        return lambda: [run(*b) for b in batches]

    with threads(1), torch.inference_mode():
        for run in runs.values():  # the first calls (allocations, lazy initialisation) are not timed
            run(*one), batch_pass(run)()
        single = taking_turns({n: per_call(lambda r=r: r(*one), sizes.one_row_calls) for n, r in runs.items()},
                              sizes.forward_rounds)
        many = taking_turns({n: per_call(batch_pass(r), 1) for n, r in runs.items()}, sizes.forward_rounds)
    return {n: {"one_ms": single[n] * 1000, "batch_ms": many[n] * 1000 / len(batches),
                "mean_tokens": statistics.mean(float(b[0].shape[1]) for b in batches)} for n in runs}


def runnable(model: fm.FullModel) -> Callable[..., Any]:
    """What the forward strategy calls: the compiled package where it runs, else the program."""
    return model.module.runnable("main", torch.device("cpu"))


class LinearStandIn(torch.nn.Module):
    """In place of an ``nn.Linear``: the first ``out_features`` features of its input (zeros after
    them), a copy at most. What feeds the layer stays alive (no dead code for the compiler to drop);
    the original weights stay readable for code that reads them rather than calling the layer."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_features - x.shape[-1]
        return torch.nn.functional.pad(x, (0, extra)) if extra > 0 else x[..., : self.out_features]


def without_linear_layers(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every ``nn.Linear`` it calls replaced by a ``LinearStandIn``: the
    rest of its forward pass. (``nn.MultiheadAttention`` does not call its ``out_proj``; it passes
    the weights to a function, so that one is left as it is.)"""
    copied = copy.deepcopy(module)
    for parent in list(copied.modules()):
        if isinstance(parent, torch.nn.MultiheadAttention):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, LinearStandIn(child))
    return copied


def why(model: fm.FullModel, loaded: dict[str, fm.FullModel], folder: str, example: list[str],
        sizes: Sizes) -> dict[str, dict[str, float]]:
    """What int8 can give here at most: the same network with its ``nn.Linear`` layers taken out
    (``without_linear_layers``), saved compiled as the variants are, is what no quantization of
    those layers can make faster. Beside it, the int8 program compiled with Inductor's ``freezing``
    (weights as constants, so Inductor may fuse the quantized linear with oneDNN), which
    ``save_model`` does not do: what a compile option would add."""
    rest = fm.FullModel(preprocess=model.preprocess, module=without_linear_layers(model.module["main"]),
                        postprocess=model.postprocess, batch_size=model.batch_size)
    path = os.path.join(folder, "without-linear")
    fm.save_model(rest, path, input_example=example, compile="aoti", check_parity=False)
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    program = loaded["int8"].module["main"]
    package = aoti_compile_and_package(getattr(program, "program", program), inductor_configs={"freezing": True},
                                       package_path=os.path.join(folder, "int8-frozen.pt2"))
    runs = {"portable": runnable(loaded["portable"]), "compiled": runnable(loaded["compiled"]),
            "int8+compiled": runnable(loaded["int8+compiled"]),
            "int8+compiled, freezing": aoti_load_package(package),
            "without Linear, portable": runnable(fm.load_model(path, compiled=False)),
            "without Linear, compiled": runnable(fm.load_model(path))}
    return forward_times(loaded["portable"], runs, sizes)


def predict_in_process(loaded: dict[str, fm.FullModel], sizes: Sizes) -> dict[str, dict[str, float]]:
    """One row per call (ms per row), and a batch of mixed-length texts in one call (rows/s), both
    on one torch thread."""
    one_rows = texts(sizes.one_row_texts, seed=ONE_ROW_SEED)
    batch = texts(sizes.batch_rows, seed=BATCH_SEED)

    def one_by_one(model: fm.FullModel) -> Callable[[], float]:
        def run() -> float:
            started_ = time.perf_counter()
            for text in one_rows:
                model.predict([text])
            return (time.perf_counter() - started_) / len(one_rows)

        return run

    for model in loaded.values():
        model.predict(batch[:8]), model.predict(one_rows[:1])
    with threads(1):
        single = taking_turns({n: one_by_one(m) for n, m in loaded.items()}, sizes.predict_rounds)
        many = taking_turns({n: per_call(lambda m=m: m.predict(batch), 1) for n, m in loaded.items()},
                            sizes.predict_rounds)
    return {n: {"one_row_ms": single[n] * 1000, "batch_rows_s": len(batch) / many[n]} for n in loaded}


def agreement(loaded: dict[str, fm.FullModel], sizes: Sizes) -> dict[str, dict[str, Any]]:
    """Each variant against the portable (float) one: labels, and every label's probability."""
    rows = texts(sizes.agreement_rows, seed=AGREEMENT_SEED)

    def probabilities(model: fm.FullModel) -> tuple[list[str], list[dict[str, float]]]:
        answers = model.predict(rows, params={"k": len(LABELS)})
        return (answers["label"].tolist(),
                [dict(zip(ls, ps)) for ls, ps in zip(answers["top_labels"], answers["top_probabilities"])])

    results = {n: probabilities(m) for n, m in loaded.items()}
    base_labels, base_probs = results["portable"]
    margins = sorted(sorted(p.values())[-1] - sorted(p.values())[-2] for p in base_probs)
    out: dict[str, dict[str, Any]] = {}
    for name, (labels, probs) in results.items():
        differences = [abs(p[label] - q[label]) for p, q in zip(probs, base_probs) for label in LABELS]
        out[name] = {
            "agreement": statistics.mean(a == b for a, b in zip(labels, base_labels)),
            "flipped": sum(a != b for a, b in zip(labels, base_labels)),
            "largest_difference": max(differences),
            "median_difference": statistics.median(differences),
        }
    out["portable"].update(
        labels={label: base_labels.count(label) for label in LABELS},
        margin_p1=percentile(margins, 1), margin_p10=percentile(margins, 10), margin_p50=percentile(margins, 50),
        # how many of the float model's answers a change of the largest int8 difference could flip
        within={name: sum(m < 2 * r["largest_difference"] for m in margins) for name, r in out.items()},
    )
    return out


MLFLOW_SERVE = ", mlflow models serve"


def served(paths: dict[str, str], sizes: Sizes,
           refused: dict[str, str]) -> dict[str, dict[int, dict[str, float]]]:
    """Each variant under `mlflow-fullmodel serve`, one server at a time; per level the pass with
    the most requests/s. A variant that `mlflow-fullmodel serve` refuses to start (its reason goes
    into ``refused``) is served by `mlflow models serve` instead, beside the portable one under
    `mlflow models serve` as its baseline (names ending in ``MLFLOW_SERVE``)."""
    bodies = bodies_of()
    results: dict[str, dict[int, dict[str, float]]] = {}
    plan = [("fullmodel", variant) for variant in paths]
    gc.collect()
    gc.freeze()  # the load generator's own collections would show as server latency
    try:
        for pass_ in range(sizes.serving_passes):
            queue = list(plan if pass_ % 2 == 0 else plan[::-1])
            while queue:
                kind, variant = queue.pop(0)
                name = variant if kind == "fullmodel" else variant + MLFLOW_SERVE
                try:
                    server = started(kind, paths[variant])
                except RuntimeError as error:
                    if kind != "fullmodel" or pass_:
                        raise
                    reason = next((line for line in str(error).splitlines() if line.startswith("Error:")), str(error))
                    refused[variant] = reason.removeprefix("Error: ")
                    plan.remove((kind, variant))
                    for fallback in (("mlflow", "portable"), ("mlflow", variant)):
                        if fallback not in plan:  # served in this pass too
                            plan.append(fallback)
                            queue.append(fallback)
                    print(f"  served {variant}: mlflow-fullmodel serve refused it ({refused[variant]}); "
                          "served with mlflow models serve", file=sys.stderr)
                    continue
                ready_s = time.perf_counter() - server.launched
                try:
                    asyncio.run(load(server.url, 4, WARMUP // 4, bodies))
                    for clients in CLIENTS:
                        per_client = max(2, int(REQUESTS_PER_CLIENT[clients] * sizes.serving_scale))
                        cpu_before = group_cpu_seconds(server.process.pid)
                        wall, latencies = asyncio.run(load(server.url, clients, per_client, bodies))
                        cpu = group_cpu_seconds(server.process.pid) - cpu_before
                        count = clients * per_client
                        run = {"rps": count / wall, "p50": percentile(latencies, 50) * 1000,
                               "p99": percentile(latencies, 99) * 1000, "cpu_ms": cpu / count * 1000,
                               "ready_s": ready_s}
                        if run["rps"] > results.setdefault(name, {}).get(clients, {"rps": 0.0})["rps"]:
                            results[name][clients] = run
                finally:
                    stop(server)
            print(f"  served: pass {pass_ + 1}/{sizes.serving_passes} done", file=sys.stderr)
    finally:
        gc.unfreeze()
    return results


LAYERS_HEADER = ["layer (2048 rows = 32 texts x 64 tokens)", "float layer ms", "int8 layer ms", "int8 layer x float",
                 "products alone: float / int8 ms", "int8 product x float", "int8 layer minus its product ms"]


def layer_costs(rows: int = 2048, repeats: int = 30) -> list[list[object]]:
    """One ``nn.Linear`` of each shape in the subjects' layers, float and int8 (quantized as
    ``save_model`` does), exported with a dynamic first dimension and compiled with AOTInductor,
    one torch thread; beside them the matrix products alone (``torch.mm``, ``torch._int_mm``). The
    difference between an int8 layer and its product is what quantizing each row's activations and
    rescaling the int32 result to float cost as compiled."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    def best(fn: Callable[[], object]) -> float:
        return min(per_call(fn, 1)() for _ in range(repeats)) * 1000

    table_rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-compiled-layers-") as folder, threads(1):
        for inputs, outputs in ((256, 256), (256, 1024), (1024, 256)):
            layer = torch.nn.Linear(inputs, outputs).eval()
            quantized = copy.deepcopy(layer)
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
            x = torch.randn(rows, inputs)
            times = {}
            for name, module in (("float", layer), ("int8", quantized)):
                with torch.no_grad():
                    program = torch.export.export(module, (x[:64],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
                path = os.path.join(folder, f"{name}-{inputs}-{outputs}.pt2")
                run = aoti_load_package(aoti_compile_and_package(program, package_path=path))
                with torch.inference_mode():
                    run(x)
                    times[name] = best(lambda run=run: run(x))
            x8 = torch.randint(-127, 127, (rows, inputs), dtype=torch.int8)
            w8 = torch.randint(-127, 127, (inputs, outputs), dtype=torch.int8)
            weight = layer.weight.detach().t().contiguous()
            with torch.inference_mode():
                float_mm, int_mm = best(lambda: torch.mm(x, weight)), best(lambda: torch._int_mm(x8, w8))
            table_rows.append([f"{inputs} -> {outputs}", f"{times['float']:.2f}", f"{times['int8']:.2f}",
                               f"{times['float'] / times['int8']:.2f}", f"{float_mm:.2f} / {int_mm:.2f}",
                               f"{float_mm / int_mm:.1f}", f"{times['int8'] - int_mm:.2f}"])
    return table_rows


# -- one subject -------------------------------------------------------------------------------------


@dataclass
class SubjectResults:
    name: str
    accuracy: float = 0.0
    save_s: dict[str, float] = field(default_factory=dict)
    #: AOTInductor's compile time and package size, from the package's log line.
    compile_s: dict[str, float] = field(default_factory=dict)
    package_mb: dict[str, float] = field(default_factory=dict)
    #: The variants `mlflow-fullmodel serve` refused to start, and why.
    serve_refused: dict[str, str] = field(default_factory=dict)
    #: The variants whose save refused them (the parity check), and its first line.
    refused: dict[str, str] = field(default_factory=dict)
    forward: dict[str, dict[str, float]] = field(default_factory=dict)
    why: dict[str, dict[str, float]] = field(default_factory=dict)
    predict: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)
    served: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    cold_s: dict[str, float] = field(default_factory=dict)


def run_subject(name: str, sizes: Sizes, folder: str, only: set[str]) -> SubjectResults:
    results = SubjectResults(name)
    model = build_model(name, folder)
    started_ = time.perf_counter()
    results.accuracy = train(model, sizes.train_steps)
    print(f"{name}: trained {sizes.train_steps} steps in {time.perf_counter() - started_:.0f} s, "
          f"accuracy {results.accuracy:.1%} on held-out texts", file=sys.stderr)
    example = texts(4, seed=9)
    paths = {}
    for variant, options in VARIANTS.items():
        # A folder's name is the served model's name in the Open Inference Protocol's paths: no "+".
        paths[variant] = os.path.join(folder, variant.replace("+", "-"))
        started_ = time.perf_counter()
        try:
            with compile_log() as compiles:
                fm.save_model(model, paths[variant], input_example=example, **options)
        except fm.ParityError as error:
            # Measured all the same, and said: the save refused the model as it would for a user.
            results.refused[variant] = str(error).splitlines()[0]
            print(f"{name}: {variant} refused by the parity check ({results.refused[variant]}); saved again with "
                  "check_parity=False to measure it", file=sys.stderr)
            started_ = time.perf_counter()
            fm.save_model(model, paths[variant], input_example=example, check_parity=False, **options)
        results.save_s[variant] = time.perf_counter() - started_
        if compiles:
            results.compile_s[variant], results.package_mb[variant] = compiles[-1]
        print(f"{name}: saved {variant} in {results.save_s[variant]:.1f} s", file=sys.stderr)
    loaded = {variant: fm.load_model(path) for variant, path in paths.items()}
    if "forward" in only:
        results.forward = forward_times(loaded["portable"], {v: runnable(m) for v, m in loaded.items()}, sizes)
    if "why" in only:
        results.why = why(model, loaded, folder, example, sizes)
    if "predict" in only:
        results.predict = predict_in_process(loaded, sizes)
    if "agreement" in only:
        results.agreement = agreement(loaded, sizes)
    del loaded
    gc.collect()
    if "serve" in only:
        results.served = served(paths, sizes, results.serve_refused)
    if "cold" in only:
        results.cold_s = {variant: cold_start(path, sizes.cold_runs) for variant, path in paths.items()}
    return results


# -- reporting ---------------------------------------------------------------------------------------


FORWARD_HEADER = ["model", "variant", "1 row, 30 tokens: ms", "x portable", "batches of 32: ms per batch",
                  "x portable", "x compiled"]
PREDICT_HEADER = ["model", "variant", "one-row predict: ms", "x portable", "batch predict: rows/s", "x portable"]
AGREEMENT_HEADER = ["model", "variant", "label agreement with portable", "labels changed",
                    "largest probability difference", "median difference"]
SERVED_HEADER = ["model", "variant", "clients", "req/s", "x portable", "p50 ms", "p99 ms", "p99 x portable",
                 "CPU ms/req"]
WHY_HEADER = ["model", "batches of 32, ms: portable / compiled", "without Linear: portable / compiled",
              "Linear share of compiled", "at most, Linear free: x portable / x compiled",
              "int8+compiled ms (x portable / x compiled)", "int8 Linear layers x float (implied)",
              "int8+compiled with freezing ms (x portable / x compiled)"]
START_HEADER = ["model", "variant", "save s", "of which AOTInductor s (package MB)",
                "process: load + first prediction s", "x portable", "server: launch to ready s"]


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}"


def tables(all_results: list[SubjectResults]) -> dict[str, list[list[object]]]:
    out: dict[str, list[list[object]]] = {"forward": [], "why": [], "predict": [], "agreement": [], "served": [],
                                          "start": []}
    for r in all_results:
        for name in sorted(r.served, key=lambda n: (n.endswith(MLFLOW_SERVE), list(VARIANTS).index(n.split(",")[0]))):
            baseline = "portable" + MLFLOW_SERVE if name.endswith(MLFLOW_SERVE) else "portable"
            for clients in CLIENTS:
                s, base = r.served[name][clients], r.served[baseline][clients]
                out["served"].append([r.name, name, clients, f"{s['rps']:.0f}", ratio(s["rps"], base["rps"]),
                                      f"{s['p50']:.1f}", f"{s['p99']:.1f}", ratio(s["p99"], base["p99"]),
                                      f"{s['cpu_ms']:.2f}"])
        if r.why:
            w = {k: v["batch_ms"] for k, v in r.why.items()}
            p, c, i, f = w["portable"], w["compiled"], w["int8+compiled"], w["int8+compiled, freezing"]
            rest_p, rest_c = w["without Linear, portable"], w["without Linear, compiled"]
            out["why"].append([
                r.name, f"{p:.1f} / {c:.1f}", f"{rest_p:.1f} / {rest_c:.1f}", f"{(c - rest_c) / c:.0%}",
                f"{p / rest_c:.2f} / {c / rest_c:.2f}", f"{i:.1f} ({p / i:.2f} / {c / i:.2f})",
                f"{(c - rest_c) / (i - rest_c):.1f}" if i > rest_c else "n/a",
                f"{f:.1f} ({p / f:.2f} / {c / f:.2f})",
            ])
        for v in VARIANTS:
            if r.forward:
                f, base, comp = r.forward[v], r.forward["portable"], r.forward["compiled"]
                out["forward"].append([r.name, v, f"{f['one_ms']:.2f}", ratio(base["one_ms"], f["one_ms"]),
                                       f"{f['batch_ms']:.1f}", ratio(base["batch_ms"], f["batch_ms"]),
                                       ratio(comp["batch_ms"], f["batch_ms"])])
            if r.predict:
                p, base = r.predict[v], r.predict["portable"]
                out["predict"].append([r.name, v, f"{p['one_row_ms']:.2f}", ratio(base["one_row_ms"], p["one_row_ms"]),
                                       f"{p['batch_rows_s']:.0f}", ratio(p["batch_rows_s"], base["batch_rows_s"])])
            if r.agreement:
                a = r.agreement[v]
                out["agreement"].append([r.name, v, f"{a['agreement']:.2%}", a["flipped"],
                                         f"{a['largest_difference']:.4f}", f"{a['median_difference']:.5f}"])
            ready = r.served[v][1]["ready_s"] if v in r.served else float("nan")
            cold = r.cold_s.get(v, float("nan"))
            refused = " (refused, saved again unchecked)" if v in r.refused else ""
            compiled = f"{r.compile_s[v]:.1f} ({r.package_mb[v]:.1f})" if v in r.compile_s else ""
            out["start"].append([r.name, v, f"{r.save_s[v]:.1f}{refused}", compiled, f"{cold:.2f}",
                                 ratio(cold, r.cold_s["portable"]) if r.cold_s else "", f"{ready:.1f}"])
    return out


def goals(all_results: list[SubjectResults]) -> list[str]:
    """The issue's goals, each with the measured value and met / not met."""
    lines = []

    def say(what: str, value: float, target: float, at_least: bool = True) -> None:
        met = value >= target if at_least else value <= target
        lines.append(f"{what}: {value:.2f} (goal {'>=' if at_least else '<='} {target}): {'met' if met else 'NOT met'}")

    for r in all_results:
        if r.predict:
            say(f"{r.name}: compiled one-row predict x portable",
                r.predict["portable"]["one_row_ms"] / r.predict["compiled"]["one_row_ms"], 1.25)
        if r.served and r.name == "medium":
            say("medium: served compiled at 1 client, req/s x portable",
                r.served["compiled"][1]["rps"] / r.served["portable"][1]["rps"], 1.2)
        if r.forward:
            base = r.forward["portable"]["batch_ms"]
            say(f"{r.name}: int8+compiled forward at B=32 x portable float",
                base / r.forward["int8+compiled"]["batch_ms"], 1.8)
            say(f"{r.name}: int8+compiled forward at B=32 x compiled float",
                r.forward["compiled"]["batch_ms"] / r.forward["int8+compiled"]["batch_ms"], 1.8)
        if r.agreement:
            for v in ("int8", "int8+compiled"):
                say(f"{r.name}: {v} label agreement with float, %", 100 * r.agreement[v]["agreement"], 99)
    return lines


def main(sizes: Sizes | None = None, subjects: tuple[str, ...] = SUBJECTS,
         only: set[str] | None = None) -> dict[str, Any]:
    sizes = sizes or Sizes()
    only = only or set(PARTS)
    all_results = []
    with tempfile.TemporaryDirectory(prefix="bench-compiled-") as root:
        for name in subjects if only - {"layers"} else ():
            folder = os.path.join(root, name)
            os.makedirs(folder)
            all_results.append(run_subject(name, sizes, folder, only))
    out = tables(all_results)
    if "layers" in only:
        out["layers"] = layer_costs()
    titles = {
        "forward": "Forward only (the module alone, 1 torch thread; ms; x = how many times faster)",
        "why": "What int8 can give at B=32: the same network without its nn.Linear layers (1 torch thread)",
        "layers": "One nn.Linear compiled with AOTInductor, float and int8, and the matrix products alone (1 thread)",
        "predict": "Predict in-process (fm.load_model(...).predict, 1 torch thread)",
        "agreement": "Each variant against the portable float model, held-out texts",
        "served": ("Served (mlflow-fullmodel serve; a variant it refuses to start under mlflow models serve, against "
                   "the portable one under the same; one server at a time, single-row requests)"),
        "start": "Save, cold start (median) and server start",
    }
    headers = {"forward": FORWARD_HEADER, "why": WHY_HEADER, "layers": LAYERS_HEADER, "predict": PREDICT_HEADER,
               "agreement": AGREEMENT_HEADER, "served": SERVED_HEADER, "start": START_HEADER}
    for key, rows in out.items():
        if rows:
            print(f"\n{titles[key]}")
            print(table(rows, headers[key]))
    for r in all_results:
        if r.agreement:
            base = r.agreement["portable"]
            print(f"\n{r.name}: trained to {r.accuracy:.1%} on the generated task; float labels {base['labels']}; "
                  f"margin (top1 - top2 probability) p1 {base['margin_p1']:.4f}, p10 {base['margin_p10']:.4f}, "
                  f"median {base['margin_p50']:.4f}; answers within twice each variant's largest difference of a "
                  f"tie: {base['within']}")
    for r in all_results:
        for variant, reason in r.refused.items():
            print(f"\n{r.name}: save_model refused {variant}: {reason}")
        for variant, reason in r.serve_refused.items():
            print(f"\n{r.name}: mlflow-fullmodel serve refused {variant}: {reason}")
    print("\nGoals:")
    for line in goals(all_results):
        print(f"  {line}")
    return {"sizes": sizes.__dict__, "tables": out, "goals": goals(all_results),
            "refused": {r.name: r.refused for r in all_results},
            "serve_refused": {r.name: r.serve_refused for r in all_results},
            "raw": [r.__dict__ for r in all_results]}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part small: a smoke run")
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help="comma-separated: medium, bert")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps per subject (0: random weights)")
    parser.add_argument("--json", help="also write the tables and raw numbers to this file")
    args = parser.parse_args()
    problem = missing_requirements()
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.train_steps is not None:
        sizes.train_steps = args.train_steps
    subjects = tuple(s.strip() for s in args.subjects.split(",") if s.strip())
    unknown = set(subjects) - set(SUBJECTS)
    if unknown:
        parser.error(f"unknown subjects {sorted(unknown)}; choose from {SUBJECTS}")
    results = main(sizes, subjects, {p.strip() for p in args.only.split(",")})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)


if __name__ == "__main__":
    cli()
