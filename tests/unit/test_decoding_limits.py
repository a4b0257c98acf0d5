"""Decoding IMAGE_BYTES is bounded and exact: sizes checked from the header before any
pixel is decoded (per image and per request, relative to the model's input), 16-bit PNGs
scaled rather than clipped, the first frame of multi-frame files, messages a client can
act on."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.decoding import (
    IMAGE_FACTOR,
    REQUEST_FACTOR,
    DecodeLimits,
    PreprocessSpec,
    decode_batch,
    decode_image,
)
from gradtrust.serving.settings import (
    DEFAULT_DECODED_PIXELS_FACTOR,
    DEFAULT_REQUEST_DECODED_PIXELS_FACTOR,
    ModelSettings,
)

GRAY_28 = PreprocessSpec(1, size=(28, 28), scale=1.0)
LIMITS_28 = DecodeLimits.for_model(GRAY_28, 64, 16.0, 4.0, 4096 * 4096)


def _png(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **kwargs)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (grayscale: type 0, RGB: type 2)."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that announces its size but holds no pixel data: decoding it would fail, so
    an error about its size proves the size was checked before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    broken = zlib.compress(b"\x00" * 16)[:6]  # the start of the pixel data, cut short
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", broken)


def test_decode_scales_16_bit_grayscale_to_8_bits_when_png_is_16_bit():
    wide = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83).astype(np.uint16)
    got = decode_image(_png16(wide, 0), GRAY_28, LIMITS_28)[:, :, 0]
    np.testing.assert_array_equal(got, np.rint(wide / 257.0).astype(np.uint8))
    assert 0 < got.mean() < 255  # not the all-white image of a clipping conversion
    rgb = decode_image(_png16(wide, 0), PreprocessSpec(3, size=(28, 28)))
    np.testing.assert_array_equal(rgb[:, :, 1], np.rint(wide / 257.0).astype(np.uint8))


def test_decode_scales_16_bit_colour_when_png_is_16_bit_rgb():
    wide = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    got = decode_image(_png16(wide, 2), PreprocessSpec(3)).astype(np.int32)
    assert np.abs(got - wide / 257.0).max() <= 1.0


def test_decode_takes_the_first_frame_when_png_is_animated():
    frames = [Image.new("L", (28, 28), value) for value in (10, 200, 90)]
    data = _png(frames[0], save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (decode_image(data, GRAY_28, LIMITS_28) == 10).all()


def test_decode_takes_the_first_picture_when_jpeg_holds_several():
    out = io.BytesIO()
    first, second = Image.new("RGB", (16, 16), (250, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 250))
    first.save(out, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(out.getvalue())).format == "MPO"  # what phones write
    got = decode_image(out.getvalue(), PreprocessSpec(3)).astype(int)
    assert got[..., 0].mean() > 200 and got[..., 2].mean() < 50


def test_decode_refuses_other_formats_saying_to_convert_when_file_is_a_gif():
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, "GIF")
    with pytest.raises(
        InvalidInputError, match="GIF image .* PNG and JPEG only: convert it to PNG"
    ):
        decode_image(out.getvalue(), GRAY_28, LIMITS_28)


def test_limits_are_multiples_of_the_model_input_when_size_is_fixed():
    assert (LIMITS_28.image_pixels, LIMITS_28.request_pixels) == (16 * 784, 4 * 64 * 784)
    assert IMAGE_FACTOR in LIMITS_28.image_source and REQUEST_FACTOR in LIMITS_28.request_source
    dynamic = DecodeLimits.for_model(PreprocessSpec(3), 8, 16.0, 4.0, 1000)
    assert (dynamic.image_pixels, dynamic.request_pixels) == (1000, 8000)


def test_decode_refuses_from_the_header_saying_what_fits_when_image_exceeds_the_factor():
    with pytest.raises(InvalidInputError) as info:
        decode_image(_header_only_png(6300, 6300), GRAY_28, LIMITS_28)
    message = str(info.value)
    assert "6300x6300" in message and "12544 pixels per image" in message
    assert IMAGE_FACTOR in message and "downscale it to at most 112x112" in message


def test_decode_accepts_an_image_at_the_factor_when_it_fits_exactly():
    image = Image.new("L", (112, 112), 77)  # 16 x 28 x 28 pixels
    assert (decode_image(_png(image), GRAY_28, LIMITS_28) == 77).all()


def test_decode_batch_refuses_from_headers_before_decoding_when_request_exceeds_total():
    # 17 images of 112x112: each within 16 x 28x28, together over 4 x 64 x 28x28.
    files = np.array([[_header_only_png(112, 112)] for _ in range(17)], dtype=object)
    with pytest.raises(InvalidInputError) as info:
        decode_batch(files, GRAY_28, LIMITS_28)  # no pixel data: only the headers were read
    message = str(info.value)
    assert "17 images of 213248 pixels" in message and "200704 pixels" in message
    assert REQUEST_FACTOR in message and "send fewer or smaller images per request" in message


def test_decode_batch_names_the_sample_when_one_image_is_too_large():
    files = np.array([[_png(Image.new("L", (28, 28)))], [_header_only_png(500, 500)]], object)
    with pytest.raises(InvalidInputError, match="IMAGE_BYTES sample 1: image of 500x500"):
        decode_batch(files, GRAY_28, LIMITS_28)


def test_settings_read_the_decoding_factors_when_configured():
    labels = ["a", "b"]
    default = ModelSettings.from_parameters({}, labels)
    assert default.decoded_pixels_factor == DEFAULT_DECODED_PIXELS_FACTOR == 16.0
    assert default.request_decoded_pixels_factor == DEFAULT_REQUEST_DECODED_PIXELS_FACTOR == 4.0
    custom = ModelSettings.from_parameters({IMAGE_FACTOR: "4", REQUEST_FACTOR: "1.5"}, labels)
    assert (custom.decoded_pixels_factor, custom.request_decoded_pixels_factor) == (4.0, 1.5)


@pytest.mark.parametrize("value", ["0.5", "nan", "inf", "many", "-3"])
def test_settings_refuse_a_factor_naming_it_when_it_is_not_a_number_at_least_one(value):
    with pytest.raises(ConfigError, match=f"{IMAGE_FACTOR} must be a number >= 1"):
        ModelSettings.from_parameters({IMAGE_FACTOR: value}, ["a", "b"])
