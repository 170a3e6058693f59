"""The image transforms and the test-time-augmentation strategy: behaviour against references
computed here with numpy, the configuration contract (JSON round trip), bad arguments and bad
images, and seeded random crops that depend only on the seed and the image."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from contract import round_trip
from PIL import Image

import mlflow_fullmodel as fm
from mlflow_fullmodel.collate import Batch
from mlflow_fullmodel.forward import AverageOverSamples
from mlflow_fullmodel.modules import ModuleSet
from mlflow_fullmodel.parity import ABS_TOL, REL_TOL
from mlflow_fullmodel.storage import load_fullmodel, save_fullmodel
from mlflow_fullmodel.transforms import (
    CenterCrop,
    DecodeImage,
    NormalizeImage,
    RandomCrops,
    Resize,
    TopK,
    ToTensor,
)

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)  # height 30, width 40


def encode(pixels: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def claimed_size_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims ``width`` x ``height``: a few dozen
    bytes that would decode to a huge image."""
    data = bytearray(encode(np.zeros((1, 1), dtype=np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


IMAGE = Image.fromarray(PIXELS)
TENSOR = torch.from_numpy(PIXELS.transpose(2, 0, 1).copy()).float() / 255

CONTRACT_CASES = [
    (DecodeImage(mode="L", max_pixels=10_000), encode(PIXELS)),
    (Resize([20, 24], interpolation="bicubic"), IMAGE),
    (CenterCrop([10, 12]), IMAGE),
    (CenterCrop(8), TENSOR),
    (ToTensor(), IMAGE),
    (RandomCrops([16, 20], tta=fm.Param(4, minimum=1), seed=fm.Param(3)), TENSOR),
    (NormalizeImage(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]), TENSOR),
]


@pytest.mark.parametrize("step, example", CONTRACT_CASES, ids=lambda x: type(x).__name__ if isinstance(x, fm.Transform) else "")
def test_every_image_transform_round_trips_through_json_to_an_equal_step_with_identical_output(step, example):
    rebuilt = round_trip(step)
    assert rebuilt == step and repr(rebuilt) == repr(step)
    assert same(rebuilt(example), step(example))
    # Configuration only: no public attribute beyond the constructor arguments.
    assert [n for n in vars(rebuilt) if not n.startswith("_")] == step.config_names()
    step.check_attributes()


def test_the_transforms_that_use_pillow_declare_it_as_a_requirement():
    assert DecodeImage.requirements == Resize.requirements == ToTensor.requirements == ("pillow",)
    # Cropping and normalising tensors need torch only (CenterCrop crops PIL images through their
    # own method, so it needs no import of PIL either).
    assert RandomCrops.requirements == NormalizeImage.requirements == ()


class TestDecodeImage:
    def test_png_bytes_decode_to_exactly_the_encoded_pixels(self):
        image = DecodeImage(mode="RGB")(encode(PIXELS))
        assert image.mode == "RGB" and image.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(image), PIXELS)

    def test_colour_becomes_grayscale_by_the_itu_r_601_luma_formula(self):
        image = DecodeImage(mode="L")(encode(PIXELS))
        luma = PIXELS.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert image.mode == "L"
        assert np.abs(np.asarray(image).astype(np.float64) - luma).max() <= 1.0  # integer rounding

    def test_grayscale_becomes_rgb_with_three_equal_channels(self):
        gray = PIXELS[:, :, 0]
        image = np.asarray(DecodeImage(mode="RGB")(encode(gray)))
        assert image.shape == (30, 40, 3)
        for channel in range(3):
            np.testing.assert_array_equal(image[:, :, channel], gray)

    def test_16_bit_grayscale_keeps_its_high_byte_instead_of_clipping_to_white(self):
        deep = (PIXELS[:, :, 0].astype(np.uint16) << 8) | 0x7F
        buffer = io.BytesIO()
        Image.fromarray(deep).save(buffer, format="PNG")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
        np.testing.assert_array_equal(np.asarray(DecodeImage(mode="L")(buffer.getvalue())), PIXELS[:, :, 0])

    def test_jpeg_decodes_too(self):
        smooth = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
        image = np.asarray(DecodeImage(mode="L")(encode(np.stack([smooth] * 3, axis=2), "JPEG")))
        assert image.shape == (30, 40) and np.abs(image.astype(int) - smooth).mean() < 3  # lossy

    @pytest.mark.parametrize(
        "wrap",
        [
            lambda b: base64.b64encode(b).decode(),
            lambda b: base64.encodebytes(b).decode(),  # line breaks, as `base64` without -w0 writes
            lambda b: "data:image/png;base64," + base64.b64encode(b).decode(),
            base64.encodebytes,  # MLflow's "inputs" and "instances" formats hand over the base64 text
            bytearray,
        ],
        ids=["base64", "base64 with line breaks", "data URL", "base64 text as bytes", "bytearray"],
    )
    def test_base64_text_and_bytearrays_decode_to_the_same_pixels(self, wrap):
        np.testing.assert_array_equal(np.asarray(DecodeImage()(wrap(encode(PIXELS)))), PIXELS)

    @pytest.mark.parametrize(
        "data, message",
        [
            (b"hello, this is text", r"the data \(19 bytes, text\) is not an image file"),
            (b"", "the data is empty"),
            (encode(PIXELS)[: len(encode(PIXELS)) // 2], r"the PNG image \(40x30\) is truncated or corrupt"),
            (encode(PIXELS)[:30], r"starts like a PNG file but Pillow cannot read its header: the file is truncated"),
            ("iVBORw0KGgo!!!", r"the string \(14 characters\) is not valid base64"),
            (claimed_size_png(5000, 4000), r"the image is 5000x4000 pixels \(20000000 pixels\), over the limit of max_pixels=16777216"),
            (claimed_size_png(100_000, 100_000), r"the image is too large: .*max_pixels=16777216"),
            (12345, "expected the bytes of an image file, got int"),
        ],
        ids=["not an image", "empty", "truncated PNG", "truncated header", "wrong base64",
             "over max_pixels", "decompression bomb", "not bytes"],
    )
    def test_a_bad_image_is_an_input_error_naming_the_problem(self, data, message):
        with pytest.raises(fm.InputError, match=message):
            DecodeImage()(data)

    def test_the_size_is_checked_from_the_header_before_any_pixel_is_decoded(self):
        # The file claims 200x200 but holds one pixel: decoding would fail as truncated, so a size
        # error proves the check came first.
        with pytest.raises(fm.InputError, match=r"200x200 pixels \(40000 pixels\), over the limit of max_pixels=39999"):
            DecodeImage(max_pixels=39_999)(claimed_size_png(200, 200))
        with pytest.raises(fm.InputError, match="truncated"):
            DecodeImage(max_pixels=40_000)(claimed_size_png(200, 200))

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"mode": "CMYK"}, r"mode must be one of \['L', 'LA', 'RGB', 'RGBA'\], got 'CMYK'"),
            ({"max_pixels": 0}, "max_pixels must be a positive int, got 0"),
            ({"max_pixels": 1e6}, "max_pixels must be a positive int, got 1000000.0"),
            ({"max_pixels": True}, "max_pixels must be a positive int, got True"),
        ],
    )
    def test_bad_arguments_are_refused_naming_the_argument(self, kwargs, message):
        with pytest.raises(fm.ConfigError, match="DecodeImage: " + message):
            DecodeImage(**kwargs)


