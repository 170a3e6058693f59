"""Greedy and beam search against decoders whose next-token distribution is known exactly, and the
detokenising post-processing step.

``MarkovDecoder`` is a hand-built TorchScript encoder-decoder: the logits of the next token are a
table lookup by (a key computed from the real source tokens, the parity of the running sum of the
tokens fed so far, the previous token). The tests compute the same distribution in plain Python and
check the strategies against an exhaustive enumeration of all sequences and against a plain,
one-example-at-a-time re-implementation of the documented search.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import PadCollate
from mlflow_fullmodel.decoding import BeamSearch, Candidate, GreedySearch
from mlflow_fullmodel.modules import ModuleSet
from mlflow_fullmodel.storage.folder import load_fullmodel, save_fullmodel
from mlflow_fullmodel.transforms import SentencePieceDecode, SentencePieceEncode

PAD, UNK, BOS, EOS = 0, 1, 2, 3
NEG_INF = float("-inf")


class MarkovDecoder(nn.Module):
    """``logits = table[key, parity, previous token]``.

    ``key`` is the sum of the real source ids plus the source length, modulo ``table.shape[0]``,
    recomputed in every step from ``memory`` and ``src_mask`` (so a wrong mask or wrongly expanded
    memory changes the answer); ``parity`` is that of the state, the running sum of the tokens fed
    so far (so a state not reordered with its hypothesis changes it too)."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, src: Tensor, lengths: Tensor) -> Tensor:
        return self.encode(src, lengths)[0]

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        memory = (src + 1).unsqueeze(-1).float()  # (B, T, 1); padding counts 1 unless masked
        state = torch.zeros(src.shape[0], dtype=torch.long, device=src.device)
        return memory, state

    @torch.jit.export
    def decode_step(
        self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        key = (memory.squeeze(-1) * src_mask.float()).sum(1).long() % self.table.shape[0]
        logits = self.table[key, state % 2, tokens]
        return logits, state + tokens


class PairStateDecoder(MarkovDecoder):
    """The same distribution with an LSTM-like state: a tuple of two tensors."""

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        memory = (src + 1).unsqueeze(-1).float()
        zeros = torch.zeros(src.shape[0], dtype=torch.long, device=src.device)
        return memory, (zeros, zeros.clone())

    @torch.jit.export
    def decode_step(
        self, tokens: Tensor, state: tuple[Tensor, Tensor], memory: Tensor, src_mask: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        key = (memory.squeeze(-1) * src_mask.float()).sum(1).long() % self.table.shape[0]
        total = state[0] + state[1]
        logits = self.table[key, total % 2, tokens]
        return logits, (state[0] + tokens, state[1])


def random_table(keys: int = 3, vocab: int = 7, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(keys, 2, vocab, vocab, generator=generator) * 2


class Reference:
    """The decoder's distribution and the documented searches, in plain Python, one example at a
    time."""

    def __init__(self, table: Tensor) -> None:
        self.table = table.double()

    def log_probs(self, source: list[int], prefix: list[int]) -> list[float]:
        fed = [BOS, *prefix]
        key = (sum(source) + len(source)) % self.table.shape[0]
        logits = self.table[key, sum(fed[:-1]) % 2, fed[-1]]
        values = torch.log_softmax(logits, dim=0).tolist()
        values[PAD] = values[BOS] = NEG_INF  # never generated
        return values

    def greedy(self, source: list[int], max_length: int) -> tuple[list[int], float]:
        prefix: list[int] = []
        total = 0.0
        for _ in range(max_length):
            values = self.log_probs(source, prefix)
            token = max(range(len(values)), key=values.__getitem__)
            total += values[token]
            if token == EOS:
                break
            prefix.append(token)
        return prefix, total

    def every_sequence(self, source: list[int], max_length: int, length_penalty: float) -> list[Candidate]:
        """All sequences that end with EOS or reach max_length, best first: exhaustive search."""
        found: list[tuple[list[int], float]] = []

        def walk(prefix: list[int], score: float) -> None:
            step = len(prefix) + 1
            for token, value in enumerate(self.log_probs(source, prefix)):
                if value == NEG_INF:
                    continue
                if token == EOS:
                    found.append((prefix, (score + value) / step**length_penalty))
                elif step == max_length:
                    found.append(([*prefix, token], (score + value) / step**length_penalty))
                else:
                    walk([*prefix, token], score + value)

        walk([], 0.0)
        return sorted(found, key=lambda c: -c[1])

    def beam(self, source: list[int], beam_size: int, max_length: int, length_penalty: float) -> list[Candidate]:
        """BeamSearch's docstring, as a list algorithm."""
        live: list[tuple[list[int], float]] = [([], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for step in range(1, max_length + 1):
            extensions = [
                ([*prefix, token], score + value)
                for prefix, score in live
                for token, value in enumerate(self.log_probs(source, prefix))
                if value != NEG_INF
            ]
            extensions.sort(key=lambda e: -e[1])
            live = []
            for sequence, score in extensions[: beam_size - len(finished)]:
                if sequence[-1] == EOS:
                    finished.append((sequence[:-1], score / step**length_penalty))
                elif step == max_length:
                    finished.append((sequence, score / step**length_penalty))
                else:
                    live.append((sequence, score))
            if not live:
                break
        return sorted(finished, key=lambda c: -c[1])


def decode(strategy: fm.ForwardStrategy, module: Any, sources: list[list[int]], **params: Any) -> list[Any]:
    """Run a strategy on one padded batch, as FullModel.forward does."""
    batch = PadCollate(pad_value=PAD)([torch.tensor(s) for s in sources])
    with torch.inference_mode():
        return strategy(ModuleSet.of(module), batch, torch.device("cpu"), **params)


def assert_candidates_equal(got: list[tuple[list[int], float]], want: list[tuple[list[int], float]]) -> None:
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert [score for _, score in got] == pytest.approx([score for _, score in want], rel=1e-5, abs=1e-6)


def random_sources(count: int, seed: int = 0, vocab: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 6))] for _ in range(count)]


@fm.transform
def parse_ids(text: str) -> Tensor:
    """``"4 5 6"`` -> ``tensor([4, 5, 6])``: source ids written out, for FullModel tests."""
    return torch.tensor([int(t) for t in text.split()])


@pytest.fixture(scope="module")
def table() -> Tensor:
    return random_table()


@pytest.fixture(scope="module")
def scripted(table: Tensor) -> torch.jit.ScriptModule:
    return fm.script(MarkovDecoder(table))


@pytest.fixture(scope="module")
def reference(table: Tensor) -> Reference:
    return Reference(table)


class TestGreedySearch:
    def test_takes_the_most_probable_token_at_each_step(self, scripted, reference):
        sources = random_sources(12)
        got = decode(GreedySearch(), scripted, sources, max_length=8)
        assert [len(candidates) for candidates in got] == [1] * len(sources)
        for source, candidates in zip(sources, got):
            assert_candidates_equal(candidates, [reference.greedy(source, 8)])

    def test_stops_at_max_length_when_no_eos_comes(self, reference):
        table = random_table()
        table[..., EOS] = -20.0  # EOS is never the most probable token
        got = decode(GreedySearch(), fm.script(MarkovDecoder(table)), [[4, 5], [6]], max_length=5)
        assert [len(c[0][0]) for c in got] == [5, 5]
        assert all(EOS not in c[0][0] for c in got)


class TestBeamSearch:
    @pytest.mark.parametrize("length_penalty", [0.0, 1.0])
    def test_beam_size_one_is_greedy_search(self, scripted, length_penalty):
        sources = random_sources(20, seed=1)
        greedy = decode(GreedySearch(), scripted, sources, max_length=10)
        beam = decode(BeamSearch(), scripted, sources, beam_size=1, n_best=1, max_length=10,
                      length_penalty=length_penalty)
        assert [c[0][0] for c in beam] == [c[0][0] for c in greedy]
        if length_penalty == 0.0:  # then both scores are the total log-probability
            assert [c[0][1] for c in beam] == pytest.approx([c[0][1] for c in greedy], rel=1e-6)

    @pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
    def test_a_beam_wide_enough_for_every_hypothesis_returns_the_n_best_of_all_sequences(
        self, scripted, reference, length_penalty
    ):
        # 5 tokens can be generated (unk, eos and three words): with max_length 3 there are
        # 1 + 4 + 16 + 64 = 85 sequences, and a beam of 85 prunes none of them.
        sources = random_sources(4, seed=2)
        got = decode(BeamSearch(), scripted, sources, beam_size=85, n_best=10, max_length=3,
                     length_penalty=length_penalty)
        for source, candidates in zip(sources, got):
            assert_candidates_equal(candidates, reference.every_sequence(source, 3, length_penalty)[:10])

    def test_a_narrow_beam_follows_the_documented_search_step_by_step(self, scripted, reference):
        sources = random_sources(10, seed=3)
        got = decode(BeamSearch(), scripted, sources, beam_size=3, n_best=3, max_length=7, length_penalty=0.7)
        for source, candidates in zip(sources, got):
            assert_candidates_equal(candidates, reference.beam(source, 3, 7, 0.7))
        # ... and the beam is narrow enough here that pruning happened: it is not the exhaustive answer.
        exhaustive = [reference.every_sequence(s, 7, 0.7)[:3] for s in sources]
        assert [[ids for ids, _ in c] for c in got] != [[ids for ids, _ in c] for c in exhaustive]

    def test_a_padded_batch_gives_the_candidates_of_one_example_at_a_time(self, scripted):
        sources = random_sources(9, seed=4)
        assert len({len(s) for s in sources}) > 1  # so the batch is padded
        together = decode(BeamSearch(), scripted, sources, beam_size=4, n_best=4, max_length=8)
        for source, candidates in zip(sources, together):
            assert_candidates_equal(candidates, decode(BeamSearch(), scripted, [source], beam_size=4, n_best=4,
                                                       max_length=8)[0])

    def test_a_full_model_batches_any_way_and_answers_in_input_order(self, scripted):
        texts = [" ".join(map(str, s)) for s in random_sources(11, seed=5)]

        def model(batch_size: int) -> fm.FullModel:
            return fm.FullModel(preprocess=[parse_ids()], module=scripted, forward=BeamSearch(),
                                collate=PadCollate(pad_value=PAD), batch_size=batch_size)

        params = {"beam_size": 5, "n_best": 3}
        one_at_a_time = model(1).predict(texts, params=params)["prediction"].tolist()
        batched = model(4).predict(texts, params=params)["prediction"].tolist()
        for got, want in zip(batched, one_at_a_time):
            assert_candidates_equal([tuple(c) for c in got], [tuple(c) for c in want])

    def test_n_best_candidates_come_best_first_and_as_many_as_asked(self, scripted):
        sources = random_sources(6, seed=6)
        best = decode(BeamSearch(), scripted, sources, beam_size=5, n_best=1)
        for n_best in (1, 3, 5):
            got = decode(BeamSearch(), scripted, sources, beam_size=5, n_best=n_best)
            for candidates, first in zip(got, best):
                assert len(candidates) == n_best
                scores = [score for _, score in candidates]
                assert scores == sorted(scores, reverse=True)
                assert candidates[0] == first[0]
                assert len({tuple(ids) for ids, _ in candidates}) == n_best  # no duplicates

    def test_the_tuple_state_of_an_lstm_like_decoder_is_reordered_with_its_hypotheses(self, scripted, table):
        sources = random_sources(6, seed=7)
        pair = fm.script(PairStateDecoder(table))
        params = {"beam_size": 4, "n_best": 4, "max_length": 6}
        want = decode(BeamSearch(), scripted, sources, **params)
        for got, expected in zip(decode(BeamSearch(), pair, sources, **params), want):
            assert_candidates_equal(got, expected)

    def test_a_hypothesis_without_eos_stops_at_max_length(self):
        table = random_table()
        table[..., EOS] = -30.0
        got = decode(BeamSearch(), fm.script(MarkovDecoder(table)), [[4], [5, 6]], beam_size=3, n_best=3,
                     max_length=4)
        assert all(len(ids) == 4 and EOS not in ids for candidates in got for ids, _ in candidates)

    def test_length_penalty_decides_between_a_short_and_a_longer_candidate(self):
        # After BOS: EOS 0.5, "a" 0.45; after "a": EOS 0.95. The empty output has log-probability
        # log 0.5 = -0.69 over 1 token, "a" has log(0.45 * 0.95) = -0.85 over 2 tokens.
        probabilities = torch.full((1, 2, 6, 6), 1e-9)
        probabilities[..., BOS, :] = torch.tensor([1e-9, 0.01, 1e-9, 0.5, 0.45, 0.04])
        probabilities[..., 4, :] = torch.tensor([1e-9, 0.01, 1e-9, 0.95, 0.02, 0.02])
        probabilities[..., 5, :] = torch.tensor([1e-9, 0.01, 1e-9, 0.9, 0.04, 0.05])
        module = fm.script(MarkovDecoder(probabilities.log()))
        by_total, by_mean = (
            decode(BeamSearch(), module, [[4]], beam_size=2, n_best=2, length_penalty=penalty)[0]
            for penalty in (0.0, 1.0)
        )
        assert [ids for ids, _ in by_total] == [[], [4]]
        assert [s for _, s in by_total] == pytest.approx([math.log(0.5), math.log(0.45 * 0.95)], rel=1e-5)
        assert [ids for ids, _ in by_mean] == [[4], []]
        assert [s for _, s in by_mean] == pytest.approx([math.log(0.45 * 0.95) / 2, math.log(0.5)], rel=1e-5)
        assert decode(GreedySearch(), module, [[4]])[0][0][0] == []  # greedy takes EOS first

    def test_two_torch_export_programs_decode_like_the_torchscript_methods(self, table):
        net = MarkovDecoder(table).eval()

        class Encode(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
                return self.net.encode(src, lengths)

        class DecodeStep(Encode):
            def forward(self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor) -> Any:
                return self.net.decode_step(tokens, state, memory, src_mask)

        n, t = torch.export.Dim("n", min=1), torch.export.Dim("t", min=1)
        encoder = torch.export.export(Encode(), (torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 2])),
                                      dynamic_shapes=({0: n, 1: t}, {0: n}))
        decoder = torch.export.export(
            DecodeStep(),
            (torch.full((2,), BOS), torch.zeros(2, dtype=torch.long), torch.ones(2, 3, 1),
             torch.ones(2, 3, dtype=torch.bool)),
            dynamic_shapes=({0: n}, {0: n}, {0: n, 1: t}, {0: n, 1: t}),
        )
        strategy = BeamSearch(encoder="encoder", decoder="decoder")
        sources = random_sources(5, seed=8)
        got = decode(strategy, {"encoder": encoder, "decoder": decoder}, sources, beam_size=3, n_best=2)
        want = decode(BeamSearch(), fm.script(net), sources, beam_size=3, n_best=2)
        for g, w in zip(got, want):
            assert_candidates_equal(g, w)


class TestDecodingErrors:
    @pytest.fixture
    def model(self, scripted) -> fm.FullModel:
        return fm.FullModel(preprocess=[parse_ids()], module=scripted, forward=BeamSearch())

    @pytest.mark.parametrize("strategy", [BeamSearch(), GreedySearch()], ids=["beam", "greedy"])
    def test_left_padding_is_refused_when_the_model_is_built(self, scripted, strategy):
        with pytest.raises(fm.ConfigError, match=r"needs source batches padded on the right, but the collate step "
                                                 r"PadCollate\(pad_side='left'\) pads on the left"):
            fm.FullModel(preprocess=[parse_ids()], module=scripted, forward=strategy,
                         collate=fm.PadCollate(pad_side="left"))

    @pytest.mark.parametrize(
        "params, message",
        [
            ({"n_best": 5}, r"Parameter 'n_best' \(5\) must be at most beam_size \(4\)"),
            ({"n_best": 3, "beam_size": 2}, r"Parameter 'n_best' \(3\) must be at most beam_size \(2\)"),
            ({"n_best": 0}, r"Parameter 'n_best' must be >= 1, got 0"),
            ({"n_best": -2}, r"Parameter 'n_best' must be >= 1, got -2"),
            ({"beam_size": 0}, r"Parameter 'beam_size' must be >= 1, got 0"),
            ({"beam_size": -1}, r"Parameter 'beam_size' must be >= 1, got -1"),
            ({"max_length": 0}, r"Parameter 'max_length' must be >= 1, got 0"),
            ({"beam_size": "wide"}, r"Parameter 'beam_size' must be of type int"),
        ],
    )
    def test_bad_params_are_refused_naming_the_parameter(self, model, params, message):
        with pytest.raises(fm.ParamError, match=message):
            model.predict(["4 5"], params=params)

    def test_params_saved_without_bounds_are_still_checked_by_the_strategy(self, scripted):
        strategy = BeamSearch(beam_size=fm.Param(4), n_best=fm.Param(1), max_length=fm.Param(8))
        model = fm.FullModel(preprocess=[parse_ids()], module=scripted, forward=strategy)
        for name, value in (("n_best", 0), ("beam_size", -3), ("max_length", 0)):
            with pytest.raises(fm.ParamError, match=rf"Parameter '{name}' must be an int >= 1, got {value}"):
                model.predict(["4 5"], params={name: value})

    def test_fixed_values_need_no_params_and_expose_none(self, scripted):
        strategy = BeamSearch(beam_size=3, n_best=2, max_length=5, length_penalty=0.0)
        model = fm.FullModel(preprocess=[parse_ids()], module=scripted, forward=strategy)
        assert list(model.params) == ["on_error"]  # only the parameter every model has
        assert len(model.predict(["4 5"])["prediction"][0]) == 2

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"n_best": fm.Param(5), "beam_size": fm.Param(4)}, r"n_best \(5\) must be at most beam_size \(4\)"),
            ({"beam_size": 0}, "beam_size must be an int >= 1"),
            ({"n_best": fm.Param(0)}, "n_best must be an int >= 1"),
            ({"max_length": 2.5}, "max_length must be an int >= 1"),
            ({"length_penalty": fm.Param(1)},
             r"length_penalty=Param\(1\) .* give a float default, e.g. Param\(1.0\)"),
            ({"eos_id": 0, "pad_id": 0}, "eos_id and pad_id are both 0"),
            ({"bos_id": -1}, "bos_id must be a token id"),
            ({"decoder": "main.decode.step"}, "decoder must name a module"),
        ],
    )
    def test_a_configuration_that_cannot_work_is_refused_at_construction(self, kwargs, message):
        with pytest.raises(fm.ConfigError, match=message):
            BeamSearch(**kwargs)

    def test_a_method_the_module_does_not_export_is_named_with_the_fix(self, scripted):
        with pytest.raises(fm.ConfigError, match=r"has no method 'step'. Mark the method @torch.jit.export"):
            decode(GreedySearch(decoder="main.step"), scripted, [[4]])
        with pytest.raises(fm.ConfigError, match=r"names no module; the modules are \['main'\]"):
            decode(GreedySearch(encoder="encoder"), scripted, [[4]])

    def test_examples_that_are_not_token_id_tensors_are_refused(self, scripted):
        batch = PadCollate()([(torch.tensor([4]), torch.tensor([5]))])
        with pytest.raises(fm.ConfigError, match="one 1-D tensor of source token ids"):
            BeamSearch()(ModuleSet.of(scripted), batch, torch.device("cpu"))


