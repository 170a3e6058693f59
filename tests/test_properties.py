"""Property tests (Hypothesis): any text, any bytes, any small image through the built-in steps and
through predict give a valid answer or the documented error, never another exception or a hang."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import CenterCrop, DecodeImage, NormalizeImage, RandomCrops, Resize, ToTensor

PROPERTY = settings(max_examples=150, deadline=2_000, suppress_health_check=[HealthCheck.function_scoped_fixture])

texts = st.one_of(
    st.text(),  # any unicode, control characters and lone surrogates included
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"])),
    st.text(min_size=2_000, max_size=20_000),
)


@PROPERTY
@given(text=texts)
def test_any_text_through_predict_is_an_answer_or_an_input_error(text_model, text):
    try:
        result = text_model.predict([text], params={"k": 2})
    except fm.InputError as error:
        assert str(error).startswith("Row 0")
        return
    assert len(result) == 1 and result["label"][0] in ("neg", "pos")
    assert result["top_probabilities"][0] == sorted(result["top_probabilities"][0], reverse=True)


@PROPERTY
@given(rows=st.lists(texts, min_size=1, max_size=8))
def test_with_on_error_return_every_row_comes_back_in_order(text_model, rows):
    records = text_model.predict_records(rows, params={"on_error": "return"})
    assert len(records) == len(rows)
    for index, record in enumerate(records):
        assert record["error"] is None or record["error"].startswith(f"Row {index}")
        assert (record["error"] is None) == (record.get("label") is not None)


def png(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


images = st.builds(
    lambda height, width, channels, seed: np.random.default_rng(seed).integers(
        0, 256, size=(height, width, channels) if channels > 1 else (height, width), dtype=np.uint8),
    st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]), st.integers(0, 2**32 - 1),
)

IMAGE_STEPS = [Resize(24), CenterCrop(16), ToTensor(), NormalizeImage(mean=[0.5], std=[0.25])]


@PROPERTY
@given(data=st.one_of(st.binary(max_size=2_000), st.text(max_size=500)))
def test_any_bytes_or_text_to_decode_image_is_an_image_or_an_input_error(data):
    try:
        image = DecodeImage(mode="L")(data)
    except fm.InputError:
        return
    assert image.mode == "L" and image.size[0] * image.size[1] <= DecodeImage().max_pixels


@PROPERTY
@given(pixels=images, base64_text=st.booleans())
def test_any_png_file_decodes_to_an_image_of_its_own_size(pixels, base64_text):
    # Random bytes are almost never an image: the success branch above is checked here.
    mode = "L" if pixels.ndim == 2 else ("RGB" if pixels.shape[2] == 3 else "RGBA")
    data = png(pixels, mode)
    image = DecodeImage(mode="L")(base64.b64encode(data).decode() if base64_text else data)
    assert image.mode == "L" and image.size == (pixels.shape[1], pixels.shape[0])
    if mode == "L":
        assert np.array_equal(np.asarray(image), pixels)


@PROPERTY
@given(pixels=images)
def test_any_small_image_through_the_image_steps_is_a_tensor_or_an_input_error(pixels):
    mode = "L" if pixels.ndim == 2 else ("RGB" if pixels.shape[2] == 3 else "RGBA")
    value = DecodeImage(mode="L")(png(pixels, mode))
    try:
        for step in IMAGE_STEPS:
            value = step(value)
    except fm.InputError:
        return
    assert isinstance(value, torch.Tensor) and value.shape == (1, 16, 16) and torch.isfinite(value).all()
    crops = RandomCrops(size=8, tta=3, seed=1)(ToTensor()(Resize(12)(DecodeImage(mode="L")(png(pixels, mode)))))
    assert crops.shape == (3, 1, 8, 8)
