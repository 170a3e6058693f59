"""TokenizerEncode and TokenizerDecode: Hugging Face ``tokenizers`` tokenizers trained here, in a
model saved, loaded, logged and served from a fresh environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from contract import plain_config
from sample_steps import LABELS, corpus
from servers import free_port, server_log, start, stop, wait_for
from support import HF_SPECIAL_TOKENS

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import PadCollate
from mlflow_fullmodel.transforms import TokenizerDecode, TokenizerEncode, TopK

tokenizers = pytest.importorskip("tokenizers")

PAD, CLS, SEP = (HF_SPECIAL_TOKENS.index(token) for token in ("[PAD]", "[CLS]", "[SEP]"))
TEXTS = ["What a GREAT film!", "Dull  and boring.", "The plot was superb, the actor wonderful and the story brilliant"]


@pytest.fixture(scope="module")
def bpe_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A byte-level BPE ``tokenizer.json`` trained here: it decodes every text back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text for text, _ in corpus(400, seed=1)], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def reference(path: str) -> tokenizers.Tokenizer:
    """The library's own tokenizer of ``path``, without the padding and truncation saved in it."""
    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class MaskedMean(torch.nn.Module):
    """Mean of the token embeddings where ``attention_mask`` is 1, then a linear layer."""

    def __init__(self, vocab_size: int, classes: int, dim: int = 8) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, dim)
        self.out = torch.nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.out((self.embedding(input_ids) * mask).sum(1) / mask.sum(1))