class TestSentencePieceDecode:
    def test_candidates_become_the_best_text_all_texts_and_their_scores(self, spm_path):
        encode = SentencePieceEncode(fm.Artifact(spm_path))
        step = SentencePieceDecode(fm.Artifact(spm_path))
        great, dull = encode("a great film").tolist(), encode("a dull plot").tolist()
        answer = step([(great, -0.5), (torch.tensor(dull), -1.25)])
        assert answer == {"translation": "a great film", "candidates": ["a great film", "a dull plot"],
                          "scores": [-0.5, -1.25]}
        summary = SentencePieceDecode(fm.Artifact(spm_path), column="summary")
        assert summary([(great, 0.0)])["summary"] == "a great film"

    def test_the_output_columns_do_not_depend_on_n_best(self, spm_path, scripted):
        size = SentencePieceDecode(fm.Artifact(spm_path))._processor.get_piece_size()
        model = fm.FullModel(
            preprocess=[parse_ids()],
            module=fm.script(MarkovDecoder(random_table(vocab=size))),
            forward=BeamSearch(max_length=fm.Param(6, minimum=1)),
            postprocess=[SentencePieceDecode(fm.Artifact(spm_path))],
        )
        one, three = (model.predict(["4 5", "6"], params={"n_best": n}) for n in (1, 3))
        assert list(one.columns) == list(three.columns) == ["translation", "candidates", "scores"]
        assert [len(c) for c in three["candidates"]] == [3, 3] and [len(c) for c in one["scores"]] == [1, 1]
        assert three["translation"].tolist() == one["translation"].tolist()
        assert [c[0] for c in three["candidates"]] == three["translation"].tolist()

    def test_a_token_id_outside_the_tokenizer_vocabulary_is_a_clear_error(self, spm_path):
        step = SentencePieceDecode(fm.Artifact(spm_path))
        with pytest.raises(fm.ConfigError, match=r"token id\(s\) \[5000\] outside the vocabulary"):
            step([([4, 5000], -1.0)])

    def test_an_output_that_is_not_a_candidate_list_names_the_strategies_to_use(self, spm_path):
        with pytest.raises(fm.ConfigError, match="GreedySearch and BeamSearch"):
            SentencePieceDecode(fm.Artifact(spm_path))(torch.tensor([0.2, 0.8]))

    def test_bad_arguments_are_refused_at_construction(self, spm_path):
        with pytest.raises(fm.ConfigError, match="wrap the path"):
            SentencePieceDecode(spm_path)
        with pytest.raises(fm.ConfigError, match="column must be"):
            SentencePieceDecode(fm.Artifact(spm_path), column="scores")