class TestResize:
    @pytest.mark.parametrize(
        "size, before, after",
        [
            (32, (64, 48), (42, 32)),  # (width, height): the shorter side becomes 32, int(32 * 64 / 48)
            (32, (48, 64), (32, 42)),
            (10, (10, 10), (10, 10)),
            ([20, 24], (64, 48), (24, 20)),  # [height, width]: exactly
        ],
    )
    def test_the_output_size_follows_the_shorter_side_rule_or_the_exact_size(self, size, before, after):
        assert Resize(size)(Image.new("RGB", before)).size == after

    def test_an_aspect_ratio_bomb_is_refused_before_the_large_image_is_made(self):
        # 262144 x 1 passes a decoder's pixel limit; the shorter side to 32 would make 8388608 x 32.
        thin = DecodeImage(mode="L")(encode(np.zeros((1, 262_144), dtype=np.uint8)))
        with pytest.raises(fm.InputError, match=r"resizing the 262144x1 image to size=32 would make it 8388608x32 "
                                                r"\(268435456 pixels\), over the limit of max_pixels=16777216"):
            Resize(32)(thin)
        assert Resize([28, 28])(thin).size == (28, 28)  # an exact size is as small as it says

    def test_nearest_upscaling_by_two_repeats_every_pixel_twice(self):
        image = Resize([60, 80], interpolation="nearest")(IMAGE)
        np.testing.assert_array_equal(np.asarray(image), PIXELS.repeat(2, axis=0).repeat(2, axis=1))

    def test_a_constant_image_stays_constant_and_the_mode_is_kept(self):
        image = Resize(7)(Image.new("L", (40, 30), color=77))
        assert image.mode == "L" and image.size == (9, 7)
        assert set(np.asarray(image).ravel().tolist()) == {77}

    def test_a_tensor_is_refused_naming_the_fix(self):
        with pytest.raises(fm.InputError, match="Resize takes a PIL image, got Tensor; decode it with DecodeImage"):
            Resize(8)(TENSOR)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"size": 0}, "size must be a positive int or \\[height, width\\] of them, got 0"),
            ({"size": [32]}, "size must be .* got \\[32\\]"),
            ({"size": [32, 0]}, "size must be .* got \\[32, 0\\]"),
            ({"size": "32"}, "size must be .* got '32'"),
            ({"size": 32, "interpolation": "cubic"}, "interpolation must be one of .*got 'cubic'"),
        ],
    )
    def test_bad_arguments_are_refused_naming_the_argument(self, kwargs, message):
        with pytest.raises(fm.ConfigError, match="Resize: " + message):
            Resize(**kwargs)


