"""Hostile input, in process: whatever a client sends, one clear error or one right answer.

Hypothesis generates request parameters (JSON of any shape, values of every type) and
image arrays (any shape, dtype, size, NaN/Inf, out-of-range pixels). The contract:
:func:`gradtrust.serving.settings.parse_request` and
:class:`gradtrust.serving.service.TrustService` either
answer correctly or raise / return :class:`InvalidInputError` with a short message, never
any other exception, and a bad request never changes the answers of the good requests
that share its batch. Answers are checked against onnxruntime run directly on the same
pixels, not against the service itself.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradtrust.core import scores
from gradtrust.core.scores import SCORE_NAMES
from gradtrust.errors import InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    CLASS_ID,
    CONFIDENCE,
    GRADTRUST,
    HEATMAP,
    HEATMAP_METHODS,
    LABEL,
    REQUEST_PARAMETERS,
    SCORES,
)
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions, parse_request
from tests.conftest import DEMO_ONNX, MODEL_REPOSITORY

LABELS = (MODEL_REPOSITORY / "gradtrust_mnist" / "labels.txt").read_text().split()
SETTINGS = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
#: An error message echoes what was wrong, never the whole of a huge input.
MAX_MESSAGE = 800
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
score_lists = st.lists(st.sampled_from([*SCORE_NAMES, "trustiness", "", " msp "]), max_size=5)
plausible = {
    "scores": score_lists.map(",".join) | score_lists,
    "contrast_k": st.integers(-3, 12) | st.integers(-3, 12).map(str) | st.sampled_from(["2.0"]),
    "heatmap_method": st.sampled_from([*HEATMAP_METHODS, "saliency", " voice ", ""]),
    "contrast_class": st.integers(-2, 12) | st.sampled_from([*LABELS, "cat", "-1", " 3 "]),
}
parameter_maps = st.dictionaries(
    st.sampled_from(REQUEST_PARAMETERS) | st.text(max_size=12),
    json_values,
    max_size=4,
) | st.fixed_dictionaries({}, optional={k: v | json_values for k, v in plausible.items()})
parameters = (
    parameter_maps
    | parameter_maps.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=60)
    | st.none()
)


def _valid_images(n: int) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, (n, 1, 28, 28), elements=st.floats(0, 1, width=32))


special_pixels = st.sampled_from(
    [np.nan, np.inf, -np.inf, -1e-3, 1.001, 255.0, float(np.finfo(np.float32).max), -0.0]
)


@st.composite
def images(draw: st.DrawFn) -> np.ndarray:
    """Mostly the right shape with some poisoned pixels; sometimes anything at all."""
    kind = draw(st.sampled_from(["valid", "poisoned", "any"]))
    if kind != "any":
        batch = draw(_valid_images(draw(st.integers(1, 4))))
        if kind == "poisoned":
            for _ in range(draw(st.integers(1, 3))):
                idx = tuple(draw(st.integers(0, s - 1)) for s in batch.shape)
                batch[idx] = draw(special_pixels)
        return batch
    dtype = draw(
        st.sampled_from(
            [np.float32, np.float64, np.float16, np.int32, np.uint8, np.int64, np.bool_]
            + [np.complex64, np.object_]
        )
    )
    shape = draw(
        st.tuples(
            st.integers(0, 3), st.sampled_from([1, 3]), st.integers(26, 29), st.integers(27, 29)
        )
        | st.lists(st.integers(0, 4), max_size=5).map(tuple)
    )
    if dtype is np.object_:
        return np.full(shape, None, dtype=np.object_)
    return draw(hnp.arrays(dtype, shape))


# --- parameters ---------------------------------------------------------------------------


def _check_options(options: RequestOptions, raw: Any) -> None:
    params = json.loads(raw) if isinstance(raw, str) and raw.strip() else raw or {}
    assert options.contrast_k >= 1
    if "contrast_k" in params:
        assert options.contrast_k == int(str(params["contrast_k"]).strip())
    if options.scores is not None:
        assert options.scores and len(set(options.scores)) == len(options.scores)
        assert set(options.scores) <= set(SCORE_NAMES)
    if options.heatmap_method is not None:
        assert options.heatmap_method in HEATMAP_METHODS
    if options.contrast_class is not None:
        assert 0 <= options.contrast_class < len(LABELS)


@FUZZ
@given(parameters, st.booleans(), st.booleans())
def test_parse_request_answers_options_or_invalid_input_when_parameters_are_random(
    raw, want_scores, want_heatmap
):
    try:
        options = parse_request(raw, SETTINGS, want_scores, want_heatmap)
    except InvalidInputError as err:
        assert 0 < len(str(err)) <= MAX_MESSAGE, str(err)[:200]
        return
    _check_options(options, raw)


@pytest.mark.parametrize(
    "raw",
    [
        "[1, 2]",
        "null",
        "5",
        '"scores"',
        '{"scores": 5}',
        '{"scores": true}',
        '{"scores": null}',
        '{"scores": {"msp": 1}}',
        '{"contrast_k": [3]}',
        '{"contrast_k": true}',
        '{"contrast_class": 2.5}',
        '{"heatmap_method": ["gradcam"]}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_parse_request_raises_invalid_input_when_parameters_have_the_wrong_json_type(raw):
    with pytest.raises(InvalidInputError) as info:
        parse_request(raw, SETTINGS, want_scores=False, want_heatmap=False)
    assert len(str(info.value)) <= MAX_MESSAGE


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"scores": ",".join(f"bogus{i}" for i in range(100_000))}, "unknown score name(s)"),
        ({"scores": ",".join(["msp"] * 100_000)}, "score names repeat"),
        ({f"knob{i}": i for i in range(10_000)}, "unknown request parameter(s)"),
        ({"contrast_class": "x" * 100_000}, "contrast_class"),
        ({"heatmap_method": "y" * 100_000}, "heatmap_method"),
    ],
    ids=["many-unknown-scores", "repeated-scores", "many-keys", "long-class", "long-method"],
)
def test_parse_request_keeps_message_short_when_a_parameter_is_huge(raw, names):
    with pytest.raises(InvalidInputError) as info:
        parse_request(json.dumps(raw), SETTINGS, want_scores=True, want_heatmap=False)
    assert names in str(info.value)
    assert len(str(info.value)) <= MAX_MESSAGE


# --- images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> TrustService:
    return TrustService(OnnxClassifier(DEMO_ONNX), SETTINGS)


@pytest.fixture(scope="module")
def reference_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])


def _assert_correct(answer: Any, pixels: np.ndarray, options: RequestOptions, session) -> None:
    """The service's answer equals onnxruntime + the score functions on these pixels."""
    assert isinstance(answer, dict), answer
    logits, features = session.run(["logits", "features"], {"image": pixels.astype(np.float32)})
    want = logits.argmax(axis=1)
    np.testing.assert_array_equal(answer[CLASS_ID][:, 0], want)
    assert [v.decode() for v in answer[LABEL][:, 0]] == [LABELS[c] for c in want]
    np.testing.assert_allclose(answer[CONFIDENCE][:, 0], scores.msp(logits), rtol=1e-5)
    np.testing.assert_allclose(answer[GRADTRUST][:, 0], scores.gradtrust(logits), rtol=1e-5)
    if options.scores:
        table = scores.compute_scores(
            logits, options.scores, features=features, contrast_k=options.contrast_k
        )
        expected = np.stack([table[n] for n in options.scores], axis=1)
        big = float(np.finfo(np.float32).max)
        np.testing.assert_allclose(
            answer[SCORES], np.clip(expected, -big, big), rtol=1e-5, atol=1e-6
        )
    if options.heatmap_method:
        maps = answer[HEATMAP]
        assert maps.shape == (len(pixels), 28, 28) and np.isfinite(maps).all()


