"""The serving limits at their exact boundaries: a request at a limit is answered, one past it is
refused naming the limit; base64 text counts as the bytes it decodes to; heavy requests are
admitted up to their bound and release their slot whatever happens."""

from __future__ import annotations

import base64
import dataclasses

import pandas as pd
import pytest

from mlflow_fullmodel.exceptions import InputError
from mlflow_fullmodel.serving import Admission, RequestLimits, ServerBusy, default_heavy_requests
from mlflow_fullmodel.settings import ServingSettings

WIDE = {"max_rows": 1000, "max_text_chars": 1000, "max_bytes": 1000, "max_samples": 1000}


def limits(**changes) -> RequestLimits:
    arguments = {**WIDE, **changes}
    return RequestLimits(arguments.pop("max_rows"), arguments.pop("max_text_chars"), arguments.pop("max_bytes"),
                         arguments.pop("max_samples"), **arguments)


# -- rows and samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [pd.DataFrame, list, tuple])
def test_max_rows_admits_exactly_that_many_rows_and_refuses_one_more(kind):
    def request(rows: int):
        return pd.DataFrame({"text": ["good"] * rows}) if kind is pd.DataFrame else kind(["good"] * rows)

    assert limits(max_rows=3).check(request(3)) == 3
    with pytest.raises(InputError, match=r"^the request has 4 rows, over the limit max_rows=3; send fewer rows per "
                                         r"request, or raise the limit \(pyfunc model_config 'max_rows' or the "
                                         r"environment variable MLFLOW_FULLMODEL_MAX_ROWS of the server\)\.$"):
        limits(max_rows=3).check(request(4))


def test_max_samples_counts_rows_times_samples_per_row_at_the_limit_and_one_past_it():
    assert limits(max_samples=6).check(["a", "b", "c"], samples_per_row=2) == 6
    with pytest.raises(InputError, match=r"^the request makes 3 rows x 2 samples = 6 samples, over the limit "
                                         r"max_samples=5; send fewer rows, or fewer samples per row \(a smaller tta\), "
                                         r"or raise the limit .*MLFLOW_FULLMODEL_MAX_SAMPLES"):
        limits(max_samples=5).check(["a", "b", "c"], samples_per_row=2)
    assert limits(max_samples=3).check(pd.DataFrame({"text": ["a", "b", "c"]})) == 3
    with pytest.raises(InputError, match="over the limit max_samples=2"):
        limits(max_samples=2).check(pd.DataFrame({"text": ["a", "b", "c"]}))


def test_max_rows_is_checked_before_max_samples():
    with pytest.raises(InputError, match="over the limit max_rows=2"):
        limits(max_rows=2, max_samples=2).check(["a", "b", "c"], samples_per_row=4)


def test_a_request_whose_rows_cannot_be_counted_makes_zero_samples_and_is_not_refused_by_row_limits():
    assert limits(max_rows=1, max_samples=1).check({"text": ["a", "b", "c"]}, samples_per_row=5) == 0
    assert limits(max_rows=1, max_samples=1).check("abc") == 0


# -- characters per text --------------------------------------------------------------------------


def test_max_text_chars_admits_a_text_of_exactly_that_length_and_refuses_one_character_more():
    assert limits(max_text_chars=5).check(pd.DataFrame({"text": ["short", "12345"]})) == 2
    with pytest.raises(InputError, match=r"^row 1, column 'text' has 6 characters, over the limit max_text_chars=5; "
                                         r"send shorter texts, or raise the limit .*MLFLOW_FULLMODEL_MAX_TEXT_CHARS"):
        limits(max_text_chars=5).check(pd.DataFrame({"text": ["short", "123456"]}))


def test_text_length_is_counted_in_characters_not_bytes():
    text = "é" * 5  # 10 bytes in UTF-8
    assert limits(max_text_chars=5, max_bytes=1).check(pd.DataFrame({"text": [text]})) == 1