class TestCenterCrop:
    def test_the_centre_is_cut_at_the_rounded_offsets_from_an_image_and_a_tensor_alike(self):
        # 30x40 -> 11x16: top = round(19 / 2) = 10 (round half to even), left = round(24 / 2) = 12
        reference = PIXELS[10:21, 12:28]
        np.testing.assert_array_equal(np.asarray(CenterCrop([11, 16])(IMAGE)), reference)
        cropped = CenterCrop([11, 16])(TENSOR)
        assert torch.equal(cropped, torch.from_numpy(reference.transpose(2, 0, 1).copy()).float() / 255)

    def test_a_crop_of_the_full_size_is_the_image(self):
        assert same(CenterCrop([30, 40])(IMAGE), IMAGE)

    def test_an_image_smaller_than_the_crop_is_an_input_error_naming_both_sizes(self):
        with pytest.raises(fm.InputError, match=r"the image is 30x40 \(height x width\), smaller than the crop 32x32; put a Resize"):
            CenterCrop(32)(IMAGE)

    @pytest.mark.parametrize("size", [0, -3, [4], [4, 4, 4], 2.5, None])
    def test_bad_sizes_are_refused(self, size):
        with pytest.raises(fm.ConfigError, match="CenterCrop: size must be a positive int"):
            CenterCrop(size)


class TestToTensor:
    def test_an_rgb_image_becomes_a_float_chw_tensor_of_pixels_over_255(self):
        tensor = ToTensor()(IMAGE)
        assert tensor.dtype == torch.float32 and tensor.shape == (3, 30, 40)
        np.testing.assert_allclose(tensor.numpy(), PIXELS.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)

    def test_a_grayscale_image_has_one_channel(self):
        tensor = ToTensor()(Image.fromarray(PIXELS[:, :, 1]))
        assert tensor.shape == (1, 30, 40)
        assert tensor.min() >= 0 and tensor.max() <= 1

    def test_a_palette_image_or_a_tensor_is_refused_naming_the_fix(self):
        with pytest.raises(fm.InputError, match=r"got mode 'P'; convert it with DecodeImage\(mode=...\)"):
            ToTensor()(IMAGE.convert("P"))
        with pytest.raises(fm.InputError, match="ToTensor takes a PIL image, got Tensor"):
            ToTensor()(TENSOR)


