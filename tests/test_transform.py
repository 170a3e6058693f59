"""The configuration contract of steps: constructor arguments only, shown by repr, saved as JSON."""

from __future__ import annotations

import pytest
import torch
from contract import copies, plain_config, round_trip

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import PadCollate
from mlflow_fullmodel.forward import CallModule
from mlflow_fullmodel.pipeline import apply_step
from mlflow_fullmodel.storage.folder import encoded_config
from mlflow_fullmodel.transforms import (
    CenterCrop,
    DecodeImage,
    NormalizeImage,
    RandomCrops,
    Resize,
    SentencePieceDecode,
    SentencePieceEncode,
    TokenizerDecode,
    TokenizerEncode,
    TopK,
    ToTensor,
)


def builtin_steps(spm_path: str, hf_tokenizer_path: str) -> list[fm.transform.Configurable]:
    """One configured instance of every built-in step; a new built-in belongs here."""
    return [
        SentencePieceEncode(fm.Artifact(spm_path), max_length=8, add_bos=True, add_eos=True),
        SentencePieceDecode(fm.Artifact(spm_path), column="summary"),
        TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=9, truncation_side="left",
                        return_attention_mask=True, return_token_type_ids=True),
        TokenizerDecode(fm.Artifact(hf_tokenizer_path), column="summary", skip_special_tokens=False),
        TopK(labels=["a", "b", "c"], k=fm.Param(2)),
        DecodeImage(mode="L", max_pixels=10_000),
        Resize([20, 30], interpolation="nearest"),
        CenterCrop(16),
        RandomCrops(8, tta=fm.Param(4, minimum=1), seed=fm.Param(7)),
        ToTensor(),
        NormalizeImage(mean=[0.5], std=[0.25]),
        PadCollate(pad_value=3, pad_side="left", pad_values={"attention_mask": 0}),
        CallModule(module="encoder"),
        fm.AverageOverSamples(softmax=False),
        fm.GreedySearch(bos_id=1, eos_id=2, pad_id=0, max_length=fm.Param(9, minimum=1)),
        fm.BeamSearch(beam_size=fm.Param(3, minimum=1), n_best=fm.Param(2, minimum=1), length_penalty=0.5),
    ]


def test_every_builtin_step_module_is_listed_in_the_contract_check(spm_path, hf_tokenizer_path):
    import mlflow_fullmodel.transforms as builtins

    listed = {type(step).__name__ for step in builtin_steps(spm_path, hf_tokenizer_path)}
    assert set(builtins.__all__) <= listed


def test_every_builtin_step_round_trips_through_json_to_an_equal_step(spm_path, hf_tokenizer_path, tmp_path):
    for step in builtin_steps(spm_path, hf_tokenizer_path):
        rebuilt = round_trip(step, tmp_path)
        assert type(rebuilt) is type(step)
        assert plain_config(rebuilt) == plain_config(step)
        assert not [n for n in vars(rebuilt) if not n.startswith("_") and n not in step.config_names()]


def test_every_builtin_step_copies_deep_copies_and_pickles_to_an_equal_step(spm_path, hf_tokenizer_path):
    for step in builtin_steps(spm_path, hf_tokenizer_path):
        for copied in copies(step):
            assert type(copied) is type(step) and copied == step and repr(copied) == repr(step)


def test_a_tokenizer_already_used_copies_and_pickles_and_encodes_alike(spm_path, hf_tokenizer_path):
    text = "a superb film with a dull plot"
    for step in (SentencePieceEncode(fm.Artifact(spm_path), max_length=8),
                 TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=9)):
        step(text)  # its tokenizer loaded and held
        for copied in copies(step):
            assert torch.equal(copied(text), step(text))