options_strategy = st.builds(
    RequestOptions,
    scores=st.none() | st.lists(st.sampled_from(SCORE_NAMES), min_size=1, unique=True).map(tuple),
    contrast_k=st.integers(1, 12),
    heatmap_method=st.none() | st.sampled_from(HEATMAP_METHODS),
    contrast_class=st.none() | st.integers(0, 9),
)


@FUZZ
@given(images())
def test_check_images_returns_input_or_raises_invalid_input_when_images_are_random(service, batch):
    try:
        checked = service.checks.check_images(batch)
    except InvalidInputError as err:
        assert 0 < len(str(err)) <= MAX_MESSAGE
        return
    assert checked is batch
    assert batch.dtype.kind in "fiu" and batch.shape[1:] == (1, 28, 28) and len(batch) > 0
    flat = batch.reshape(len(batch), -1).astype(np.float64)
    assert np.isfinite(flat).all() and flat.min() >= 0 and flat.max() <= 1


@FUZZ
@given(
    st.data(),
    images(),
    options_strategy,
    st.integers(0, 2),
)
def test_service_answers_good_requests_unchanged_when_a_random_request_shares_the_batch(
    service, reference_session, digits, data, batch, options, position
):
    good_options = RequestOptions(("msp", "margin"), 3, None, None)
    first = data.draw(st.integers(0, 100), label="first digit")
    good = [digits[0][first : first + 2], digits[0][first + 2 : first + 5]]
    requests = [ScoringRequest(g, good_options) for g in good]
    requests.insert(position, ScoringRequest(batch, options))
    answers = service.run(requests).answers
    for i, request in enumerate(requests):
        if i == position:
            continue
        _assert_correct(answers[i], request.images, good_options, reference_session)
    odd = answers[position]
    if isinstance(odd, InvalidInputError):
        assert 0 < len(str(odd)) <= MAX_MESSAGE
    else:
        _assert_correct(odd, batch, options, reference_session)
        assert math.isfinite(float(np.asarray(odd[GRADTRUST]).min()))