class Echo(torch.nn.Module):
    """A sequence-to-sequence module for greedy search that says its source again, then EOS."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.eos_id = eos_id

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return src

    @torch.jit.export
    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return src, torch.zeros(src.shape[0], dtype=torch.long, device=src.device)

    @torch.jit.export
    def decode_step(self, tokens: torch.Tensor, state: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.clamp(state, max=memory.shape[1] - 1).unsqueeze(1)
        said = torch.where(state < src_mask.sum(1), memory.gather(1, position).squeeze(1),
                           torch.full_like(state, self.eos_id))
        return torch.nn.functional.one_hot(said, self.vocab_size).float() * 20.0, state + 1


def masked_model(path: str) -> fm.FullModel:
    torch.manual_seed(0)
    return fm.FullModel(
        preprocess=[TokenizerEncode(fm.Artifact(path), max_length=16, return_attention_mask=True)],
        module=fm.script(MaskedMean(reference(path).get_vocab_size(), len(LABELS))),
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        collate=PadCollate(pad_value=PAD, pad_values={"attention_mask": 0}),
        batch_size=4,
    )


class TestTokenizerEncode:
    def test_encodes_like_the_library_with_the_post_processors_special_tokens(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path))
        for text in TEXTS:
            ids = step(text)
            assert ids.dtype == torch.long and ids.dim() == 1
            assert ids.tolist() == reference(hf_tokenizer_path).encode(text).ids
            assert ids[0].item() == CLS and ids[-1].item() == SEP and PAD not in ids.tolist()

    def test_the_files_own_padding_and_truncation_are_replaced_by_the_steps_arguments(self, hf_tokenizer_path):
        saved = tokenizers.Tokenizer.from_file(hf_tokenizer_path)
        assert len(saved.encode("great").ids) == 40  # the file pads to 40 and truncates to 6
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=10)
        assert step("great").tolist() == reference(hf_tokenizer_path).encode("great").ids
        assert len(step(TEXTS[2])) == 10

    @pytest.mark.parametrize("side", ["right", "left"])
    def test_long_texts_are_truncated_to_max_length_with_room_for_the_special_tokens(self, hf_tokenizer_path, side):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=6, truncation_side=side)
        whole = reference(hf_tokenizer_path).encode(TEXTS[2], add_special_tokens=False).ids
        kept = whole[:4] if side == "right" else whole[-4:]
        assert step(TEXTS[2]).tolist() == [CLS, *kept, SEP]

    def test_without_special_tokens_only_the_texts_tokens_are_kept(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=3, add_special_tokens=False)
        whole = reference(hf_tokenizer_path).encode(TEXTS[0], add_special_tokens=False).ids
        assert step(TEXTS[0]).tolist() == whole[:3]

    def test_attention_mask_and_token_type_ids_are_one_dict_with_the_ids(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), return_attention_mask=True, return_token_type_ids=True)
        example = step(TEXTS[0])
        assert list(example) == ["input_ids", "attention_mask", "token_type_ids"]
        n = len(reference(hf_tokenizer_path).encode(TEXTS[0]).ids)
        assert example["input_ids"].tolist() == reference(hf_tokenizer_path).encode(TEXTS[0]).ids
        assert example["attention_mask"].tolist() == [1] * n
        assert example["token_type_ids"].tolist() == [0] * n
        assert all(t.dtype == torch.long for t in example.values())
        assert list(TokenizerEncode(fm.Artifact(hf_tokenizer_path), return_token_type_ids=True)("great")) == [
            "input_ids", "token_type_ids"]

    def test_padding_gives_the_mask_zeros_and_the_ids_the_pad_id(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), return_attention_mask=True)
        batch = PadCollate(pad_value=PAD, pad_values={"attention_mask": 0})(step.batch(["great", TEXTS[2]]))
        short = len(step("great")["input_ids"])
        longest = batch.inputs["input_ids"].shape[1]
        assert batch.inputs["attention_mask"][0].tolist() == [1] * short + [0] * (longest - short)
        assert batch.inputs["input_ids"][0, short:].tolist() == [PAD] * (longest - short)
        assert batch.lengths.tolist() == [short, longest]

    @pytest.mark.parametrize("rows", [1, 3, 8, 64])
    @pytest.mark.parametrize("with_mask", [False, True])
    def test_batch_encoding_gives_each_row_what_it_gets_alone(self, hf_tokenizer_path, bpe_tokenizer_path, rows,
                                                              with_mask):
        words = "a superb film with a dull plot and a great director who never stops talking".split()
        texts = [" ".join(words[i % 5: i % 5 + 1 + i % 13]) for i in range(rows)]
        for path in (hf_tokenizer_path, bpe_tokenizer_path):
            step = TokenizerEncode(fm.Artifact(path), max_length=8, return_attention_mask=with_mask)
            batch = step.batch(texts)
            assert len(batch) == rows
            for text, example in zip(texts, batch):
                alone = step(text)
                if with_mask:
                    assert all(torch.equal(example[k], alone[k]) for k in alone) and list(example) == list(alone)
                else:
                    assert torch.equal(example, alone), text

    def test_batch_encoding_is_the_librarys_batch_call(self, hf_tokenizer_path, monkeypatch):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path))
        calls = []
        tokenizer = step._tokenizer
        monkeypatch.setattr(step, "_tokenizer", type("Spy", (), {
            "encode_batch": lambda self, texts, **kw: calls.append(len(texts)) or tokenizer.encode_batch(texts, **kw),
        })())
        step.batch(TEXTS)
        assert calls == [3]

    @pytest.mark.parametrize("text", ["", "   ", "\n\t"])
    def test_a_text_with_no_tokens_is_an_input_error(self, hf_tokenizer_path, text):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path))
        with pytest.raises(fm.InputError, match=r"the text has no tokens \(it is empty or only whitespace\)"):
            step(text)
        with pytest.raises(fm.InputError, match="the text has no tokens"):
            step.batch(["great", text])

    def test_unknown_words_are_tokens_not_an_empty_text(self, hf_tokenizer_path):
        assert TokenizerEncode(fm.Artifact(hf_tokenizer_path))("€€").tolist() == [CLS, 0, SEP]  # 0: [UNK]

    def test_a_row_that_is_not_a_string_is_an_input_error_naming_its_type(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path))
        with pytest.raises(fm.InputError, match="expected a string, got int"):
            step(3)
        with pytest.raises(fm.InputError, match="expected strings"):
            step.batch(["great", b"bytes"])

    def test_in_a_model_a_bad_row_is_named(self, hf_tokenizer_path):
        with pytest.raises(fm.InputError, match=r"Row 1: preprocess\[0\] TokenizerEncode: the text has no tokens"):
            masked_model(hf_tokenizer_path).predict(["great", "  ", "dull"])

    @pytest.mark.parametrize(("arguments", "message"), [
        ({"tokenizer_file": "tokenizer.json"}, r"tokenizer_file must be an Artifact, got str; wrap the path"),
        ({"max_length": 0}, r"max_length must be an int >= 1, got 0"),
        ({"max_length": True}, r"max_length must be an int >= 1, got True"),
        ({"add_special_tokens": "yes"}, r"add_special_tokens must be True or False, got 'yes'"),
        ({"truncation_side": "middle"}, r"truncation_side must be 'right' or 'left', got 'middle'"),
        ({"return_attention_mask": 1}, r"return_attention_mask must be True or False, got 1"),
        ({"return_token_type_ids": None}, r"return_token_type_ids must be True or False, got None"),
    ])
    def test_bad_configuration_is_refused_at_construction_naming_the_argument(self, hf_tokenizer_path, arguments,
                                                                              message):
        arguments = {"tokenizer_file": fm.Artifact(hf_tokenizer_path), **arguments}
        with pytest.raises(fm.ConfigError, match=f"TokenizerEncode: {message}"):
            TokenizerEncode(**arguments)

    def test_a_max_length_with_no_room_for_the_text_is_refused_at_first_use(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=2)
        with pytest.raises(fm.ConfigError, match=r"max_length=2 leaves no room for the text: .* adds 2 special tokens"):
            step("great")
        assert TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=2, add_special_tokens=False)("great film")\
            .tolist() == reference(hf_tokenizer_path).encode("great film", add_special_tokens=False).ids

    def test_a_file_that_is_not_a_tokenizer_json_is_refused_naming_it(self, tmp_path):
        (tmp_path / "vocab.json").write_text(json.dumps({"great": 0}))
        with pytest.raises(fm.ConfigError, match=r"vocab.json' is not a Hugging Face tokenizers file"):
            TokenizerEncode(fm.Artifact(tmp_path / "vocab.json"))("great")
        (tmp_path / "spm.model").write_bytes(b"\xff\xfe\x00binary")
        with pytest.raises(fm.ConfigError, match=r"cannot read .*spm.model' as a tokenizer.json file"):
            TokenizerEncode(fm.Artifact(tmp_path / "spm.model"))("great")

    def test_the_tokenizer_is_built_from_the_verified_bytes(self, hf_tokenizer_path):
        step = TokenizerEncode(fm.Artifact(hf_tokenizer_path, sha256="0" * 64))
        with pytest.raises(fm.IntegrityError, match="changed after the model's files were checked"):
            step("great")

    def test_without_the_tokenizers_package_the_error_names_the_install(self, hf_tokenizer_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "tokenizers", None)
        for step in (TokenizerEncode, TokenizerDecode):
            with pytest.raises(fm.ConfigError, match=r"needs the tokenizers package.*pip install tok"):
                step(fm.Artifact(hf_tokenizer_path))


class TestTokenizerDecode:
    def test_the_best_candidate_is_the_column_and_every_candidate_is_decoded(self, hf_tokenizer_path):
        encode = TokenizerEncode(fm.Artifact(hf_tokenizer_path), add_special_tokens=False)
        first, second = encode("a superb film").tolist(), encode("a dull plot").tolist()
        answer = TokenizerDecode(fm.Artifact(hf_tokenizer_path))([(first, -0.5), (torch.tensor(second), -1.25)])
        assert answer == {"generated_text": "a superb film", "candidates": ["a superb film", "a dull plot"],
                          "scores": [-0.5, -1.25]}

    def test_special_tokens_are_skipped_unless_asked_to_keep_them(self, hf_tokenizer_path):
        ids = TokenizerEncode(fm.Artifact(hf_tokenizer_path))("great film").tolist()
        assert TokenizerDecode(fm.Artifact(hf_tokenizer_path))([(ids, 0.0)])["generated_text"] == "great film"
        kept = TokenizerDecode(fm.Artifact(hf_tokenizer_path), column="text", skip_special_tokens=False)([(ids, 0.0)])
        assert kept["text"] == "[CLS] great film [SEP]"

    def test_a_byte_level_bpe_tokenizer_decodes_its_ids_back_to_the_text(self, bpe_tokenizer_path):
        artifact = fm.Artifact(bpe_tokenizer_path)
        encode, decode = TokenizerEncode(artifact), TokenizerDecode(artifact)
        for text in [*TEXTS, "Ünïcode and emoji 🎬 too"]:
            assert decode([(encode(text), 0.0)])["generated_text"] == text

    def test_batch_decoding_gives_each_row_what_it_gets_alone(self, hf_tokenizer_path):
        encode = TokenizerEncode(fm.Artifact(hf_tokenizer_path), add_special_tokens=False)
        step = TokenizerDecode(fm.Artifact(hf_tokenizer_path))
        rows = [[(encode(TEXTS[i % 3]).tolist(), -float(i)), (encode(TEXTS[(i + 1) % 3]).tolist(), -2.0)][: 1 + i % 2]
                for i in range(5)] + [[]]
        assert step.batch(rows) == [step(row) for row in rows]
        assert step([]) == {"generated_text": "", "candidates": [], "scores": []}

    def test_an_id_outside_the_vocabulary_is_refused_naming_the_candidate(self, hf_tokenizer_path):
        with pytest.raises(fm.ConfigError, match=r"candidate 1 has token id\(s\) \[5000\] outside the vocabulary"):
            TokenizerDecode(fm.Artifact(hf_tokenizer_path))([([4], 0.0), ([4, 5000], -1.0)])

    def test_an_input_that_is_not_candidates_names_the_strategies_that_make_them(self, hf_tokenizer_path):
        with pytest.raises(fm.ConfigError, match="expects a list of \\(token_ids, score\\) candidates.*got Tensor"):
            TokenizerDecode(fm.Artifact(hf_tokenizer_path))(torch.tensor([4, 5]))

    @pytest.mark.parametrize(("arguments", "message"), [
        ({"tokenizer_file": Path("tokenizer.json")}, r"tokenizer_file must be an Artifact, got PosixPath"),
        ({"column": "scores"}, r"column must be a non-empty name other than 'candidates' and 'scores'"),
        ({"skip_special_tokens": "no"}, r"skip_special_tokens must be True or False, got 'no'"),
    ])
    def test_bad_configuration_is_refused_at_construction_naming_the_argument(self, hf_tokenizer_path, arguments,
                                                                              message):
        arguments = {"tokenizer_file": fm.Artifact(hf_tokenizer_path), **arguments}
        with pytest.raises(fm.ConfigError, match=f"TokenizerDecode: {message}"):
            TokenizerDecode(**arguments)


def test_greedy_search_between_the_two_steps_answers_text_also_after_saving(hf_tokenizer_path, tmp_path):
    vocab = reference(hf_tokenizer_path).get_vocab_size()
    model = fm.FullModel(
        preprocess=[TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=32, add_special_tokens=False)],
        module=fm.script(Echo(vocab, eos_id=SEP)),
        forward=fm.GreedySearch(bos_id=CLS, eos_id=SEP, pad_id=PAD, max_length=fm.Param(40, minimum=1)),
        collate=PadCollate(pad_value=PAD),
        postprocess=[TokenizerDecode(fm.Artifact(hf_tokenizer_path))],
        batch_size=2,
    )
    expected = [reference(hf_tokenizer_path).decode(reference(hf_tokenizer_path).encode(text).ids) for text in TEXTS]
    assert expected[0] == "what a great film!"
    answers = model.predict(TEXTS)
    assert answers["generated_text"].tolist() == expected
    assert answers["candidates"].tolist() == [[text] for text in expected]
    fm.save_model(model, str(tmp_path / "model"), input_example=TEXTS)
    pd.testing.assert_frame_equal(fm.load_model(str(tmp_path / "model")).predict(TEXTS), answers)


def test_a_padded_row_scores_as_it_does_alone_because_its_mask_pads_with_zeros(hf_tokenizer_path):
    model = masked_model(hf_tokenizer_path)
    step, collate, net = model.preprocess[0], model.collate, model.module["main"]
    examples = step.batch(TEXTS)
    with torch.inference_mode():  # as FullModel calls it: TorchScript shares a class's plans across instances
        together = net(**collate(examples).inputs)
        alone = [net(**collate([example]).inputs)[0] for example in examples]
    for i, text in enumerate(TEXTS):
        assert torch.allclose(together[i], alone[i], atol=1e-6), text


def test_a_saved_model_lists_tokenizers_keeps_the_json_and_predicts_the_same_after_loading(hf_tokenizer_path, tmp_path):
    model = masked_model(hf_tokenizer_path)
    path = tmp_path / "model"
    fm.save_model(model, str(path), input_example=TEXTS)
    requirements = (path / "requirements.txt").read_text().splitlines()
    assert f"tokenizers=={tokenizers.__version__}" in requirements
    (saved,) = path.glob("**/tokenizer_file/tokenizer.json")
    assert json.loads(saved.read_text())["model"]["type"] == "WordPiece"
    assert saved.read_bytes() == Path(hf_tokenizer_path).read_bytes()
    assert not [p for p in path.rglob("*") if p.suffix in (".pkl", ".pickle")]
    expected = model.predict(TEXTS, params={"k": 2})
    loaded = fm.load_model(str(path))
    assert plain_config(loaded.preprocess[0]) == plain_config(model.preprocess[0])
    assert loaded.preprocess[0].tokenizer_file.path.startswith(str(path))
    pd.testing.assert_frame_equal(loaded.predict(TEXTS, params={"k": 2}), expected)
    pyfunc = mlflow.pyfunc.load_model(str(path))
    pd.testing.assert_frame_equal(pyfunc.predict(pd.DataFrame({"text": TEXTS}), params={"k": 2}), expected)


@pytest.mark.slow
def test_a_logged_model_serves_from_a_fresh_environment_built_from_its_requirements(hf_tokenizer_path, tracking):
    from mlflow_fullmodel.fresh_env import fresh_env
    from mlflow_fullmodel.verification import verify_model

    model = masked_model(hf_tokenizer_path)
    with mlflow.start_run():
        info = fm.log_model(model, name="model", input_example=TEXTS)
    report = verify_model(info.model_uri, fresh_env=True)  # parity with the golden example there
    assert "fresh-env" in report.checks
    local = mlflow.artifacts.download_artifacts(info.model_uri)
    python = fresh_env(os.path.join(local, "requirements.txt"))  # the environment verify built, reused
    probe = subprocess.run(
        [python, "-I", "-c",
         "import importlib.util as u, tokenizers; print(tokenizers.__version__, u.find_spec('mlflow_fullmodel'))"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [tokenizers.__version__, "None"]

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=tracking, PATH=os.path.dirname(python) + os.pathsep + env.get("PATH", ""))
    process = start([python, "-m", "mlflow", "models", "serve", "-m", info.model_uri, "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/ping", process, "mlflow models serve in a fresh environment", seconds=300)
        answer = requests.post(f"{url}/invocations", json={"inputs": TEXTS, "params": {"k": 2}}, timeout=60)
        assert answer.status_code == 200, answer.text
        expected = model.predict(TEXTS, params={"k": 2})
        predictions = answer.json()["predictions"]
        assert [row["label"] for row in predictions] == expected["label"].tolist()
        assert [row["top_labels"] for row in predictions] == expected["top_labels"].tolist()
        for row, probabilities in zip(predictions, expected["top_probabilities"]):
            assert row["top_probabilities"] == pytest.approx(list(probabilities), abs=1e-6)
        empty = requests.post(f"{url}/invocations", json={"inputs": ["great", " "]}, timeout=60)
        assert empty.status_code == 400, empty.text
        assert "Row 1: preprocess[0] TokenizerEncode: the text has no tokens" in empty.json()["message"]
    except AssertionError:
        print(server_log(process))
        raise
    finally:
        stop(process)