def test_a_step_with_required_arguments_runs_in_a_spawned_dataloader_worker(spm_path):
    from sample_steps import StepDataset

    texts = ["a superb film", "a dull plot", "the director"]
    step = SentencePieceEncode(fm.Artifact(spm_path), max_length=8)
    loader = torch.utils.data.DataLoader(StepDataset(step, texts), batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")
    assert [ids.tolist() for ids in loader] == [step(text).tolist() for text in texts]


def test_a_full_model_deep_copies_and_answers_alike(text_model):
    import copy

    texts = ["What a GREAT film!", "Dull  and boring."]
    copied = copy.deepcopy(text_model)
    assert copied.predict(texts).equals(text_model.predict(texts))


def test_a_rebuilt_tokenizer_encodes_exactly_like_the_original(spm_path, tmp_path):
    step = SentencePieceEncode(fm.Artifact(spm_path), max_length=8, add_bos=True, add_eos=True)
    rebuilt = round_trip(step, tmp_path)
    assert rebuilt.model_file.path.startswith(str(tmp_path))
    text = "a superb film with a dull plot and a great director"
    assert torch.equal(rebuilt(text), step(text))
    ids = step(text)
    assert len(ids) == 8 and ids[0].item() == 2 and ids[-1].item() == 3


@pytest.mark.parametrize("rows", [1, 7, 8, 63, 64, 200])
def test_batch_encoding_gives_each_row_the_ids_it_gets_alone(spm_path, rows):
    # Few rows are encoded one by one, more in one call, many on every core: same ids each way.
    step = SentencePieceEncode(fm.Artifact(spm_path), max_length=12, add_eos=True)
    words = "a superb film with a dull plot and a great director who never stops talking".split()
    texts = [" ".join(words[i % 5 : i % 5 + 1 + i % 13]) for i in range(rows)]
    batch = step.batch(texts)
    assert len(batch) == rows
    for text, ids in zip(texts, batch):
        assert torch.equal(ids, step(text)), text


def test_repr_shows_only_arguments_that_differ_from_their_defaults(spm_path):
    assert repr(PadCollate()) == "PadCollate()"
    assert repr(PadCollate(pad_value=3)) == "PadCollate(pad_value=3)"
    assert repr(TopK(labels=["a", "b"], k=fm.Param(1))) == "TopK(labels=['a', 'b'], k=Param(1))"


def test_arguments_are_stored_before_init_so_init_only_validates():
    class Scale(fm.Transform):
        def __init__(self, factor: float = 2.0) -> None:
            if factor <= 0:
                raise ValueError("Scale: factor must be positive")

        def __call__(self, x):
            return x * self.factor

    assert Scale(3.0).factor == 3.0 and Scale().factor == 2.0
    assert Scale(factor=4.0)(2) == 8.0
    with pytest.raises(ValueError, match="factor must be positive"):
        Scale(-1)


def test_star_args_in_a_constructor_are_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"\*kwargs"):
        class Loose(fm.Transform):
            def __init__(self, **kwargs) -> None:
                pass


def test_a_public_attribute_that_is_not_an_argument_is_refused_at_save_time():
    step = TopK(labels=["a", "b"])
    step.threshold = 0.5
    with pytest.raises(fm.ConfigError, match=r"TopK has public attribute\(s\) \['threshold'\]"):
        encoded_config(step, "postprocess[0]")


def test_an_argument_changed_after_construction_is_saved_not_dropped():
    step = TopK(labels=["a", "b"])
    step.labels = ["x", "y"]
    assert encoded_config(step, "postprocess[0]")["labels"] == ["x", "y"]


def test_a_value_that_is_not_json_is_refused_naming_the_step_and_argument():
    step = TopK(labels=["a", "b"], softmax=torch.tensor(1.0))
    with pytest.raises(fm.ConfigError, match=r"postprocess\[0\] TopK, argument 'softmax': a value of type Tensor"):
        encoded_config(step, "postprocess[0]")


def test_a_missing_artifact_file_is_refused_naming_the_argument(tmp_path):
    step = SentencePieceEncode.__new__(SentencePieceEncode, fm.Artifact(tmp_path / "nope.model"))
    with pytest.raises(fm.ConfigError, match=r"argument 'model_file': the artifact .*nope.model.* does not exist"):
        encoded_config(step, "preprocess[0]")