@pytest.mark.parametrize("dtype", ["string", "str", object])
def test_every_string_column_is_checked_whatever_its_dtype_and_other_columns_before_it(dtype):
    frame = pd.DataFrame({"n": [1, 2], "score": [0.5, 1.5], "text": pd.Series(["ok", "x" * 11], dtype=dtype)})
    with pytest.raises(InputError, match="row 1, column 'text' has 11 characters, over the limit max_text_chars=10"):
        limits(max_text_chars=10).check(frame)


def test_a_value_that_is_neither_text_nor_bytes_does_not_stop_the_check_of_the_rest():
    frame = pd.DataFrame({"mixed": [5, None, 2.5, "x" * 11]})
    with pytest.raises(InputError, match="row 3, column 'mixed' has 11 characters"):
        limits(max_text_chars=10).check(frame)


def test_a_lone_surrogate_is_refused_and_other_non_ascii_text_is_not():
    assert limits().check(pd.DataFrame({"text": ["naïve café ✓ 🎬"]})) == 1
    with pytest.raises(InputError, match=r"^Row 1, column 'text' is not valid Unicode text: a lone surrogate "
                                         r"\(U\+D800\) at character 2\.$"):
        limits().check(object_frame(["fine", "ab\ud800cd"]))


def object_frame(texts: list[str]) -> pd.DataFrame:
    """A one-column frame of Python strings as they are, whatever pandas' string storage is set to
    (Arrow cannot hold a lone surrogate)."""
    frame = pd.DataFrame({"text": [""] * len(texts)}, dtype=object)
    for row, text in enumerate(texts):
        frame.iloc[row, 0] = text
    return frame


# -- bytes per binary value -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_max_bytes_admits_a_value_of_exactly_that_size_and_refuses_one_byte_more(kind):
    assert limits(max_bytes=8).check(pd.DataFrame({"image": [kind(b"x" * 8)]})) == 1
    with pytest.raises(InputError, match=r"^row 1, column 'image' holds 9 bytes, over the limit max_bytes=8; send "
                                         r"smaller files, or raise the limit .*MLFLOW_FULLMODEL_MAX_BYTES"):
        limits(max_bytes=8).check(pd.DataFrame({"image": [kind(b"x"), kind(b"x" * 9)]}))


def test_base64_text_of_a_binary_column_counts_as_the_bytes_it_decodes_to():
    binary = frozenset({"image"})
    exact = base64.b64encode(b"x" * 6).decode()  # 8 characters, 6 bytes
    assert len(exact) == 8
    assert limits(max_bytes=6, max_text_chars=1, binary_columns=binary).check(pd.DataFrame({"image": [exact]})) == 1
    over = base64.b64encode(b"x" * 7).decode()  # 12 characters with padding: 9 bytes by length
    with pytest.raises(InputError, match=r"row 0, column 'image' holds 9 bytes, over the limit max_bytes=6"):
        limits(max_bytes=6, binary_columns=binary).check(pd.DataFrame({"image": [over]}))


@pytest.mark.parametrize("characters, decoded", [(4, 3), (5, 3), (6, 4), (7, 5), (8, 6)])
def test_the_size_of_base64_text_is_three_quarters_of_its_length_rounded_down(characters, decoded):
    binary = frozenset({"image"})
    value = "A" * characters
    assert limits(max_bytes=decoded, binary_columns=binary).check(pd.DataFrame({"image": [value]})) == 1
    with pytest.raises(InputError, match=rf"holds {decoded} bytes, over the limit max_bytes={decoded - 1}"):
        limits(max_bytes=decoded - 1, binary_columns=binary).check(pd.DataFrame({"image": [value]}))


def test_text_outside_the_binary_columns_is_limited_by_characters_not_bytes():
    frame = pd.DataFrame({"text": ["A" * 40], "image": ["A" * 8]})
    assert limits(max_bytes=6, max_text_chars=40, binary_columns=frozenset({"image"})).check(frame) == 1
    with pytest.raises(InputError, match="column 'image' holds 6 bytes, over the limit max_bytes=5"):
        limits(max_bytes=5, max_text_chars=40, binary_columns=frozenset({"image"})).check(frame)


