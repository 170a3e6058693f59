"""The tokenizer steps at their bounds: ids at the edge of the vocabulary and one past it, texts of
exactly ``max_length`` tokens and one more, and the smallest ``max_length`` each step accepts."""

from __future__ import annotations

import re

import pytest
import torch

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import SentencePieceDecode, SentencePieceEncode, TokenizerDecode, TokenizerEncode

tokenizers = pytest.importorskip("tokenizers")
sentencepiece = pytest.importorskip("sentencepiece")

TEXT = "What a great film"


@pytest.fixture(scope="module")
def spm(spm_path):
    return sentencepiece.SentencePieceProcessor(model_file=spm_path)


@pytest.fixture(scope="module")
def hf(hf_tokenizer_path):
    """The library's own tokenizer, without the padding and truncation saved in the file."""
    tokenizer = tokenizers.Tokenizer.from_file(hf_tokenizer_path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@pytest.fixture(scope="module")
def with_added_token(tmp_path_factory, hf_tokenizer_path) -> tuple[str, int]:
    """The WordPiece tokenizer with one token added after training: its id is past the model's own
    vocabulary, inside the tokenizer's."""
    tokenizer = tokenizers.Tokenizer.from_file(hf_tokenizer_path)
    assert tokenizer.add_tokens(["<extra>"]) == 1
    path = tmp_path_factory.mktemp("added") / "tokenizer.json"
    tokenizer.save(str(path))
    added = tokenizer.token_to_id("<extra>")
    assert added == tokenizer.get_vocab_size(with_added_tokens=False)
    return str(path), added


# -- SentencePieceDecode --------------------------------------------------------------------------


def test_sentencepiece_decode_accepts_the_first_and_last_id_of_the_vocabulary(spm_path, spm):
    last = spm.get_piece_size() - 1
    answer = SentencePieceDecode(fm.Artifact(spm_path))([([4, last], -1.0), (torch.tensor([0, 5]), -2.0)])
    assert answer["candidates"] == [spm.DecodeIds([4, last]), spm.DecodeIds([0, 5])]
    assert answer["scores"] == [-1.0, -2.0]


@pytest.mark.parametrize("bad", [64, -1, 1000])
def test_sentencepiece_decode_refuses_an_id_one_past_either_end_naming_the_candidate(spm_path, spm, bad):
    assert spm.get_piece_size() == 64
    with pytest.raises(fm.ConfigError, match=rf"^SentencePieceDecode: candidate 1 has token id\(s\) \[{bad}\] outside "
                                             rf"the vocabulary of .*spm\.model' \(64 tokens\); the module's output "
                                             r"vocabulary must be the target tokenizer's\.$"):
        SentencePieceDecode(fm.Artifact(spm_path))([([4, 5], 0.0), (torch.tensor([4, bad]), -1.0)])


def test_sentencepiece_decode_names_at_most_five_outside_ids(spm_path):
    with pytest.raises(fm.ConfigError, match=r"candidate 0 has token id\(s\) \[64, 65, 66, 67, 68\] outside"):
        SentencePieceDecode(fm.Artifact(spm_path))([([64, 65, 66, 67, 68, 69, 4], 0.0)])


# -- SentencePieceEncode --------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos, add_eos, smallest", [(False, False, 1), (True, False, 2), (False, True, 2),
                                                        (True, True, 3)])
def test_sentencepiece_encode_needs_room_for_one_token_besides_bos_and_eos(spm_path, add_bos, add_eos, smallest):
    artifact = fm.Artifact(spm_path)
    step = SentencePieceEncode(artifact, max_length=smallest, add_bos=add_bos, add_eos=add_eos)
    assert len(step(TEXT)) == smallest
    with pytest.raises(fm.ConfigError, match=rf"max_length must be an int >= {smallest} \(one token besides the BOS/EOS ids "
                                         rf"it adds\), got {smallest - 1}\.$"):
        SentencePieceEncode(artifact, max_length=smallest - 1, add_bos=add_bos, add_eos=add_eos)