class TestNormalizeImage:
    MEAN, STD = [0.5, 0.25, 0.125], [0.5, 2.0, 0.1]

    @pytest.mark.parametrize("shape", [(3, 5, 6), (4, 3, 5, 6)], ids=["one image", "samples of an image"])
    def test_each_channel_is_standardised_with_its_own_statistics(self, shape):
        images = torch.rand(shape)
        expected = images.numpy().copy()
        for channel, (m, s) in enumerate(zip(self.MEAN, self.STD)):
            expected[..., channel, :, :] = (expected[..., channel, :, :] - m) / s
        result = NormalizeImage(mean=self.MEAN, std=self.STD)(images)
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)

    def test_statistics_for_another_channel_count_are_a_config_error(self):
        with pytest.raises(fm.ConfigError, match=r"statistics for 3 channel\(s\) but the image has 1; check DecodeImage\(mode=...\)"):
            NormalizeImage(mean=self.MEAN, std=self.STD)(torch.rand(1, 4, 4))

    def test_an_integer_tensor_is_refused_naming_the_fix(self):
        with pytest.raises(fm.InputError, match=r"expected a float image tensor .* got a torch.uint8 tensor of shape \(3, 4, 4\); put ToTensor\(\)"):
            NormalizeImage(mean=self.MEAN, std=self.STD)(torch.zeros(3, 4, 4, dtype=torch.uint8))

    @pytest.mark.parametrize(
        "mean, std, message",
        [
            ([], [], "mean must be a non-empty list of finite numbers"),
            ([0.5, "x"], [1, 1], "mean must be a non-empty list"),
            ([0.5], [float("nan")], "std must be a non-empty list of finite numbers"),
            ([0.5], [True], "std must be a non-empty list"),
            ([0.5, 0.5], [1.0], "mean and std must have one value per channel each, got 2 and 1"),
            ([0.5], [0.0], r"std must be positive, got \[0.0\]"),
            (0.5, [1.0], "mean must be a non-empty list"),
        ],
    )
    def test_bad_statistics_are_refused_naming_the_argument(self, mean, std, message):
        with pytest.raises(fm.ConfigError, match="NormalizeImage: " + message):
            NormalizeImage(mean=mean, std=std)


# A 12x12 image whose every pixel is different, so a crop's values say where it was cut.
UNIQUE = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(2, 12, 12)


def offsets_of(crops: torch.Tensor, image: torch.Tensor = UNIQUE) -> list[tuple[int, int]]:
    """Where each crop was cut from ``image``: the one window of the image equal to it (``UNIQUE``
    has no repeated window, so the place is unambiguous)."""
    height, width = crops.shape[-2:]
    found = []
    for crop in crops:
        places = [
            (top, left)
            for top in range(image.shape[1] - height + 1)
            for left in range(image.shape[2] - width + 1)
            if torch.equal(crop, image[:, top : top + height, left : left + width])
        ]
        assert len(places) == 1, "a crop is not a window of the image"
        found.append(places[0])
    return found


class TestRandomCrops:
    def test_each_sample_is_a_window_of_the_image_of_the_requested_size(self):
        crops = RandomCrops([8, 6], tta=5, seed=0)(UNIQUE)
        assert crops.shape == (5, 2, 8, 6)
        for top, left in offsets_of(crops):
            assert 0 <= top <= 4 and 0 <= left <= 6

    def test_the_same_seed_gives_the_same_crops_in_any_instance(self):
        step = RandomCrops(8, tta=fm.Param(6), seed=fm.Param(0))
        assert torch.equal(step(UNIQUE, seed=11), round_trip(step)(UNIQUE.clone(), seed=11))

    def test_another_seed_gives_other_crops(self):
        step = RandomCrops(8, tta=fm.Param(6), seed=fm.Param(0))
        assert offsets_of(step(UNIQUE, seed=1)) != offsets_of(step(UNIQUE, seed=2))

    def test_another_image_gets_other_crops_with_the_same_seed(self):
        step = RandomCrops(8, tta=6, seed=0)
        other = UNIQUE + 1000  # same layout, other content
        assert offsets_of(step(UNIQUE)) != offsets_of(step(other), other)

    def test_more_samples_extend_the_fewer_ones(self):
        step = RandomCrops(8, tta=fm.Param(3), seed=fm.Param(5))
        assert torch.equal(step(UNIQUE, tta=7)[:3], step(UNIQUE))

    def test_the_crops_spread_over_every_possible_position(self):
        # 3 x 3 positions, 20 seeds x 8 crops: a generator stuck on some positions would fail this.
        positions = {p for seed in range(20) for p in offsets_of(RandomCrops(10, tta=8, seed=seed)(UNIQUE))}
        assert positions == {(top, left) for top in range(3) for left in range(3)}

    def test_a_sample_count_below_one_is_a_param_error(self):
        with pytest.raises(fm.ParamError, match="Parameter 'tta' must be at least 1, got 0"):
            RandomCrops(8, tta=fm.Param(2), seed=0)(UNIQUE, tta=0)

    def test_a_pil_image_or_a_small_tensor_is_an_input_error_naming_the_fix(self):
        with pytest.raises(fm.InputError, match=r"expected an image tensor \(C, H, W\), got Image; put ToTensor\(\) before RandomCrops"):
            RandomCrops(8)(IMAGE)
        with pytest.raises(fm.InputError, match="smaller than the crop 16x16"):
            RandomCrops(16)(UNIQUE)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"size": 0}, "size must be a positive int"),
            ({"size": 8, "tta": 0}, "tta must be an int >= 1"),
            ({"size": 8, "tta": fm.Param(0)}, "tta must be an int >= 1"),
            ({"size": 8, "tta": fm.Param(2.0)}, "tta must be an int >= 1"),
            ({"size": 8, "seed": "zero"}, "seed must be an int"),
            ({"size": 8, "seed": fm.Param(0.5)}, "seed must be an int"),
        ],
    )
    def test_bad_arguments_are_refused_naming_the_argument(self, kwargs, message):
        with pytest.raises(fm.ConfigError, match="RandomCrops: " + message):
            RandomCrops(**kwargs)