# -- the defaults ---------------------------------------------------------------------------------


def test_the_default_limits(monkeypatch):
    for variable in ("MLFLOW_FULLMODEL_MAX_ROWS", "MLFLOW_FULLMODEL_MAX_TEXT_CHARS", "MLFLOW_FULLMODEL_MAX_BYTES",
                     "MLFLOW_FULLMODEL_MAX_SAMPLES", "MLFLOW_FULLMODEL_HEAVY_SAMPLES",
                     "MLFLOW_FULLMODEL_MAX_HEAVY_REQUESTS", "MLFLOW_FULLMODEL_DEADLINE_S"):
        monkeypatch.delenv(variable, raising=False)
    config = dataclasses.asdict(ServingSettings.resolve())
    assert {k: config[k] for k in ("max_rows", "max_text_chars", "max_bytes", "max_samples", "heavy_samples",
                                   "max_heavy_requests", "deadline_s")} == {
        "max_rows": 10_000, "max_text_chars": 100_000, "max_bytes": 16 * 1024 * 1024, "max_samples": 20_000,
        "heavy_samples": 256, "max_heavy_requests": None, "deadline_s": 55.0}


def test_a_limit_from_the_environment_is_parsed_as_its_type(monkeypatch):
    monkeypatch.setenv("MLFLOW_FULLMODEL_MAX_BYTES", " 12 ")
    monkeypatch.setenv("MLFLOW_FULLMODEL_DEADLINE_S", "1.5")
    settings = ServingSettings.resolve({"max_rows": 7})
    assert (settings.max_bytes, settings.deadline_s, settings.max_rows) == (12, 1.5, 7)


# -- heavy requests -------------------------------------------------------------------------------


def test_a_request_of_exactly_heavy_samples_is_light_and_one_more_takes_a_slot():
    admission = Admission(heavy_samples=2, max_heavy_requests=1)
    with admission.admit(3):
        with admission.admit(2):  # light: admitted although the one slot is taken
            pass
        with admission.admit(0):
            pass
        with pytest.raises(ServerBusy, match=r"^the server is running 1 heavy request\(s\) already \(over "
                                             r"heavy_samples=2 samples each; this one makes 3\), over the limit "
                                             r"max_heavy_requests=1; retry in a moment, send requests of at most 2 "
                                             r"samples \(always admitted\), or raise the limit .*"
                                             r"MLFLOW_FULLMODEL_MAX_HEAVY_REQUESTS"):
            with admission.admit(3):
                pass
    with admission.admit(3):  # the slot was given back
        pass


def test_max_heavy_requests_admits_exactly_that_many_at_once():
    admission = Admission(heavy_samples=0, max_heavy_requests=2)
    with admission.admit(1), admission.admit(1):
        with pytest.raises(ServerBusy, match="running 2 heavy request"):
            with admission.admit(1):
                pass
    with admission.admit(1), admission.admit(1):
        pass


def test_a_heavy_request_that_fails_gives_its_slot_back():
    admission = Admission(heavy_samples=1, max_heavy_requests=1)
    with pytest.raises(RuntimeError):
        with admission.admit(5):
            raise RuntimeError("the model failed")
    with admission.admit(5):
        pass


@pytest.mark.parametrize("cores, expected", [(1, 3), (2, 4), (27, 29), (28, 30), (29, 30), (64, 30)])
def test_the_default_bound_is_the_servers_request_threads_but_two(cores, expected):
    assert default_heavy_requests(cores) == expected


def test_without_a_core_count_the_default_bound_uses_the_machines(monkeypatch):
    import os

    assert default_heavy_requests() == min(32, (os.cpu_count() or 1) + 4) - 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_heavy_requests() == 3  # one core assumed