def test_sentencepiece_encode_refuses_a_max_length_that_is_not_an_int(spm_path):
    with pytest.raises(fm.ConfigError, match=r"max_length must be an int >= 1 \(one token besides the BOS/EOS ids it adds\), "
                                         r"got 4\.0\.$"):
        SentencePieceEncode(fm.Artifact(spm_path), max_length=4.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_sentencepiece_encode_keeps_a_text_of_exactly_max_length_and_truncates_one_more(spm_path, spm, rows):
    ids = spm.EncodeAsIds(TEXT)
    n = len(ids)
    artifact = fm.Artifact(spm_path)
    bos, eos = spm.bos_id(), spm.eos_id()
    expected = {
        (n, False, False): ids, (n - 1, False, False): ids[:-1],
        (n + 2, True, True): [bos, *ids, eos], (n + 1, True, True): [bos, *ids[:-1], eos],
        (n + 1, True, False): [bos, *ids], (n, True, False): [bos, *ids[:-1]],
        (n + 1, False, True): [*ids, eos], (n, False, True): [*ids[:-1], eos],
    }
    for (max_length, add_bos, add_eos), want in expected.items():
        step = SentencePieceEncode(artifact, max_length=max_length, add_bos=add_bos, add_eos=add_eos)
        assert step(TEXT).tolist() == want, (max_length, add_bos, add_eos)
        assert [row.tolist() for row in step.batch([TEXT] * rows)] == [want] * rows, (max_length, add_bos, add_eos)


def test_sentencepiece_encode_refuses_a_text_without_tokens_alone_and_in_a_batch(spm_path):
    step = SentencePieceEncode(fm.Artifact(spm_path))
    with pytest.raises(fm.InputError, match="the text has no tokens"):
        step("   ")
    with pytest.raises(fm.InputError, match="the text has no tokens"):
        step.batch(["a film", ""] * 5)



def test_sentencepiece_encode_refuses_a_path_that_is_not_an_artifact_naming_the_argument_and_the_fix(spm_path):
    with pytest.raises(fm.ConfigError, match=r"^SentencePieceEncode: model_file must be an Artifact, got str; .*"
                                             r"Artifact\('spm\.model'\)"):
        SentencePieceEncode(spm_path)


def test_sentencepiece_encode_refuses_a_text_that_is_not_a_string_naming_its_type(spm_path):
    with pytest.raises(fm.InputError, match=r"^expected a string, got int$"):
        SentencePieceEncode(fm.Artifact(spm_path))(3)


def test_sentencepiece_encode_gives_each_row_of_a_small_batch_its_own_ids(spm_path, spm):
    texts = [TEXT, "a dull film", "what a plot"]
    for rows in (2, 3):
        got = SentencePieceEncode(fm.Artifact(spm_path)).batch(texts[:rows])
        assert [row.tolist() for row in got] == [spm.EncodeAsIds(text) for text in texts[:rows]]


# -- TokenizerDecode ------------------------------------------------------------------------------


def test_tokenizer_decode_accepts_the_first_and_last_id_of_the_vocabulary(hf_tokenizer_path, hf):
    last = hf.get_vocab_size(with_added_tokens=True) - 1
    answer = TokenizerDecode(fm.Artifact(hf_tokenizer_path), skip_special_tokens=False)(
        [(torch.tensor([0, last]), -0.5), ([last], -1.0)])
    assert answer["candidates"] == [hf.decode([0, last], skip_special_tokens=False), hf.decode([last])]
    assert answer["scores"] == [-0.5, -1.0]


@pytest.mark.parametrize("past", [0, -1])  # the size itself, and -1
def test_tokenizer_decode_refuses_an_id_one_past_either_end_naming_the_candidate(hf_tokenizer_path, hf, past):
    size = hf.get_vocab_size(with_added_tokens=True)
    bad = size if past == 0 else -1
    with pytest.raises(fm.ConfigError, match=rf"^TokenizerDecode: candidate 1 has token id\(s\) \[{bad}\] outside the "
                                             rf"vocabulary of .*tokenizer\.json' \({size} tokens\); the module's "
                                             r"output vocabulary must be the target tokenizer's\.$"):
        TokenizerDecode(fm.Artifact(hf_tokenizer_path))([([4], 0.0), (torch.tensor([4, bad]), -1.0)])


def test_tokenizer_decode_checks_every_row_of_a_batch(hf_tokenizer_path, hf):
    size = hf.get_vocab_size(with_added_tokens=True)
    step = TokenizerDecode(fm.Artifact(hf_tokenizer_path))
    with pytest.raises(fm.ConfigError, match=rf"candidate 0 has token id\(s\) \[{size}, {size + 1}, {size + 2}, "
                                             rf"{size + 3}, {size + 4}\] outside"):
        step.batch([[([4], 0.0)], [(list(range(size, size + 6)), 0.0)]])


def test_tokenizer_decode_counts_tokens_added_after_training_as_vocabulary(with_added_token):
    path, added = with_added_token
    step = TokenizerDecode(fm.Artifact(path), skip_special_tokens=False)
    assert step([([added], 0.0)])["generated_text"] == "<extra>"
    with pytest.raises(fm.ConfigError, match=rf"\[{added + 1}\] outside the vocabulary .*\({added + 1} tokens\)"):
        step([([added + 1], 0.0)])


# -- TokenizerEncode ------------------------------------------------------------------------------


def test_tokenizer_encode_accepts_max_length_one_and_refuses_zero(hf_tokenizer_path, hf):
    artifact = fm.Artifact(hf_tokenizer_path)
    ids = TokenizerEncode(artifact, max_length=1, add_special_tokens=False)(TEXT).tolist()
    assert ids == hf.encode(TEXT, add_special_tokens=False).ids[:1]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(fm.ConfigError, match=rf"^TokenizerEncode: max_length must be an int >= 1, got {bad!r}\.$"):
            TokenizerEncode(artifact, max_length=bad)


def test_tokenizer_encode_needs_room_for_one_token_besides_the_special_ones(hf_tokenizer_path, hf):
    assert hf.num_special_tokens_to_add(False) == 2
    artifact = fm.Artifact(hf_tokenizer_path)
    cls, sep = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    first = hf.encode(TEXT, add_special_tokens=False).ids[0]
    assert TokenizerEncode(artifact, max_length=3)(TEXT).tolist() == [cls, first, sep]
    for too_small in (2, 1):
        step = TokenizerEncode(artifact, max_length=too_small)
        with pytest.raises(fm.ConfigError, match=rf"^TokenizerEncode: max_length={too_small} leaves no room for the "
                                                 r"text: the tokenizer .*tokenizer\.json' adds 2 special tokens; use a "
                                                 r"max_length above 2, or add_special_tokens=False\.$"):
            step(TEXT)
    assert TokenizerEncode(artifact, max_length=2, add_special_tokens=False)(TEXT).tolist() == \
        hf.encode(TEXT, add_special_tokens=False).ids[:2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenizer_encode_keeps_a_text_of_exactly_max_length_and_truncates_one_more(hf_tokenizer_path, hf, side):
    artifact = fm.Artifact(hf_tokenizer_path)
    ids = hf.encode(TEXT, add_special_tokens=False).ids
    cls, sep = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    n = len(ids)
    assert n >= 3
    kept = ids[:-1] if side == "right" else ids[1:]
    cases = {(n + 2, True): [cls, *ids, sep], (n + 1, True): [cls, *kept, sep],
             (n, False): ids, (n - 1, False): kept}
    for (max_length, special), want in cases.items():
        step = TokenizerEncode(artifact, max_length=max_length, add_special_tokens=special, truncation_side=side)
        assert step(TEXT).tolist() == want, (max_length, special)
        assert [row.tolist() for row in step.batch([TEXT, TEXT])] == [want, want], (max_length, special)


# -- what the decode steps accept as candidates and columns ---------------------------------------


def decoders(spm_path, hf_tokenizer_path):
    return [(SentencePieceDecode, fm.Artifact(spm_path), "translation"),
            (TokenizerDecode, fm.Artifact(hf_tokenizer_path), "generated_text")]


@pytest.mark.parametrize("candidates", [iter([([4], 0.0)]), [([4], 0.0, "extra")], [(4, 0.0)], [[4]], "ab",
                                        torch.tensor([4, 5])])
def test_the_decode_steps_refuse_anything_but_a_list_of_id_score_pairs(spm_path, hf_tokenizer_path, candidates):
    for step, artifact, _ in decoders(spm_path, hf_tokenizer_path):
        with pytest.raises(fm.ConfigError, match=rf"^{step.__name__} expects a list of \(token_ids, score\) candidates "
                                                 r"per example, as GreedySearch and BeamSearch return, got "
                                                 rf"{type(candidates).__name__}; use one "
                                                 r"of them as the FullModel's forward strategy\.$"):
            step(artifact)(candidates)


@pytest.mark.parametrize("ids", [torch.tensor([[4, 5]]), torch.tensor([[4], [5]]), torch.tensor(4)])
def test_the_decode_steps_refuse_token_ids_that_are_not_one_dimensional(spm_path, hf_tokenizer_path, ids):
    for step, artifact, _ in decoders(spm_path, hf_tokenizer_path):
        with pytest.raises(fm.ConfigError, match=rf"^{step.__name__} expects a list of \(token_ids, score\) candidates"):
            step(artifact)([([4], 0.0), (ids, -1.0)])


def test_the_decode_steps_answer_the_best_candidate_in_their_default_column_and_nothing_for_none(spm_path,
                                                                                             hf_tokenizer_path):
    for step, artifact, column in decoders(spm_path, hf_tokenizer_path):
        decode = step(artifact)
        assert decode([]) == {column: "", "candidates": [], "scores": []}
        answer = decode([([4, 5], -1.0), ([6], -2.0)])
        assert answer[column] == answer["candidates"][0] != answer["candidates"][1]


@pytest.mark.parametrize("column", ["candidates", "scores", "", 5, None])
def test_the_decode_steps_refuse_a_column_that_is_not_a_free_name(spm_path, hf_tokenizer_path, column):
    for step, artifact, _ in decoders(spm_path, hf_tokenizer_path):
        with pytest.raises(fm.ConfigError, match=rf"^{step.__name__}: column must be a non-empty name other than 'candidates' "
                                        rf"and 'scores' \(the other output columns\), got {re.escape(repr(column))}\.$"):
            step(artifact, column=column)


def test_the_decode_steps_refuse_a_path_that_is_not_an_artifact(spm_path, hf_tokenizer_path):
    with pytest.raises(fm.ConfigError, match=r"^SentencePieceDecode: model_file must be an Artifact, got str; wrap the path: "
                                        r"Artifact\('target\.model'\)\.$"):
        SentencePieceDecode(spm_path)
    with pytest.raises(fm.ConfigError, match=r"^TokenizerDecode: tokenizer_file must be an Artifact, got str; wrap the "
                                             r"path: Artifact\('tokenizer\.json'\)\.$"):
        TokenizerDecode(hf_tokenizer_path)


def test_the_encode_steps_batch_refuses_rows_that_are_not_strings(spm_path, hf_tokenizer_path):
    for step in (SentencePieceEncode(fm.Artifact(spm_path)), TokenizerEncode(fm.Artifact(hf_tokenizer_path))):
        with pytest.raises(fm.InputError, match=r"^expected strings$"):
            step.batch(["a film", 3])