# -- test-time augmentation through a FullModel ----------------------------------------------------


class TinyNet(torch.nn.Module):
    """Class scores from a 3x3 convolution, averaged over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, kernel_size=3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny_net() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return fm.script(TinyNet())


def digit_pngs(count: int) -> list[bytes]:
    from sklearn.datasets import load_digits

    images = load_digits().images[:count]
    return [encode(np.kron(255 - image * 15, np.ones((3, 3))).astype(np.uint8)) for image in images]  # 24x24


@pytest.fixture(scope="module")
def tta_model(tiny_net) -> fm.FullModel:
    return fm.FullModel(
        preprocess=[
            DecodeImage(mode="L"),
            Resize(20),
            ToTensor(),
            RandomCrops(16, tta=fm.Param(6, minimum=1, maximum=32), seed=fm.Param(0)),
            NormalizeImage(mean=[0.7], std=[0.3]),
        ],
        module=tiny_net,
        forward=AverageOverSamples(),
        postprocess=[TopK(labels=["a", "b", "c", "d"], k=fm.Param(4), softmax=False)],
        input_columns=["image"],
        batch_size=4,
    )


class TestAverageOverSamples:
    def test_the_probabilities_are_the_mean_of_each_samples_softmax(self, tiny_net):
        samples = torch.rand(3, 5, 1, 16, 16)
        result = AverageOverSamples()(ModuleSet.of(tiny_net), Batch(samples, None), torch.device("cpu"))
        assert result.shape == (3, 4) and result.dtype == torch.float64
        for example in range(3):
            one_by_one = [torch.softmax(tiny_net(s[None]).double()[0], dim=0) for s in samples[example]]
            torch.testing.assert_close(result[example], torch.stack(one_by_one).mean(dim=0), rtol=1e-6, atol=1e-9)

    def test_without_softmax_the_module_outputs_are_averaged_as_they_are(self, tiny_net):
        samples = torch.rand(2, 3, 1, 16, 16)
        result = AverageOverSamples(softmax=False)(ModuleSet.of(tiny_net), Batch(samples, None), torch.device("cpu"))
        expected = tiny_net(samples.flatten(0, 1)).double().view(2, 3, 4).mean(dim=1)
        torch.testing.assert_close(result, expected)

    def test_a_batch_without_a_sample_dimension_is_a_config_error_naming_the_fix(self, tiny_net):
        with pytest.raises(fm.ConfigError, match=r"needs a batch tensor \(examples, samples, ...\), got shape \(2, 4\).*RandomCrops"):
            AverageOverSamples()(ModuleSet.of(tiny_net), Batch(torch.rand(2, 4), None), torch.device("cpu"))

    @pytest.mark.parametrize("kwargs", [{"module": ""}, {"module": 3}, {"softmax": "yes"}])
    def test_bad_arguments_are_refused(self, kwargs):
        with pytest.raises(fm.ConfigError, match="AverageOverSamples: "):
            AverageOverSamples(**kwargs)

    def test_tta_and_seed_are_runtime_parameters_of_the_model(self, tta_model):
        assert {name: p.default for name, p in tta_model.params.items()} == {"on_error": "raise", "tta": 6, "seed": 0, "k": 4}

    def test_the_same_request_with_the_same_seed_gives_the_identical_answer(self, tta_model):
        pngs = digit_pngs(5)
        first = tta_model.predict(pngs, params={"seed": 3})
        pd.testing.assert_frame_equal(tta_model.predict(pngs, params={"seed": 3}), first, check_exact=True)
        assert first["top_probabilities"].map(sum).tolist() == pytest.approx([1.0] * 5)

    def test_another_seed_or_sample_count_gives_another_answer(self, tta_model):
        pngs = digit_pngs(5)
        base = tta_model.predict(pngs, params={"seed": 3})["top_probabilities"].tolist()
        assert tta_model.predict(pngs, params={"seed": 4})["top_probabilities"].tolist() != base
        assert tta_model.predict(pngs, params={"seed": 3, "tta": 2})["top_probabilities"].tolist() != base

    def test_a_rows_answer_does_not_depend_on_the_other_rows_of_the_request(self, tta_model):
        pngs = digit_pngs(9)
        together = tta_model.predict(pngs, params={"seed": 1})  # batches of 4: each row among others
        for index in (0, 4, 8):
            alone = tta_model.predict([pngs[index]], params={"seed": 1})
            # Identical crops (pre-processing depends on the seed and the image only) ...
            values = tta_model._resolve_params({"seed": 1})
            assert torch.equal(tta_model._preprocess([pngs[index]], values)[0], tta_model._preprocess(pngs, values)[index])
            # ... hence the same answer; batched float32 kernels may differ in the last bits.
            assert alone["top_labels"][0] == together["top_labels"][index]
            assert alone["top_probabilities"][0] == pytest.approx(
                together["top_probabilities"][index], rel=REL_TOL, abs=ABS_TOL
            )

    def test_a_bad_image_is_an_input_error_naming_the_row_and_the_step(self, tta_model):
        pngs = digit_pngs(2)
        with pytest.raises(fm.InputError, match=r"Row 1: preprocess\[0\] DecodeImage: the data \(3 bytes, text\) is not an image"):
            tta_model.predict([pngs[0], b"abc"])

    def test_the_saved_and_reloaded_model_gives_the_identical_answers(self, tta_model, tmp_path):
        save_fullmodel(tta_model, str(tmp_path / "model"))
        spec = json.loads((tmp_path / "model" / "fullmodel.json").read_text())
        assert [s["target"].split(":")[1] for s in spec["preprocess"]] == [
            "DecodeImage", "Resize", "ToTensor", "RandomCrops", "NormalizeImage"]
        assert spec["forward"]["target"] == "mlflow_fullmodel.forward:AverageOverSamples"
        assert "pillow" in spec["requirements"]
        loaded = load_fullmodel(str(tmp_path / "model"))
        pngs = digit_pngs(6)
        for params in ({}, {"seed": 9, "tta": 3, "k": 2}):
            pd.testing.assert_frame_equal(loaded.predict(pngs, params), tta_model.predict(pngs, params), check_exact=True)


def test_the_samples_a_request_makes_are_rows_times_tta_and_bounded_when_served(tta_model):
    from mlflow_fullmodel.serving import RequestLimits

    assert tta_model._samples_per_row() == 6 and tta_model._samples_per_row({"tta": 32}) == 32
    limits = RequestLimits(max_rows=1000, max_text_chars=100, max_bytes=10**6, max_samples=100)
    frame = pd.DataFrame({"image": [encode(PIXELS)] * 4})
    limits.check(frame, tta_model._samples_per_row({"tta": 25}))  # 4 x 25 = 100: at the limit
    with pytest.raises(fm.InputError, match=r"the request makes 4 rows x 26 samples = 104 samples, over the limit "
                                            r"max_samples=100; send fewer rows, or fewer samples per row"):
        limits.check(frame, tta_model._samples_per_row({"tta": 26}))
