"""Decoding strategies for sequence-to-sequence modules: greedy search and batched beam search.

The strategies drive a module with two entry points (two ``@torch.jit.export`` methods of one
TorchScript module, or two ``torch.export`` programs saved as two named modules)::

    encode(src, lengths) -> (memory, state)
        src      (B, T) long    right-padded source token ids (PadCollate's default)
        lengths  (B,)   long    each row's number of real tokens

    decode_step(tokens, state, memory, src_mask) -> (scores, state)
        tokens   (N,)   long    the previous target token of each hypothesis (BOS at the start)
        state    tensor, or tuple of tensors, batch first: the decoder state (e.g. a GRU's hidden)
        memory   tensor, or tuple of tensors, batch first: what ``encode`` returned
        src_mask (N, T) bool    True at the real source positions
        scores   (N, V)         next-token logits or log-probabilities

Beam search keeps several hypotheses per example: it repeats ``memory``, ``src_mask`` and the
first ``state`` for each, and reorders ``state`` as hypotheses are kept or dropped, along the first
dimension; that is why everything is batch first. The strategies
apply ``log_softmax`` to ``scores`` (harmless when they already are log-probabilities) and never
generate the pad or BOS id.

Both strategies return, for each example, a list of candidates ``(token_ids, score)``, best first,
with BOS and EOS removed from ``token_ids``; ``SentencePieceDecode`` turns them into text.

Both also stream (``stream``): they yield outputs of the same shape as they decode, one per decoding
step (greedy: the tokens so far; beam search: the best hypothesis still being extended), then the
answer ``__call__`` returns. ``__call__`` and ``stream`` run the same search (``_steps``); only
``stream`` turns each step's tensors into candidates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Mapping
from typing import Any, TypeVar

import torch

from mlflow_fullmodel._checks import is_int, is_number
from mlflow_fullmodel.collate import Batch
from mlflow_fullmodel.exceptions import ConfigError, ParamError
from mlflow_fullmodel.forward import ForwardStrategy
from mlflow_fullmodel.modules import TORCHSCRIPT, ModuleSet
from mlflow_fullmodel.transform import Configurable, Param, param_default, param_value

__all__ = ["BeamSearch", "Candidate", "GreedySearch"]

#: One decoded sequence: the generated token ids (no BOS, no EOS) and its score.
Candidate = tuple[list[int], float]

# "module" (call it) or "module.method" (a TorchScript @torch.jit.export method).
_ENTRY_POINT = re.compile(r"^[^.\s]+(\.[^.\s]+)?$")

_Step = TypeVar("_Step")
_Result = TypeVar("_Result")


class _Decoding(ForwardStrategy):
    """What greedy and beam search share: checking the configuration, reaching the module's entry
    points, encoding the batch and turning the decoder's scores into masked log-probabilities."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int | Param
    encoder: str
    decoder: str

    def check_collate(self, collate: Configurable) -> None:
        # The source mask is built from the lengths with the real tokens first (right padding).
        side = getattr(collate, "pad_side", "right")
        if side != "right":
            raise ConfigError(
                f"{type(self).__name__} needs source batches padded on the right, but the collate step "
                f"{collate!r} pads on the {side}; use PadCollate(pad_side='right')."
            )

    def _check_config(self) -> None:
        name = type(self).__name__
        for argument in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, argument)
            if not is_int(value) or value < 0:
                raise ConfigError(f"{name}: {argument} must be a token id (an int >= 0), got {value!r}.")
        if self.eos_id == self.pad_id:
            raise ConfigError(
                f"{name}: eos_id and pad_id are both {self.eos_id}; padding could not be told from the "
                "end of a sequence. Train the tokenizer with distinct ids (e.g. pad_id=0, eos_id=3)."
            )
        for argument in ("encoder", "decoder"):
            value = getattr(self, argument)
            if not isinstance(value, str) or not _ENTRY_POINT.match(value):
                raise ConfigError(
                    f"{name}: {argument} must name a module ('decoder') or a method of a TorchScript "
                    f"module ('main.decode_step'), got {value!r}."
                )
        _check_count_default(name, "max_length", self.max_length)

    def _value(self, name: str, params: Mapping[str, Any]) -> Any:
        """The value of argument ``name`` for this call: the request's, else the saved one."""
        return param_value(getattr(self, name), params, name)

    def _count(self, name: str, params: Mapping[str, Any]) -> int:
        value = self._value(name, params)
        # Param(minimum=1) already refuses these in FullModel.predict; a Param saved without bounds,
        # or a direct call, still gets a message naming the parameter instead of an odd failure.
        if not is_int(value) or value < 1:
            raise ParamError(f"Parameter '{name}' must be an int >= 1, got {value!r}.")
        return value

    def _entry_points(
        self, modules: ModuleSet, device: torch.device
    ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        return (
            _entry_point(modules, device, self.encoder, "encoder", type(self).__name__),
            _entry_point(modules, device, self.decoder, "decoder", type(self).__name__),
        )

    def _encode(self, encode: Callable[..., Any], batch: Batch) -> tuple[Any, Any, torch.Tensor]:
        """Run the encoder on the batch; return ``(memory, state, src_mask)``."""
        src = batch.inputs
        if not isinstance(src, torch.Tensor) or src.dim() != 2:
            raise ConfigError(
                f"{type(self).__name__} needs each example to be one 1-D tensor of source token ids "
                f"(e.g. from SentencePieceEncode), got a batch of {_describe(src)}."
            )
        lengths = batch.lengths
        if lengths is None:
            lengths = torch.full((src.shape[0],), src.shape[1], dtype=torch.long, device=src.device)
        memory, state = encode(src, lengths)
        src_mask = torch.arange(src.shape[1], device=src.device).unsqueeze(0) < lengths.unsqueeze(1)
        return memory, state, src_mask

    def _log_probs(self, scores: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        # Padding and BOS are not words of the output: a sequence that produced them would decode to
        # nonsense, so they are never chosen. BOS may double as EOS in some vocabularies; keep it then.
        banned = [self.pad_id] + ([self.bos_id] if self.bos_id != self.eos_id else [])
        return log_probs.index_fill(1, torch.tensor(banned, device=log_probs.device), float("-inf"))


class GreedySearch(_Decoding):
    """Decode each example by taking the most probable next token until EOS or ``max_length``.

    Returns, for each example, one candidate ``(token_ids, score)``: the generated ids without BOS
    and EOS, and the sum of their log-probabilities (EOS included when it was generated). It finds
    what ``BeamSearch`` finds with ``beam_size=1`` (the same scores, too, with ``length_penalty=0``),
    at less cost.

    Args:
        bos_id: The target token id that starts decoding (sentencepiece ``bos_id()``).
        eos_id: The target token id that ends a sequence.
        pad_id: The target padding id; it is never generated.
        max_length: The most tokens generated per example, EOS included; usually a ``Param``.
        encoder: The encoder entry point: ``"module.method"`` for a TorchScript method, or the name
            of a module (a torch.export program) to call.
        decoder: The decoder-step entry point, named the same way.

    Example::

        FullModel(preprocess=[SentencePieceEncode(Artifact("src.model"))], module=fm.script(net),
                  forward=GreedySearch(bos_id=2, eos_id=3, max_length=Param(64, minimum=1)),
                  postprocess=[SentencePieceDecode(Artifact("tgt.model"))])
    """

    def __init__(
        self,
        bos_id: int = 2,
        eos_id: int = 3,
        pad_id: int = 0,
        max_length: int | Param = Param(64, minimum=1),  # noqa: B008 -- Params are never mutated
        encoder: str = "main.encode",
        decoder: str = "main.decode_step",
    ) -> None:
        self._check_config()

    def __call__(
        self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any
    ) -> list[list[Candidate]]:
        return _result(self._steps(modules, batch, device, params))

    def stream(
        self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any
    ) -> Generator[list[list[Candidate]], None, None]:
        """Yield, after each decoding step but the last (one per token of the answer, but the last
        when ``max_length`` cut it short), each example's tokens so far as one candidate
        ``(token_ids, score so far)``; then what ``__call__`` returns.

        Example::

            for candidates in GreedySearch().stream(modules, batch, device, max_length=12):
                print(candidates[0][0][0])    # the first example's token ids so far
        """
        steps = self._steps(modules, batch, device, params)
        generated: list[list[int]] = []
        while True:
            try:
                made, totals = next(steps)
            except StopIteration as end:
                yield end.value
                return
            tokens = made[-1].tolist()  # EOS for every step after an example's end
            if not generated:
                generated = [[] for _ in tokens]
            for ids, token in zip(generated, tokens):
                ids.append(token)
            yield [[(list(_until(ids, self.eos_id)), total)] for ids, total in zip(generated, totals.tolist())]

    def _steps(
        self, modules: ModuleSet, batch: Batch, device: torch.device, params: Mapping[str, Any]
    ) -> Generator[tuple[list[torch.Tensor], torch.Tensor], None, list[list[Candidate]]]:
        """The search: yields after each step but the last (the tokens of every step so far, each
        example's total log-probability); returns the candidates."""
        max_length = self._count("max_length", params)
        encode, decode = self._entry_points(modules, device)
        memory, state, src_mask = self._encode(encode, batch)
        size = src_mask.shape[0]
        tokens = torch.full((size,), self.bos_id, dtype=torch.long, device=src_mask.device)
        done = torch.zeros(size, dtype=torch.bool, device=src_mask.device)
        totals = torch.zeros(size, dtype=torch.float, device=src_mask.device)
        steps = []
        for _ in range(max_length):
            scores, state = decode(tokens, state, memory, src_mask)
            best, tokens = self._log_probs(scores).max(dim=1)
            totals = totals + torch.where(done, torch.zeros_like(best), best)
            steps.append(torch.where(done, torch.full_like(tokens, self.eos_id), tokens))
            done = done | (tokens == self.eos_id)
            if bool(done.all()):
                break
            if len(steps) < max_length:
                yield steps, totals
        generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(size)]
        return [[(_until(ids, self.eos_id), float(total))] for ids, total in zip(generated, totals.tolist())]


class BeamSearch(_Decoding):
    """Decode a batch with beam search, all examples together: each step is one ``decode_step``
    call on ``batch size x beam_size`` hypotheses.

    Per example, the search starts from BOS and, at each step, keeps the best one-token extensions
    of its live hypotheses by total log-probability, as many as there are free places in the beam.
    An extension that ends with EOS is finished and takes its place for good; so is every hypothesis
    still live after ``max_length`` tokens. The search ends when each example has ``beam_size``
    finished hypotheses. They are ranked by ``log-probability / length ** length_penalty`` (length
    counts the generated tokens, EOS included) and the ``n_best`` first are returned, as
    ``(token_ids, score)`` with that score. With ``beam_size=1`` this is greedy search.

    Args:
        bos_id: The target token id that starts decoding (sentencepiece ``bos_id()``).
        eos_id: The target token id that ends a sequence.
        pad_id: The target padding id; it is never generated.
        beam_size: How many hypotheses are kept per example; usually a ``Param``.
        n_best: How many candidates are returned per example, at most ``beam_size``.
        max_length: The most tokens generated per candidate, EOS included.
        length_penalty: The exponent of the length normalisation: 0 ranks by total log-probability
            (short outputs win), 1 by mean log-probability per token.
        encoder: The encoder entry point: ``"module.method"`` for a TorchScript method, or the name
            of a module (a torch.export program) to call.
        decoder: The decoder-step entry point, named the same way.

    Raises:
        ParamError: At predict time, when ``n_best`` is larger than ``beam_size`` or a count is
            below 1; the message names the parameter.

    Example::

        model = FullModel(
            preprocess=[SentencePieceEncode(Artifact("src.model"))],
            module=fm.script(net),                        # exports encode and decode_step
            forward=BeamSearch(bos_id=2, eos_id=3, pad_id=0),
            postprocess=[SentencePieceDecode(Artifact("tgt.model"))],
        )
        model.predict(["1234"], params={"beam_size": 8, "n_best": 3})
    """

    beam_size: int | Param
    n_best: int | Param
    length_penalty: float | Param

    def __init__(
        self,
        bos_id: int = 2,
        eos_id: int = 3,
        pad_id: int = 0,
        beam_size: int | Param = Param(4, minimum=1),  # noqa: B008 -- Params are never mutated
        n_best: int | Param = Param(1, minimum=1),  # noqa: B008
        max_length: int | Param = Param(64, minimum=1),  # noqa: B008
        length_penalty: float | Param = Param(1.0),  # noqa: B008
        encoder: str = "main.encode",
        decoder: str = "main.decode_step",
    ) -> None:
        self._check_config()
        name = type(self).__name__
        beam_default = _check_count_default(name, "beam_size", beam_size)
        n_best_default = _check_count_default(name, "n_best", n_best)
        if n_best_default > beam_default:
            raise ConfigError(
                f"{name}: n_best ({n_best_default}) must be at most beam_size ({beam_default}): the "
                "search finds beam_size candidates."
            )
        penalty = param_default(length_penalty)
        if isinstance(length_penalty, Param) and not isinstance(penalty, float):
            raise ConfigError(
                f"{name}: length_penalty=Param({penalty!r}) would only accept {type(penalty).__name__} "
                f"values; give a float default, e.g. Param({float(penalty) if isinstance(penalty, int) else 1.0})."
            )
        if not is_number(penalty):
            raise ConfigError(f"{name}: length_penalty must be a number, got {penalty!r}.")

    def __call__(
        self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any
    ) -> list[list[Candidate]]:
        return _result(self._steps(modules, batch, device, params))

    def stream(
        self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any
    ) -> Generator[list[list[Candidate]], None, None]:
        """Yield, after each decoding step, each example's best hypothesis still being extended (or,
        once it has none, its best finished one) as one candidate ``(token_ids, score)``, scored as
        a finished one would be; then what ``__call__`` returns: the ``n_best`` candidates.

        Example::

            for candidates in BeamSearch().stream(modules, batch, device, beam_size=4, n_best=2):
                print(candidates[0])    # the first example's candidates so far
        """
        steps = self._steps(modules, batch, device, params)
        length_penalty = float(self._value("length_penalty", params))
        while True:
            try:
                step, history, live_scores, finished = next(steps)
            except StopIteration as end:
                yield end.value
                return
            size, k = live_scores.shape
            best_scores, best = live_scores.max(dim=1)
            rows = (torch.arange(size, device=best.device) * k + best).tolist()
            partial = []
            for b, (row, score) in enumerate(zip(rows, best_scores.tolist())):
                if score != float("-inf"):
                    partial.append([(history[row].tolist(), score / step**length_penalty)])
                else:  # every hypothesis of this example has finished
                    partial.append(sorted(finished[b], key=lambda c: -c[1])[:1])
            yield partial

    def _steps(
        self, modules: ModuleSet, batch: Batch, device: torch.device, params: Mapping[str, Any]
    ) -> Generator[tuple[int, torch.Tensor, torch.Tensor, list[list[Candidate]]], None, list[list[Candidate]]]:
        """The search: yields after each step but the last (see ``_search``); returns each example's
        ``n_best`` candidates."""
        beam_size = self._count("beam_size", params)
        n_best = self._count("n_best", params)
        if n_best > beam_size:
            raise ParamError(
                f"Parameter 'n_best' ({n_best}) must be at most beam_size ({beam_size}): the search "
                f"finds beam_size candidates. Ask for a larger beam too, e.g. "
                f"{{'beam_size': {n_best}, 'n_best': {n_best}}}."
            )
        max_length = self._count("max_length", params)
        length_penalty = float(self._value("length_penalty", params))
        encode, decode = self._entry_points(modules, device)
        memory, state, src_mask = self._encode(encode, batch)
        finished = yield from self._search(decode, memory, state, src_mask, beam_size, max_length, length_penalty)
        # Stable sort: equal scores keep the order in which they were found.
        return [sorted(found, key=lambda c: -c[1])[:n_best] for found in finished]

    def _search(
        self,
        decode: Callable[..., Any],
        memory: Any,
        state: Any,
        src_mask: torch.Tensor,
        beam_size: int,
        max_length: int,
        length_penalty: float,
    ) -> Generator[tuple[int, torch.Tensor, torch.Tensor, list[list[Candidate]]], None, list[list[Candidate]]]:
        """Every example's ``beam_size`` finished hypotheses, as ``(token_ids, normalised score)``.
        After each step that leaves hypotheses to extend, yields the step, the token history of
        every hypothesis (row ``b * beam_size + j``), the live hypotheses' total log-probabilities
        ``(batch, beam_size)`` (-inf where none) and the finished hypotheses so far."""
        size, k, device = src_mask.shape[0], beam_size, src_mask.device
        # Hypothesis j of example b lives in row b * k + j of every batch-first tensor.
        rows = torch.arange(size, device=device).repeat_interleave(k)
        memory, state, src_mask = _select(memory, rows), _select(state, rows), src_mask[rows]
        tokens = torch.full((size * k,), self.bos_id, dtype=torch.long, device=device)
        history = torch.empty((size * k, 0), dtype=torch.long, device=device)
        # Only the first hypothesis is real at the start; were the others live too, the beam would
        # fill with k copies of the same extension.
        live_scores = torch.full((size, k), float("-inf"), device=device)
        live_scores[:, 0] = 0.0
        n_finished = torch.zeros(size, dtype=torch.long, device=device)
        finished: list[list[Candidate]] = [[] for _ in range(size)]
        ranks = torch.arange(k, device=device).unsqueeze(0)
        first_rows = (torch.arange(size, device=device) * k).unsqueeze(1)
        for step in range(1, max_length + 1):
            scores, state = decode(tokens, state, memory, src_mask)
            log_probs = self._log_probs(scores)
            vocab = log_probs.shape[1]
            extensions = (live_scores.reshape(-1, 1) + log_probs).reshape(size, k * vocab)
            # The k best extensions always include the best (k - finished) ones this step may keep.
            top_scores, top_index = extensions.topk(k, dim=1)
            parents = first_rows + torch.div(top_index, vocab, rounding_mode="floor")
            new_tokens = top_index % vocab
            kept = (ranks < (k - n_finished).unsqueeze(1)) & torch.isfinite(top_scores)
            ends = kept & ((new_tokens == self.eos_id) | (step == max_length))
            if bool(ends.any()):
                for b, j in ends.nonzero().tolist():
                    ids = history[parents[b, j]].tolist()
                    token = int(new_tokens[b, j])
                    if token != self.eos_id:
                        ids.append(token)  # stopped by max_length, not by EOS
                    score = float(top_scores[b, j]) / step**length_penalty
                    finished[b].append((ids, score))
                n_finished = n_finished + ends.sum(dim=1)
            live = kept & ~ends
            if not bool(live.any()):
                break
            live_scores = torch.where(live, top_scores, torch.full_like(top_scores, float("-inf")))
            order = parents.reshape(-1)
            history = torch.cat([history[order], new_tokens.reshape(-1, 1)], dim=1)
            tokens = new_tokens.reshape(-1)
            state = _select(state, order)
            # memory and src_mask need no reordering: a hypothesis never changes example.
            yield step, history, live_scores, finished
        return finished


def _result(steps: Generator[_Step, None, _Result]) -> _Result:
    """What a search returns, its steps run without looking at them (``__call__``)."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _check_count_default(name: str, argument: str, value: Any) -> int:
    """The default of a count argument (its value, or its Param's default), checked to be >= 1."""
    default = param_default(value)
    if not is_int(default) or default < 1:
        raise ConfigError(f"{name}: {argument} must be an int >= 1 (or a Param of one), got {default!r}.")
    return default


def _entry_point(
    modules: ModuleSet, device: torch.device, spec: str, argument: str, owner: str
) -> Callable[..., Any]:
    """The callable named by ``spec``: a module (``"decoder"``) or a TorchScript method
    (``"main.decode_step"``); ``argument`` and ``owner`` name the configuration in errors."""
    name, _, method = spec.partition(".")
    # Not `name in modules`: ModuleSet.__getitem__ raises ConfigError, which Mapping's `in` lets through.
    if name not in modules.formats:
        raise ConfigError(f"{owner}: {argument}={spec!r} names no module; the modules are {list(modules)}.")
    run = modules.runnable(name, device)
    if not method:
        return run
    if modules.formats[name] != TORCHSCRIPT:
        raise ConfigError(
            f"{owner}: {argument}={spec!r} names a method, but module '{name}' is a torch.export "
            "program (or a plain nn.Module, exported when saved), which has one entry point. Export encode "
            "and decode_step as two modules, pass module={'encoder': ..., 'decoder': ...} and "
            "encoder='encoder', decoder='decoder'."
        )
    function = getattr(run, method, None)
    if not callable(function):
        raise ConfigError(
            f"{owner}: {argument}={spec!r}: the TorchScript module '{name}' has no method '{method}'. "
            "Mark the method @torch.jit.export, or scripting drops it."
        )
    return function


def _select(value: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of a batch-first tensor, or of each tensor of a tuple or list."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, index) for v in value)
    raise ConfigError(
        f"The decoder state and memory must be tensors or tuples of tensors (batch first), got "
        f"{type(value).__name__}."
    )


def _until(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return type(value).__name__
