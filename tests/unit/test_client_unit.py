"""The client package without a server: image files, overlays, the CLI's argument
handling, error translation, and result parsing over a fake transport."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

import gradtrust_client
from gradtrust_client import (
    Explanation,
    InvalidImageError,
    InvalidRequestError,
    ModelNotReadyError,
    Prediction,
    ServerUnavailableError,
    TrustClient,
    TrustClientError,
    as_model_batch,
    load_images,
    load_images_with_names,
    overlay_png,
    question_for,
)
from gradtrust_client._transport import Transport
from gradtrust_client.cli import main
from gradtrust_client.client import _parse_config

SHAPE = (1, 28, 28)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _digit_pixels() -> np.ndarray:
    """A deterministic 28x28 uint8 'stroke' image with every grey level present."""
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 12:16] = 255
    pixels[0, :] = np.arange(0, 28 * 9, 9, dtype=np.uint8)[:28]
    return pixels


# --- load_images -------------------------------------------------------------------------


def test_load_images_reads_grayscale_png_exactly_when_size_matches(tmp_path):
    pixels = _digit_pixels()
    Image.fromarray(pixels, "L").save(tmp_path / "d.png")
    batch = load_images([tmp_path / "d.png"])
    assert batch.shape == (1, 1, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0, 0], pixels.astype(np.float32) / 255)


def test_load_images_converts_rgb_png_to_gray_when_model_has_one_channel(tmp_path):
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green: luminance 0.587 * 200 rounds to 117
    Image.fromarray(rgb, "RGB").save(tmp_path / "g.png")
    batch = load_images([str(tmp_path / "g.png")])
    assert batch.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(batch, 117 / 255, atol=1 / 255)


def test_load_images_keeps_channels_when_model_takes_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 51
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    batch = load_images([tmp_path / "c.png"], shape=(3, 8, 8))
    assert batch.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(batch[0, :, 3, 3], [1.0, 0.0, 0.2], atol=1e-6)


def test_load_images_resizes_jpeg_when_size_differs(tmp_path):
    big = np.kron(_digit_pixels(), np.ones((2, 2), dtype=np.uint8))
    Image.fromarray(big, "L").save(tmp_path / "d.jpg", quality=95)
    batch = load_images([tmp_path / "d.jpg"])
    assert batch.shape == (1, 1, 28, 28)
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    # The bright vertical stroke survives resizing and compression.
    assert batch[0, 0, 10:20, 12:16].mean() > 0.8 and batch[0, 0, 10:20, :8].mean() < 0.1


@pytest.mark.parametrize(
    ("array", "count"),
    [
        (np.full((28, 28), 255, np.uint8), 1),
        (np.full((1, 28, 28), 1.0, np.float64), 1),
        (np.full((5, 28, 28), 1.0, np.float32), 5),
        (np.full((3, 1, 28, 28), 255, np.int64), 3),
    ],
)
def test_load_images_accepts_npy_layouts_when_values_in_range(tmp_path, array, count):
    np.save(tmp_path / "a.npy", array)
    batch, names = load_images_with_names([tmp_path / "a.npy"])
    assert batch.shape == (count, 1, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, 1.0)
    expected = (
        [str(tmp_path / "a.npy")]
        if count == 1
        else [f"{tmp_path / 'a.npy'}[{i}]" for i in range(count)]
    )
    assert names == expected


def test_load_images_concatenates_files_in_order_when_given_several(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 1, 28, 28), np.float32))
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "b.png")
    batch, names = load_images_with_names([tmp_path / "a.npy", tmp_path / "b.png"])
    assert batch.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(batch.reshape(3, -1).max(axis=1), [0.0, 0.0, 1.0])
    assert names[-1] == str(tmp_path / "b.png")


def test_load_images_reads_images_key_when_npz_holds_several_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 1, 28, 28), np.uint8), labels=np.arange(4))
    assert load_images([tmp_path / "d.npz"]).shape == (4, 1, 28, 28)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((1, 32, 32), np.float32), "(1, 28, 28)"),
        (np.zeros((2, 3, 28, 28), np.float32), "(1, 28, 28)"),
        (np.full((28, 28), 2.0), "[0, 1]"),
        (np.full((28, 28), np.nan), "NaN"),
        (np.full((28, 28), 300, np.int32), "0-255"),
        (np.zeros((28, 28), bool), "uint8"),
    ],
)
def test_load_images_raises_invalid_image_when_npy_does_not_fit(tmp_path, array, fragment):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InvalidImageError, match=r"bad\.npy") as info:
        load_images([tmp_path / "bad.npy"])
    assert fragment in str(info.value)


def test_load_images_raises_with_file_name_when_file_missing(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        load_images([tmp_path / "missing.png"])


def test_load_images_raises_with_file_name_when_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(InvalidImageError, match=r"notes\.png.*PNG, JPEG or \.npy"):
        load_images([tmp_path / "notes.png"])


def test_load_images_raises_when_npy_is_corrupt(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(InvalidImageError, match="numpy array"):
        load_images([tmp_path / "x.npy"])


def test_load_images_raises_when_no_paths_given():
    with pytest.raises(InvalidImageError, match="at least one"):
        load_images([])


def test_load_images_raises_when_picture_file_meets_four_channel_model(tmp_path):
    Image.fromarray(_digit_pixels()).save(tmp_path / "d.png")
    with pytest.raises(InvalidImageError, match="1 \\(grayscale\\) or 3"):
        load_images([tmp_path / "d.png"], shape=(4, 28, 28))


def test_as_model_batch_leaves_input_untouched_when_converting():
    array = np.full((2, 1, 28, 28), 0.5, np.float64)
    before = array.copy()
    out = as_model_batch(array, SHAPE)
    out[...] = 0.0
    np.testing.assert_array_equal(array, before)


# --- overlay -----------------------------------------------------------------------------


def test_overlay_png_writes_upscaled_image_below_title_when_heatmap_given(tmp_path):
    image = _digit_pixels().astype(np.float32)[None] / 255
    heat = np.zeros((28, 28), np.float32)
    heat[:, 14:] = 1.0
    out = overlay_png(image, heat, "Why 7?", tmp_path / "o.png")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.width == 28 * 8 and png.height > 28 * 8
        pixels = np.asarray(png, dtype=np.int32)
    body = pixels[-28 * 8 :]
    band = pixels[: -28 * 8]
    assert (band.sum(axis=2) < 200).any(), "title text should be drawn in the band"
    # Hot half is redder than the cold half (both over the same black background rows).
    cold, hot = body[8:24, 8:64], body[8:24, -64:-8]
    assert hot[..., 0].mean() > cold[..., 0].mean() + 50


def test_overlay_png_wraps_long_title_when_wider_than_image(tmp_path):
    image = np.zeros((1, 28, 28), np.float32)
    short = overlay_png(image, np.zeros((28, 28)), "Why 7?", tmp_path / "s.png", scale=4)
    long_title = question_for("counterfactual", "7") + " and some more words to wrap"
    wrapped = overlay_png(image, np.zeros((28, 28)), long_title, tmp_path / "l.png", scale=4)
    with Image.open(short) as a, Image.open(wrapped) as b:
        assert a.width == b.width == 28 * 4
        assert b.height > a.height


def test_overlay_png_resizes_heatmap_when_smaller_than_image(tmp_path):
    out = overlay_png(np.zeros((28, 28)), np.ones((7, 7)), "t", tmp_path / "o.png", scale=2)
    with Image.open(out) as png:
        assert png.width == 56


def test_overlay_png_raises_when_heatmap_not_2d(tmp_path):
    with pytest.raises(InvalidImageError, match="heatmap"):
        overlay_png(np.zeros((1, 28, 28)), np.zeros((1, 28, 28)), "t", tmp_path / "o.png")


def test_overlay_png_raises_when_output_folder_missing(tmp_path):
    with pytest.raises(InvalidImageError, match="does not exist"):
        overlay_png(np.zeros((1, 28, 28)), np.zeros((28, 28)), "t", tmp_path / "no" / "o.png")


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("gradcam", "Why 7?"),
        ("counterfactual", "What if these regions were absent? (7)"),
        ("contrast", "Why 7, rather than 1?"),
        ("voice", "How sure is the explanation of 7?"),
    ],
)
def test_question_for_names_prediction_and_contrast_when_method_known(method, expected):
    assert question_for(method, "7", "1") == expected


def test_question_for_raises_invalid_request_when_method_unknown():
    with pytest.raises(InvalidRequestError, match="gradcam"):
        question_for("saliency", "7")


# --- errors, config and transport ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("400", "unknown score 'foo'", InvalidRequestError),
        ("StatusCode.INVALID_ARGUMENT", "unknown score 'foo'", InvalidRequestError),
        ("400", "Request for unknown model: 'x' is not found", ModelNotReadyError),
        ("StatusCode.NOT_FOUND", "Request for unknown model", ModelNotReadyError),
        ("StatusCode.UNAVAILABLE", "failed to connect", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", ServerUnavailableError),
        ("500", "model crashed", TrustClientError),
    ],
)
def test_transport_maps_triton_status_to_client_error_when_server_fails(status, message, expected):
    transport = Transport("127.0.0.1:1", "http", 1.0)
    with pytest.raises(expected) as info, transport.translated("m"):
        raise InferenceServerException(msg=message, status=status)
    assert type(info.value) is expected
    if expected is InvalidRequestError:
        assert str(info.value) == message  # the server's own words, unchanged


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_trust_client_raises_server_unavailable_naming_url_when_port_closed(protocol):
    port = _closed_port()
    with TrustClient(f"127.0.0.1:{port}", protocol=protocol, timeout_s=5) as client:
        assert client.is_ready() is False
        with pytest.raises(ServerUnavailableError) as info:
            client.predict(np.zeros((1, 1, 28, 28), np.float32))
    assert f"127.0.0.1:{port}" in str(info.value) and "gradtrust serve" in str(info.value)


def test_trust_client_raises_invalid_request_when_protocol_unknown():
    with pytest.raises(InvalidRequestError, match="'http' or 'grpc'"):
        TrustClient(protocol="ftp")


def test_parse_config_reads_grpc_json_when_int64_fields_are_strings():
    config = {
        "name": "gradtrust_mnist",
        "max_batch_size": 64,
        "input": [{"name": "IMAGE", "data_type": "TYPE_FP32", "dims": ["1", "28", "28"]}],
        "output": [{"name": "LABEL"}, {"name": "SCORES"}],
        "parameters": {"scores": {"string_value": "msp, entropy"}},
    }
    info = _parse_config("gradtrust_mnist", config)
    assert info.input_shape == (1, 28, 28) and info.max_batch_size == 64
    assert info.default_scores == ("msp", "entropy") and info.labels is None
    assert info.outputs == ("LABEL", "SCORES")


def test_parse_config_raises_when_model_does_not_batch():
    config = {"input": [{"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]}
    with pytest.raises(TrustClientError, match="max_batch_size"):
        _parse_config("m", config)


# --- TrustClient over a fake transport -----------------------------------------------------


class FakeTransport:
    """Stands in for tritonclient: class id = round(10 * mean pixel); records each call."""

    location = "http://fake:8000"
    url = "fake:8000"
    protocol = "http"

    def __init__(self, max_batch: int = 4) -> None:
        self.calls: list[tuple[int, tuple[str, ...], dict[str, Any]]] = []
        self.config = {
            "name": "gradtrust_mnist",
            "max_batch_size": max_batch,
            "input": [{"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}],
            "parameters": {"scores": {"string_value": "msp,entropy,margin"}},
        }

    def model_ready(self, model: str) -> bool:
        return True

    def server_live(self) -> bool:
        return True

    def model_config(self, model: str) -> dict[str, Any]:
        return self.config

    def close(self) -> None:
        pass

    def infer(self, model, input_name, batch, outputs, parameters):
        self.calls.append((len(batch), tuple(outputs), dict(parameters)))
        n = len(batch)
        ids = np.rint(batch.reshape(n, -1).mean(axis=1) * 9).astype(np.int64)[:, None]
        names = parameters.get("scores", "").split(",") if "scores" in parameters else []
        out = {
            "LABEL": np.array([[str(i).encode()] for i in ids[:, 0]], dtype=object),
            "CLASS_ID": ids,
            "CONFIDENCE": np.full((n, 1), 0.75, np.float32),
            "GRADTRUST": np.full((n, 1), 4.5, np.float32),
            "SCORES": np.tile(np.arange(len(names), dtype=np.float32), (n, 1)),
            "HEATMAP": np.full((n, 28, 28), 0.5, np.float32),
            "HEATMAP_STATS": np.tile(np.array([2.0, 0.25], np.float32), (n, 1)),
        }
        return {name: out[name] for name in outputs}


@pytest.fixture
def fake_client() -> tuple[TrustClient, FakeTransport]:
    client = TrustClient("fake:8000")
    fake = FakeTransport()
    client._transport = fake  # type: ignore[assignment]
    return client, fake


def test_trust_client_splits_batches_and_keeps_order_when_more_images_than_max_batch(fake_client):
    client, fake = fake_client
    images = np.repeat(np.arange(10, dtype=np.float32)[:, None, None, None] / 9, 28, axis=2)
    images = np.repeat(images, 28, axis=3)
    predictions = client.predict(images)
    assert [size for size, _, _ in fake.calls] == [4, 4, 2]
    assert [p.class_id for p in predictions] == list(range(10))
    assert predictions[3] == Prediction("3", 3, 0.75, 4.5, None)


def test_trust_client_sends_default_scores_explicitly_when_scores_true(fake_client):
    client, fake = fake_client
    (prediction,) = client.predict(np.zeros((28, 28), np.uint8), scores=True, contrast_k=2)
    assert fake.calls[0][2] == {"scores": "msp,entropy,margin", "contrast_k": 2}
    assert "SCORES" in fake.calls[0][1]
    assert prediction.scores == {"msp": 0.0, "entropy": 1.0, "margin": 2.0}


def test_trust_client_maps_named_scores_in_requested_order_when_names_given(fake_client):
    client, fake = fake_client
    (prediction,) = client.predict(np.zeros((1, 28, 28), np.float32), scores=["margin", "msp"])
    assert fake.calls[0][2]["scores"] == "margin,msp"
    assert list(prediction.scores or {}) == ["margin", "msp"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"scores": ["msp", "msp"]}, "repeated"),
        ({"scores": ["a,b"]}, "commas"),
        ({"contrast_k": 0}, "at least 1"),
        ({"contrast_k": 1.5}, "integer"),
    ],
)
def test_trust_client_rejects_request_before_sending_when_arguments_invalid(
    fake_client, kwargs, fragment
):
    client, fake = fake_client
    with pytest.raises(InvalidRequestError, match=fragment):
        client.predict(np.zeros((1, 1, 28, 28), np.float32), **kwargs)
    assert fake.calls == []


def test_trust_client_raises_invalid_image_when_array_shape_wrong(fake_client):
    client, _ = fake_client
    with pytest.raises(InvalidImageError, match=r"\(1, 28, 28\)"):
        client.predict(np.zeros((2, 1, 32, 32), np.float32))


def test_trust_client_returns_readonly_heatmaps_and_stats_when_method_voice(fake_client):
    client, fake = fake_client
    explanations = client.explain(np.zeros((3, 1, 28, 28), np.float32), method="voice")
    assert fake.calls[0][2] == {"heatmap_method": "voice"}
    assert "HEATMAP_STATS" in fake.calls[0][1]
    assert len(explanations) == 3 and isinstance(explanations[0], Explanation)
    first = explanations[0]
    assert first.heatmap.shape == (28, 28) and not first.heatmap.flags.writeable
    assert first.stats == {"snr": 2.0, "iou": 0.25}
    assert first.question() == "How sure is the explanation of 0?"


def test_trust_client_sends_contrast_class_when_method_contrast(fake_client):
    client, fake = fake_client
    (explanation,) = client.explain(np.zeros((1, 1, 28, 28)), method="contrast", contrast=7)
    assert fake.calls[0][2] == {"heatmap_method": "contrast", "contrast_class": 7}
    assert "HEATMAP_STATS" not in fake.calls[0][1]
    assert explanation.contrast_class == 7 and explanation.stats is None
    assert explanation.question(labels=[f"digit {i}" for i in range(10)]) == (
        "Why 0, rather than digit 7?"
    )


@pytest.mark.parametrize(
    ("method", "contrast", "fragment"),
    [("saliency", None, "unknown explanation method"), ("gradcam", 3, "only applies")],
)
def test_trust_client_rejects_explain_when_method_and_contrast_do_not_fit(
    fake_client, method, contrast, fragment
):
    client, fake = fake_client
    with pytest.raises(InvalidRequestError, match=fragment):
        client.explain(np.zeros((1, 1, 28, 28)), method=method, contrast=contrast)
    assert fake.calls == []


# --- CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["predict"],
        ["classify", "x.png"],
        ["explain", "x.png", "--method", "saliency"],
        ["explain", "x.png", "--contrast", "3"],
        ["predict", "x.png", "--protocol", "ftp"],
        ["predict", "x.png", "--contrast-k", "0"],
        ["predict", "x.png", "--timeout", "-1"],
    ],
)
def test_cli_exits_with_usage_error_when_arguments_invalid(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: gradtrust-client" in capsys.readouterr().err


def test_cli_exits_2_naming_file_when_image_missing(tmp_path, capsys):
    code = main(["predict", str(tmp_path / "nope.png"), "--url", f"127.0.0.1:{_closed_port()}"])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_exits_3_with_start_hint_when_server_unreachable(tmp_path, capsys, protocol):
    Image.fromarray(_digit_pixels()).save(tmp_path / "d.png")
    port = _closed_port()
    argv = ["predict", str(tmp_path / "d.png"), "--url", f"127.0.0.1:{port}"]
    code = main([*argv, "--protocol", protocol, "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 3
    assert f"127.0.0.1:{port}" in err and "gradtrust serve" in err


def test_cli_prints_json_summary_when_predicting_over_fake_transport(tmp_path, capsys, monkeypatch):
    Image.fromarray(_digit_pixels()).save(tmp_path / "d.png")
    monkeypatch.setattr(gradtrust_client.client, "Transport", lambda *args: FakeTransport())
    assert main(["predict", str(tmp_path / "d.png"), "--json", "--scores"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["file"] == str(tmp_path / "d.png") and row["gradtrust"] == 4.5
    assert list(row["scores"]) == ["msp", "entropy", "margin"]


def test_cli_writes_overlay_when_explaining_with_out(tmp_path, capsys, monkeypatch):
    Image.fromarray(_digit_pixels()).save(tmp_path / "d.png")
    monkeypatch.setattr(gradtrust_client.client, "Transport", lambda *args: FakeTransport())
    argv = ["explain", str(tmp_path / "d.png"), "--method", "contrast", "--contrast", "7"]
    assert main([*argv, "--out", str(tmp_path / "o.png")]) == 0
    out = capsys.readouterr().out
    assert "rather than 7?" in out and (tmp_path / "o.png").is_file()


def test_client_package_imports_without_server_stack_when_loaded_alone():
    code = (
        "import sys, gradtrust_client, gradtrust_client.cli\n"
        "bad = [m for m in ('torch', 'onnxruntime', 'gradtrust') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path("/")
    )
    assert result.stdout.strip() == ""