def test_repr_shows_the_runtime_parameters_that_differ_from_the_defaults():
    assert repr(BeamSearch(n_best=fm.Param(2, minimum=1))) == "BeamSearch(n_best=Param(2, minimum=1))"


def test_a_saved_and_reloaded_translator_decodes_the_same(spm_path, tmp_path):
    size = SentencePieceDecode(fm.Artifact(spm_path))._processor.get_piece_size()
    model = fm.FullModel(
        preprocess=[SentencePieceEncode(fm.Artifact(spm_path))],
        module=fm.script(MarkovDecoder(random_table(vocab=size, seed=9))),
        forward=BeamSearch(max_length=fm.Param(6, minimum=1)),
        postprocess=[SentencePieceDecode(fm.Artifact(spm_path))],
        collate=PadCollate(pad_value=PAD),
    )
    texts = ["a great film", "dull", "the plot was superb"]
    save_fullmodel(model, str(tmp_path / "m"))
    loaded = load_fullmodel(str(tmp_path / "m"))
    assert loaded.params.keys() == {"on_error", "beam_size", "n_best", "max_length", "length_penalty"}
    for params in (None, {"beam_size": 6, "n_best": 3, "length_penalty": 0.0}):
        pd.testing.assert_frame_equal(loaded.predict(texts, params=params), model.predict(texts, params=params))