class TestTransformDecorator:
    def test_a_function_becomes_a_transform_class_with_its_keyword_arguments_as_config(self):
        @fm.transform
        def truncate(text: str, max_chars: int = 5) -> str:
            return text[:max_chars]

        assert issubclass(truncate, fm.Transform)
        assert truncate()("abcdefgh") == "abcde"
        assert truncate(max_chars=2)("abcdefgh") == "ab"
        assert repr(truncate(max_chars=2)) == "truncate(max_chars=2)"

    def test_a_param_default_becomes_a_runtime_parameter(self):
        @fm.transform
        def shout(text: str, times: int = fm.Param(1)) -> str:
            return text * times

        step = shout()
        assert list(step.params()) == ["times"]
        assert step("ab") == "ab"
        assert step("ab", times=3) == "ababab"

    def test_a_param_may_share_its_name_with_the_example_argument_of_call_and_batch(self):
        # The example is passed positionally: a runtime parameter named like the base class's
        # example argument (``__call__(x)``, ``batch(xs)``) must not collide with it.
        @fm.transform
        def repeat(text: str, x: int = fm.Param(1), xs: str = fm.Param("")) -> str:
            return text * x + xs

        step = repeat()
        assert step("ab", x=2, xs="!") == "abab!"
        assert step.batch(["ab", "c"], x=3, xs="") == ["ababab", "ccc"]
        assert apply_step(step, "preprocess[0]", [0, 1], ["ab", "c"], {"x": 2, "xs": "."}) == ([0, 1], ["abab.", "cc."])

    def test_an_argument_without_default_is_refused(self):
        with pytest.raises(TypeError, match="argument 'n' of .*needs a default"):
            @fm.transform
            def cut(text, n):
                return text[:n]


class TestParam:
    def test_values_are_converted_to_the_type_of_the_default(self):
        assert fm.Param(1).validate("k", 3.0) == 3
        assert fm.Param(0.5).validate("t", 1) == 1.0
        with pytest.raises(fm.ParamError, match="Parameter 'k' must be of type int, got a str of length 1."):
            fm.Param(1).validate("k", "3")
        with pytest.raises(fm.ParamError, match="Parameter 'k' must be of type int"):
            fm.Param(1).validate("k", True)

    def test_bounds_and_choices_are_enforced_naming_the_parameter(self):
        with pytest.raises(fm.ParamError, match="Parameter 'k' must be >= 1, got 0"):
            fm.Param(1, minimum=1).validate("k", 0)
        with pytest.raises(fm.ParamError, match=r"Parameter 'mode' must be one of \['a', 'b'\]"):
            fm.Param("a", choices=["a", "b"]).validate("mode", "c")

    def test_a_default_outside_the_bounds_is_refused_at_construction(self):
        with pytest.raises(fm.ParamError):
            fm.Param(0, minimum=1)

    @pytest.mark.parametrize("build, message", [
        (lambda: fm.Param("x", minimum=1), r"^Param\('x', minimum=1\): minimum bounds numbers only, and the default "
                                           r"is a str; limit a str with choices=\[\.\.\.\]\.$"),
        (lambda: fm.Param("x", maximum=1.5), r"^Param\('x', maximum=1\.5\): maximum bounds numbers only"),
        (lambda: fm.Param(1, minimum="0"), r"^Param\(1, minimum='0'\): minimum must be a number \(an int or a "
                                           r"float\), got a str\.$"),
        (lambda: fm.Param(1.0, maximum=True), r"^Param\(1\.0, maximum=True\): maximum must be a number"),
        (lambda: fm.Param.from_dict({"default": "a", "minimum": 0}), r"^Param\('a', minimum=0\): minimum bounds"),
    ])
    def test_a_bound_that_is_not_a_number_or_bounds_a_str_is_a_config_error(self, build, message):
        with pytest.raises(fm.ConfigError, match=message):
            build()

    def test_a_non_scalar_default_is_refused(self):
        with pytest.raises(fm.ConfigError, match="Param default must be"):
            fm.Param([1, 2])


@pytest.mark.parametrize("param, accepted, refused", [
    (fm.Param(1, minimum=0), [0, 5], [-1]),
    (fm.Param(-1, maximum=0), [0, -7], [1]),
    (fm.Param(0, minimum=0, maximum=0), [0], [-1, 1]),
    (fm.Param(0.5, minimum=0.0), [0.0, 2.5], [-0.001]),
])
def test_a_bound_of_zero_is_a_bound(param, accepted, refused):
    for value in accepted:
        assert param.validate("p", value) == value
    for value in refused:
        with pytest.raises(fm.ParamError, match="Parameter 'p' must be"):
            param.validate("p", value)
