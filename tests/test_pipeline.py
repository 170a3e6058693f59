"""FullModel in memory: the data path, inputs, params, batching, collation, devices, threads."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch
from sample_steps import LABELS, Normalize, Repeat
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import PadCollate, uncollate
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK


def test_predict_returns_the_postprocess_columns_one_row_per_input_in_input_order(text_model):
    result = text_model.predict(EXAMPLE_TEXTS)
    assert list(result.columns) == ["label", "probability", "top_labels", "top_probabilities"]
    assert len(result) == len(EXAMPLE_TEXTS)
    # batch_size=2 with length sorting reorders rows internally; each row must match a solo call.
    for i, text in enumerate(EXAMPLE_TEXTS):
        alone = text_model.predict([text])
        assert alone["label"][0] == result["label"][i]
        assert alone["probability"][0] == pytest.approx(result["probability"][i], rel=1e-6)


def test_the_same_rows_give_the_same_answers_as_a_list_a_dataframe_or_a_dict_of_columns(text_model):
    from_list = text_model.predict(EXAMPLE_TEXTS)
    pd.testing.assert_frame_equal(text_model.predict(pd.DataFrame({"text": EXAMPLE_TEXTS})), from_list)
    pd.testing.assert_frame_equal(text_model.predict([{"text": t} for t in EXAMPLE_TEXTS]), from_list)
    pd.testing.assert_frame_equal(text_model.predict({"text": EXAMPLE_TEXTS}), from_list)


def test_probabilities_are_a_softmax_of_the_module_scores(text_model, scripted_net):
    ids = text_model.preprocess[1](Normalize()(EXAMPLE_TEXTS[0]))
    scores = scripted_net(ids[None, :], torch.tensor([len(ids)]))[0]
    expected = torch.softmax(scores.double(), 0)
    result = text_model.predict(EXAMPLE_TEXTS[:1], params={"k": 2})
    assert result["top_probabilities"][0] == pytest.approx(sorted(expected.tolist(), reverse=True))
    assert result["label"][0] == LABELS[int(expected.argmax())]


@pytest.mark.parametrize("softmax", [True, False])
def test_top_k_of_a_few_rows_in_python_equals_top_k_of_many_in_torch(softmax):
    torch.manual_seed(0)
    scores = torch.randn(40, 7) * 4
    scores[3] = 1.0  # a tie: the lower index first, both ways
    if not softmax:
        scores = torch.softmax(scores, 1)
    step = TopK(labels=[f"c{i}" for i in range(7)], k=5, softmax=softmax)
    many = step.batch(list(scores), k=5)  # more rows than the Python path takes
    few = [answer for row in scores for answer in step.batch([row], k=5)]
    assert [a["top_labels"] for a in few] == [a["top_labels"] for a in many]
    assert few[3]["top_labels"] == ["c0", "c1", "c2", "c3", "c4"]
    for a, b in zip(few, many):
        assert a["top_probabilities"] == pytest.approx(b["top_probabilities"], rel=1e-12, abs=0)
        assert a["probability"] == a["top_probabilities"][0]
    expected = torch.topk(torch.softmax(scores.double(), 1) if softmax else scores.double(), 5, dim=1)
    for answer, values in zip(few, expected.values.tolist()):
        assert answer["top_probabilities"] == pytest.approx(values, rel=1e-12)


def test_a_param_changes_the_answer_but_not_the_columns(text_model):
    one = text_model.predict(EXAMPLE_TEXTS)
    two = text_model.predict(EXAMPLE_TEXTS, params={"k": 2})
    assert list(one.columns) == list(two.columns)
    assert all(len(x) == 1 for x in one["top_labels"]) and all(len(x) == 2 for x in two["top_labels"])


def test_an_unknown_param_is_an_error_listing_the_valid_ones(text_model):
    with pytest.raises(fm.ParamError, match=r"Unknown parameter\(s\) \['kk'\]. Valid parameters are: \['k', 'on_error'\]"):
        text_model.predict(EXAMPLE_TEXTS, params={"kk": 2})


def test_a_param_out_of_bounds_is_an_error_naming_it(text_model):
    with pytest.raises(fm.ParamError, match="Parameter 'k' must be <= 2, got 3"):
        text_model.predict(EXAMPLE_TEXTS, params={"k": 3})


def test_two_steps_declaring_the_same_param_name_is_an_error_at_construction(spm_path, scripted_net):
    with pytest.raises(fm.ConfigError, match=r"'times' is declared by both preprocess\[0\] and preprocess\[1\]"):
        fm.FullModel(
            preprocess=[Repeat(times=fm.Param(1)), Repeat(times=fm.Param(2))],
            module=scripted_net,
        )


def test_a_param_reaches_the_preprocess_step_that_declared_it(spm_path, scripted_net):
    model = fm.FullModel(
        preprocess=[Repeat(times=fm.Param(1, minimum=1)), SentencePieceEncode(fm.Artifact(spm_path), max_length=64)],
        module=scripted_net,
        postprocess=[TopK(labels=LABELS)],
    )
    doubled = model.predict(["good film"], params={"times": 2})
    explicit = model.predict(["good film good film"])
    assert doubled["probability"][0] == pytest.approx(explicit["probability"][0])


def test_a_missing_column_is_an_error_naming_the_row_and_the_expected_columns(text_model):
    with pytest.raises(fm.InputError, match=r"Missing column\(s\) \['text'\]; the model expects columns \['text'\], got \['review', 'other'\]"):
        text_model.predict(pd.DataFrame({"review": ["x"], "other": [1]}))
    with pytest.raises(fm.InputError, match=r"Row 1 has no column 'text'; the model expects columns \['text'\]"):
        text_model.predict([{"text": "x"}, {"review": "y"}])


def test_a_null_value_is_an_error_naming_row_and_column(text_model):
    with pytest.raises(fm.InputError, match=r"Row 1, column 'text': value is missing"):
        text_model.predict(["fine", None])


def test_a_row_a_step_rejects_is_an_input_error_naming_the_row_and_the_step(text_model):
    with pytest.raises(fm.InputError, match=r"Row 2: preprocess\[1\] SentencePieceEncode: the text has no tokens"):
        text_model.predict(["fine", "good", "  "])


def test_a_step_that_breaks_on_a_row_is_a_model_error_naming_the_step_not_an_input_error(text_model):
    # Normalize calls str.lower without checking its input: an AttributeError is the step's fault.
    with pytest.raises(fm.ModelError, match=r"Row 2: preprocess\[0\] Normalize failed: AttributeError") as caught:
        text_model.predict(["fine", "good", 42])
    assert not isinstance(caught.value, fm.InputError) and caught.value.step == "preprocess[0] Normalize"


def test_something_that_is_not_a_module_is_refused_naming_what_is_accepted(scripted_net):
    with pytest.raises(fm.ConfigError, match=r"must be a torch.nn.Module .*TorchScript .*ExportedProgram, got function"):
        fm.FullModel(preprocess=[Normalize()], module=lambda ids: ids)


def test_a_transform_class_that_needs_no_arguments_may_be_given_uninstantiated(scripted_net):
    model = fm.FullModel(preprocess=[Normalize], module=scripted_net)
    assert isinstance(model.preprocess[0], Normalize)


def test_asking_for_cuda_where_there_is_none_is_a_clear_error(text_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(fm.DeviceError, match="CUDA is not available"):
        text_model.to("cuda")


def test_predict_from_many_threads_gives_each_caller_its_own_answers(text_model):
    inputs = [[f"good film {'great ' * i}", f"bad plot {'dull ' * (7 - i)}"] for i in range(8)]
    expected = [text_model.predict(rows, params={"k": 1 + i % 2}) for i, rows in enumerate(inputs)]
    results: dict[int, pd.DataFrame] = {}
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        barrier.wait(timeout=10)
        for _ in range(5):
            results[i] = text_model.predict(inputs[i], params={"k": 1 + i % 2})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for i in range(8):
        pd.testing.assert_frame_equal(results[i], expected[i])


class TestPadCollate:
    def test_pads_variable_length_ids_and_reports_lengths(self):
        batch = PadCollate(pad_value=9)([torch.tensor([1, 2, 3]), torch.tensor([4])])
        assert batch.inputs.tolist() == [[1, 2, 3], [4, 9, 9]]
        assert batch.lengths.tolist() == [3, 1]

    def test_pads_on_the_left_when_asked(self):
        batch = PadCollate(pad_side="left")([torch.tensor([1, 2, 3]), torch.tensor([4])])
        assert batch.inputs.tolist() == [[1, 2, 3], [0, 0, 4]]

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32,
                                       torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("side", ["right", "left"])
    def test_padding_matches_torch_pad_sequence(self, dtype, side):
        # bfloat16 has no numpy type: it takes torch's own padding, the others are padded in numpy.
        generator = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, 2, (int(n),), generator=generator).to(dtype)
                for n in torch.randint(0, 7, (9,), generator=generator)]
        batch = PadCollate(pad_value=1, pad_side=side)(rows)
        expected = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=1, padding_side=side)
        assert batch.inputs.dtype == dtype
        assert torch.equal(batch.inputs, expected)
        assert batch.lengths.tolist() == [len(row) for row in rows]

    def test_stacks_fixed_size_tensors_and_recurses_into_dicts(self):
        batch = PadCollate()([{"image": torch.zeros(3, 2, 2), "ids": torch.tensor([1, 2])},
                              {"image": torch.ones(3, 2, 2), "ids": torch.tensor([3])}])
        assert batch.inputs["image"].shape == (2, 3, 2, 2)
        assert batch.inputs["ids"].tolist() == [[1, 2], [3, 0]]

    def test_members_of_dict_examples_take_their_own_pad_value_when_one_is_given(self):
        rows = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)},
                {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)}]
        for side, ids, mask in (("right", [8, 3, 3], [1, 0, 0]), ("left", [3, 3, 8], [0, 0, 1])):
            batch = PadCollate(pad_value=3, pad_side=side, pad_values={"attention_mask": 0})(rows)
            assert batch.inputs["input_ids"].tolist() == [[5, 6, 7], ids]
            assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], mask]
            assert batch.lengths.tolist() == [3, 1]

    @pytest.mark.parametrize("pad_values", [[0], {"attention_mask": "0"}, {"attention_mask": True}, {1: 0}])
    def test_pad_values_that_are_not_numbers_by_key_are_refused(self, pad_values):
        with pytest.raises(fm.ConfigError, match="PadCollate: pad_values must be a dict of key names to numbers"):
            PadCollate(pad_values=pad_values)

    def test_examples_of_different_structure_are_refused_naming_the_row(self):
        with pytest.raises(fm.InputError, match=r"row 1 has keys \['a'\], row 0 has \['a', 'b'\]"):
            PadCollate()([{"a": torch.tensor([1]), "b": torch.tensor([2])}, {"a": torch.tensor([1])}])

    def test_multi_dimensional_tensors_of_different_shapes_are_refused(self):
        with pytest.raises(fm.InputError, match="only 1-D tensors are padded"):
            PadCollate()([torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)])

    def test_uncollate_splits_tensors_tuples_and_dicts_per_example(self):
        rows = uncollate({"a": torch.arange(4).reshape(2, 2), "b": (torch.tensor([5, 6]),)}, 2)
        assert rows[1]["a"].tolist() == [2, 3] and rows[1]["b"][0].item() == 6
        assert uncollate([["x"], ["y", "z"]], 2) == [["x"], ["y", "z"]]
        with pytest.raises(ValueError, match="returned 1 outputs for 2 examples"):
            uncollate([["x"]], 2)


def test_a_torch_export_program_gives_the_same_answers_as_torchscript(spm_path, text_model):
    from sample_steps import BagOfIds

    torch.manual_seed(0)
    net = BagOfIds(vocab_size=64, classes=len(LABELS)).eval()
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    program = torch.export.export(
        net, (torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])),
        dynamic_shapes=({0: batch, 1: length}, {0: batch}),
    )
    exported = fm.FullModel(
        preprocess=text_model.preprocess, module=program, postprocess=text_model.postprocess, batch_size=2
    )
    texts = EXAMPLE_TEXTS + ["a much longer text " * 5]
    pd.testing.assert_frame_equal(exported.predict(texts, params={"k": 2}), text_model.predict(texts, params={"k": 2}))


def test_an_empty_text_is_an_error_not_a_confident_guess(text_model):
    with pytest.raises(fm.InputError, match=r"Row 1: preprocess\[1\] SentencePieceEncode: the text has no tokens"):
        text_model.predict(["fine", "   "])


def test_fm_script_makes_torchscript_without_the_torch_jit_deprecation_warning():
    import warnings

    from sample_steps import BagOfIds

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = fm.script(BagOfIds(vocab_size=8, classes=2))
    assert isinstance(scripted, torch.jit.ScriptModule) and not scripted.training
    assert not [w for w in caught if "torch.jit" in str(w.message)]


def test_length_buckets_cover_every_row_once_and_bound_the_padding():
    from mlflow_fullmodel.collate import length_buckets

    rng = __import__("random").Random(3)
    lengths = [rng.randint(1, 200) for _ in range(500)]
    buckets = length_buckets(lengths, max_size=32, tolerance=0.25)
    assert sorted(i for b in buckets for i in b) == list(range(500))
    for bucket in buckets:
        sizes = [lengths[i] for i in bucket]
        assert len(bucket) <= 32
        assert len(bucket) == 1 or len(bucket) * max(sizes) <= 1.25 * sum(sizes)
    assert length_buckets([7] * 70, max_size=32) == [list(range(32)), list(range(32, 64)), list(range(64, 70))]


# -- per-row errors: on_error="return" ---------------------------------------------------------


class RefusesLongInputs(torch.nn.Module):
    """A module that fails on any batch padded beyond ``limit`` tokens: a forward error of one row."""

    def __init__(self, vocab_size: int, classes: int, limit: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, classes)
        self.limit = limit

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.limit:
            raise RuntimeError("input longer than this module reads")
        return self.embedding(ids).sum(1)


BAD_ROWS = {1: "", 3: None, 5: 42}  # no tokens, null, not a string


def with_bad_rows(texts: list) -> list:
    rows = list(texts)
    for index, value in BAD_ROWS.items():
        rows.insert(index, value)
    return rows


def test_on_error_return_gives_bad_rows_their_error_and_every_other_row_its_answer(text_model):
    good = EXAMPLE_TEXTS + ["Superb plot", "awful dull film"]
    result = text_model.predict(with_bad_rows(good), params={"on_error": "return", "k": 2})
    assert len(result) == len(good) + len(BAD_ROWS)
    assert list(result.columns) == ["label", "probability", "top_labels", "top_probabilities", "error"]
    assert result["error"][1] == "Row 1: preprocess[1] SentencePieceEncode: the text has no tokens (it is empty or only whitespace)"
    assert result["error"][3] == "Row 3, column 'text': value is missing (null)."
    assert result["error"][5].startswith("Row 5: preprocess[0] Normalize failed: AttributeError")
    for index in BAD_ROWS:
        assert result.loc[index, ["label", "probability", "top_labels", "top_probabilities"]].isna().all()
    answered = result.drop(index=list(BAD_ROWS)).reset_index(drop=True)
    assert answered["error"].isna().all()
    pd.testing.assert_frame_equal(answered.drop(columns="error"), text_model.predict(good, params={"k": 2}))


def test_on_error_raise_is_the_default_and_names_the_row(text_model):
    with pytest.raises(fm.InputError, match=r"Row 1: preprocess\[1\] SentencePieceEncode: the text has no tokens"):
        text_model.predict(["Great film", "", "Dull"])
    with pytest.raises(fm.ParamError, match=r"Parameter 'on_error' must be one of \['raise', 'return'\], got a str of length 6"):
        text_model.predict(EXAMPLE_TEXTS, params={"on_error": "ignore"})


def test_a_row_whose_forward_pass_fails_does_not_change_the_answers_of_its_batch(spm_path):
    torch.manual_seed(0)
    module = fm.script(RefusesLongInputs(vocab_size=64, classes=len(LABELS), limit=12))
    model = fm.FullModel(preprocess=[Normalize(), SentencePieceEncode(fm.Artifact(spm_path), max_length=64)],
                         module=module, postprocess=[TopK(labels=LABELS)], batch_size=4)
    short = ["good film", "dull plot", "great actor", "bad story", "superb scene"]
    long = " ".join(["wonderful delightful brilliant"] * 8)
    rows = short[:2] + [long] + short[2:]
    result = model.predict(rows, params={"on_error": "return"})
    assert result["error"][2] == "Row 2: forward CallModule failed: RuntimeError: input longer than this module reads"
    assert result["error"].drop(index=2).isna().all()
    pd.testing.assert_frame_equal(result.drop(index=2).drop(columns="error").reset_index(drop=True), model.predict(short))
    with pytest.raises(fm.ModelError, match=r"^Row 2: forward CallModule failed: RuntimeError: input longer than "
                                            r"this module reads"):
        model.predict(rows)


def test_when_every_row_fails_only_the_error_column_is_known_in_memory(text_model):
    result = text_model.predict(["", "   "], params={"on_error": "return"})
    assert list(result.columns) == ["error"] and result["error"].str.startswith("Row ").all()


def test_a_step_may_not_declare_the_on_error_parameter(scripted_net):
    @fm.transform
    def lenient(text: str, on_error: str = "skip") -> str:
        return text

    with pytest.raises(fm.ConfigError, match=r"preprocess\[0\] \(lenient\) declares the runtime parameter 'on_error'"):
        fm.FullModel(preprocess=[lenient(on_error=fm.Param("skip"))], module=scripted_net)


# -- deadlines ------------------------------------------------------------------------------------

CALLS: list[str] = []


class Slow(fm.Transform):
    """Takes its time over every row, and says when it ran."""

    def __call__(self, text: str) -> str:
        import time

        time.sleep(0.05)
        CALLS.append("slow")
        return text


class Seen(fm.Transform):
    def __call__(self, answer):
        CALLS.append("postprocess")
        return answer


def test_work_past_the_deadline_stops_between_steps_and_does_not_run_on(spm_path, scripted_net):
    import time

    model = fm.FullModel(preprocess=[Slow(), Normalize(), SentencePieceEncode(fm.Artifact(spm_path))],
                         module=scripted_net, postprocess=[TopK(labels=LABELS), Seen()])
    CALLS.clear()
    with pytest.raises(fm.DeadlineError, match=r"went past its deadline and was stopped before preprocess\[1\]"):
        model._predict_records(["good film"] * 4, deadline=time.monotonic() + 0.1)
    assert CALLS == ["slow"] * 4  # nothing after the step that ran over
    CALLS.clear()
    assert len(model._predict_records(["good film"], deadline=time.monotonic() + 60)) == 1
    assert CALLS == ["slow", "postprocess"]


@pytest.mark.parametrize("batching", [False, True], ids=["alone", "micro-batched"])
def test_a_served_request_past_its_deadline_is_a_504_naming_the_setting(tmp_path, spm_path, scripted_net, batching):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = fm.FullModel(preprocess=[Slow(), Normalize(), SentencePieceEncode(fm.Artifact(spm_path))],
                         module=scripted_net, postprocess=[TopK(labels=LABELS)])
    fm.save_model(model, str(tmp_path / "m"), input_example=["good film"])
    served = mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config={"deadline_s": 0.01, "batching": batching})
    with pytest.raises(MlflowException) as caught:
        served.predict(pd.DataFrame({"text": ["good film"] * 3}))
    assert caught.value.get_http_status_code() == 504
    assert "deadline_s=0.01. Send fewer rows" in caught.value.message


def test_only_an_unnamed_column_is_taken_as_the_input_column(text_model):
    unnamed = pd.DataFrame(EXAMPLE_TEXTS)  # columns 0..n: what a list of values becomes
    pd.testing.assert_frame_equal(text_model.predict(unnamed), text_model.predict(EXAMPLE_TEXTS))
    with pytest.raises(fm.InputError, match=r"Missing column\(s\) \['text'\]; the model expects columns \['text'\], "
                                            r"got \['review'\]"):
        text_model.predict(pd.DataFrame({"review": EXAMPLE_TEXTS}))


def test_equal_steps_are_not_hashable_so_they_cannot_hash_apart():
    assert Normalize() == Normalize() and TopK(labels=LABELS) == TopK(labels=LABELS)
    with pytest.raises(TypeError, match="unhashable"):
        hash(TopK(labels=LABELS))


def test_a_deadline_passed_while_rows_are_isolated_stops_the_request_instead_of_blaming_a_row(text_model):
    def forward(examples, params):
        if len(examples) > 1:
            raise RuntimeError("one row of this batch is bad")
        raise fm.DeadlineError("the request's work went past its deadline and was stopped before forward")

    with pytest.raises(fm.DeadlineError, match="stopped before forward"):
        text_model._predict_records(EXAMPLE_TEXTS, params={"on_error": "return"}, forward_examples=forward)


def test_left_padding_of_dict_and_tuple_examples_pads_every_member_and_keeps_the_true_lengths():
    collate = PadCollate(pad_value=9, pad_side="left")
    batch = collate([{"ids": torch.tensor([1, 2, 3]), "mask": torch.tensor([1, 1, 1])},
                     {"ids": torch.tensor([4]), "mask": torch.tensor([1])}])
    assert batch.inputs["ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch.inputs["mask"].tolist() == [[1, 1, 1], [9, 9, 1]]
    assert batch.lengths.tolist() == [3, 1]
    pairs = collate([(torch.tensor([1, 2]), torch.tensor([5])), (torch.tensor([3]), torch.tensor([6, 7, 8]))])
    assert [member.tolist() for member in pairs.inputs] == [[[1, 2], [9, 3]], [[9, 9, 5], [6, 7, 8]]]
    assert pairs.lengths.tolist() == [2, 1]  # the first padded member's lengths


def test_top_k_with_a_plain_integer_k_returns_k_labels_and_adds_no_runtime_parameter(scripted_net, spm_path):
    model = fm.FullModel(preprocess=[Normalize(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                         postprocess=[TopK(labels=LABELS, k=2)])
    assert set(model.params) == {"on_error"}
    answer = model.predict(["a fine film"])
    assert len(answer["top_labels"][0]) == 2 and sorted(answer["top_labels"][0]) == sorted(LABELS)
    with pytest.raises(fm.ParamError, match=r"Unknown parameter\(s\) \['k'\]"):
        model.predict(["a fine film"], params={"k": 1})


@pytest.mark.parametrize("side, ids, mask", [
    ("right", [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]], [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
    ("left", [[9, 9, 1, 2, 3], [9, 9, 9, 9, 4]], [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]),
])
def test_a_fixed_length_pads_every_batch_to_it_on_its_side(side, ids, mask):
    collate = PadCollate(pad_value=9, pad_side=side, pad_values={"mask": 0}, length=5)
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    assert collate(rows).inputs.tolist() == ids and collate(rows).lengths.tolist() == [3, 1]
    batch = collate([{"ids": r, "mask": torch.ones_like(r)} for r in rows])
    assert batch.inputs["ids"].tolist() == ids and batch.inputs["mask"].tolist() == mask
    assert batch.lengths.tolist() == [3, 1]
    same = collate([{"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([3, 4])}])  # equal lengths: padded too
    assert same.inputs["ids"].shape == (2, 5) and same.lengths.tolist() == [2, 2]
    assert collate([torch.tensor([1, 2, 3, 4])]).inputs.shape == (1, 5)  # one position short of the length
    assert collate([{"ids": torch.tensor([1, 2, 3, 4])}]).inputs["ids"].shape == (1, 5)
    with pytest.raises(fm.InputError, match="An example has 6 positions but PadCollate pads to length=5"):
        collate([torch.arange(6)])
    with pytest.raises(fm.ConfigError, match="length must be None or an int >= 1, got 0"):
        PadCollate(length=0)


def test_lists_of_numbers_are_examples_and_rows_of_other_keys_are_named():
    batch = PadCollate()([[1, 2, 3], [4]])  # plain Python lists of ids, as a step may return them
    assert batch.inputs.tolist() == [[1, 2, 3], [4, 0, 0]] and batch.lengths.tolist() == [3, 1]
    members = PadCollate()([[torch.tensor([1, 2]), torch.tensor([5])], [torch.tensor([3]), torch.tensor([6, 7])]])
    assert [m.tolist() for m in members.inputs] == [[[1, 2], [3, 0]], [[5, 0], [6, 7]]]  # a list of tensors: members
    with pytest.raises(fm.InputError, match=r"Cannot batch example: row 1 has keys \['ids', 'extra'\], row 0 has \['ids'\]"):
        PadCollate()([{"ids": torch.tensor([1])}, {"ids": torch.tensor([2]), "extra": torch.tensor([3])}])
    with pytest.raises(fm.InputError, match=r"Cannot batch example: row 1 has keys Tensor, row 0 has \['ids'\]"):
        PadCollate()([{"ids": torch.tensor([1])}, torch.tensor([2])])
