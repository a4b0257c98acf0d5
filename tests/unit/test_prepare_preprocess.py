"""gradtrust.serving.decoding: decoding and normalising encoded images as a prepared entry says."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.decoding import (
    PreprocessSpec,
    decode_batch,
    decode_image,
    image_geometry,
    preprocess,
    spatial_size,
)


def encode(pixels: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_spec_from_parameters_reads_every_key_when_all_given():
    params = {
        "image_layout": "nhwc",
        "image_scale": "0.5",
        "image_mean": "1, 2, 3",
        "image_std": "4,5,6",
        "image_resize": "7,9",
    }
    spec = PreprocessSpec.from_parameters(params, ("h", "w", 3))
    assert spec == PreprocessSpec(3, "NHWC", (7, 9), 0.5, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_spec_round_trips_through_parameters_when_written_by_prepare():
    spec = PreprocessSpec(3, "NCHW", (32, 30), 1 / 255, (0.485, 0.456, 0.406), (0.2, 0.3, 0.4))
    assert PreprocessSpec.from_parameters(spec.to_parameters(), (3, 32, 30)) == spec


def test_spec_from_parameters_defaults_to_unit_range_pixels_when_no_parameters():
    spec = PreprocessSpec.from_parameters({}, (1, 28, 28))
    assert (spec.channels, spec.layout, spec.size) == (1, "NCHW", (28, 28))
    assert (spec.scale, spec.mean, spec.std) == (1 / 255, (0.0,), (1.0,))


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"image_layout": "CHW"}, "layout"),
        ({"image_scale": "abc"}, "image_scale"),
        ({"image_scale": "0"}, "scale"),
        ({"image_mean": "0.1,0.2"}, "mean"),
        ({"image_std": "1,0,1"}, "std"),
        ({"image_std": "nan"}, "std"),
        ({"image_resize": "10"}, "image_resize"),
        ({"image_resize": "16,16"}, "image_resize is 16,16"),
    ],
)
def test_spec_from_parameters_raises_config_error_when_a_parameter_is_invalid(params, words):
    with pytest.raises(ConfigError, match=words):
        PreprocessSpec.from_parameters(params, (3, 8, 8))


def test_image_geometry_reads_channels_and_size_when_layout_is_nchw_or_nhwc():
    assert image_geometry((3, 32, 24), "NCHW") == (3, (32, 24))
    assert image_geometry((32, 24, 3), "NHWC") == (3, (32, 24))
    assert image_geometry((3, "h", "w"), "NCHW") == (3, None)
    assert image_geometry((64,), "NCHW") == (None, None)


def test_spatial_size_is_height_and_width_when_layout_is_nhwc():
    assert spatial_size((2, 10, 12, 3), "NHWC") == (10, 12)
    assert spatial_size((2, 3, 10, 12), "NCHW") == (10, 12)


def test_decode_image_returns_the_png_pixels_when_no_resize_needed():
    pixels = rgb(6, 5)
    spec = PreprocessSpec(3, size=(6, 5))
    np.testing.assert_array_equal(decode_image(encode(pixels), spec), pixels)


def test_decode_image_converts_colour_to_one_channel_when_model_is_grayscale():
    pixels = rgb(4, 4)
    out = decode_image(encode(pixels), PreprocessSpec(1))
    want = np.asarray(Image.fromarray(pixels).convert("L"))[:, :, None]
    np.testing.assert_array_equal(out, want)


def test_decode_image_drops_alpha_when_png_has_an_alpha_channel():
    rgba = np.dstack([rgb(3, 3), np.full((3, 3), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(rgba), PreprocessSpec(3)), rgba[:, :, :3])


def test_decode_image_resizes_bilinearly_when_size_differs():
    pixels = rgb(20, 16)
    out = decode_image(encode(pixels), PreprocessSpec(3, size=(10, 8)))
    want = np.asarray(Image.fromarray(pixels).resize((8, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, want)


def test_decode_image_reads_jpeg_when_file_is_jpeg():
    pixels = np.full((8, 8, 3), 120, np.uint8)
    out = decode_image(encode(pixels, "JPEG", quality=95), PreprocessSpec(3))
    assert out.shape == (8, 8, 3) and np.abs(out.astype(int) - 120).max() <= 2


def test_decode_image_applies_exif_orientation_when_photo_is_rotated():
    pixels = rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode(pixels, "PNG", exif=exif), PreprocessSpec(3))
    assert out.shape == (6, 4, 3)
    np.testing.assert_array_equal(out, np.rot90(pixels, k=-1))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"not an image at all", "PNG or JPEG"),
        (encode(rgb(16, 16))[:-30], "readable"),
        (encode(rgb(4, 4), "BMP"), "BMP"),
        (encode(rgb(4, 4), "GIF"), "GIF"),
    ],
    ids=["empty", "garbage", "truncated", "bmp", "gif"],
)
def test_decode_image_raises_invalid_input_when_bytes_are_not_a_png_or_jpeg(data, words):
    with pytest.raises(InvalidInputError, match=words):
        decode_image(data, PreprocessSpec(3))


def test_decode_image_refuses_huge_images_when_pixels_exceed_the_limit(monkeypatch):
    monkeypatch.setattr("gradtrust.serving.decoding.MAX_PIXELS", 100)
    with pytest.raises(InvalidInputError, match="larger than"):
        decode_image(encode(rgb(20, 20)), PreprocessSpec(3))


def test_decode_image_raises_when_model_input_is_not_an_image():
    with pytest.raises(InvalidInputError, match="IMAGE tensor"):
        decode_image(encode(rgb(4, 4)), PreprocessSpec(None))


def test_preprocess_normalises_per_channel_when_mean_and_std_are_given():
    pixels = rgb(2, 3)[None]
    spec = PreprocessSpec(3, "NHWC", None, 1 / 255, (0.4, 0.5, 0.6), (0.1, 0.2, 0.3))
    out = preprocess(pixels, spec)
    for c in range(3):
        want = (pixels[..., c] / 255.0 - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(out[..., c], want, rtol=1e-6)
    assert out.dtype == np.float32


def test_preprocess_moves_channels_first_when_layout_is_nchw():
    pixels = rgb(2, 3)[None]
    out = preprocess(pixels, PreprocessSpec(3, "NCHW", scale=1.0))
    np.testing.assert_array_equal(out, pixels.transpose(0, 3, 1, 2).astype(np.float32))


def test_preprocess_leaves_its_input_unchanged_when_called():
    pixels = rgb(3, 3)[None]
    before = pixels.copy()
    preprocess(pixels, PreprocessSpec(3, mean=(0.5,), std=(2.0,)))
    np.testing.assert_array_equal(pixels, before)


def test_decode_batch_stacks_files_when_sent_as_triton_bytes_tensor():
    images = [rgb(5, 5, seed) for seed in range(3)]
    values = np.array([[encode(i)] for i in images], dtype=np.object_)
    out = decode_batch(values, PreprocessSpec(3, size=(5, 5), scale=1.0))
    np.testing.assert_array_equal(out, np.stack(images).transpose(0, 3, 1, 2))


def test_decode_batch_names_the_bad_sample_when_one_file_is_corrupt():
    values = np.array([[encode(rgb(5, 5))], [b"junk"]], dtype=np.object_)
    with pytest.raises(InvalidInputError, match="sample 1"):
        decode_batch(values, PreprocessSpec(3))


def test_decode_batch_raises_when_sizes_differ_and_model_does_not_resize():
    values = np.array([[encode(rgb(5, 5))], [encode(rgb(6, 5))]], dtype=np.object_)
    with pytest.raises(InvalidInputError, match="different sizes"):
        decode_batch(values, PreprocessSpec(3))
