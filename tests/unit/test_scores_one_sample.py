"""scores.gradtrust_msp_of_sample, the server's one-sample GRADTRUST and msp: the same
numbers as compute_scores, bit for bit, and None for a sample it must refuse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradtrust.core import scores


def _rows(c: int, seed: int) -> list[np.ndarray]:
    """float32 rows (1, C) of many kinds: random at several scales (up to float32's
    range), tied maxima, whole numbers (many ties), constant rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for scale in (1e-3, 1.0, 5.0, 30.0, 1e3, 1e30, 3e38):
        for kind in range(8):
            z = np.clip(rng.normal(size=(1, c)) * scale, -3.4e38, 3.4e38).astype(np.float32)
            if kind == 1:
                z[0, rng.integers(c)] = z.max()  # two classes tie for the prediction
            elif kind == 2:
                z = np.round(z)
            elif kind == 3:
                z[:] = z[0, 0]
            rows.append(z)
    return rows


@pytest.mark.parametrize("c", [2, 3, 4, 5, 10, 1000])
def test_gradtrust_msp_of_sample_equals_compute_scores_bit_for_bit_when_logits_are_float32(c):
    for z in _rows(c, seed=c):
        got = scores.gradtrust_msp_of_sample(z)
        reference = scores.compute_scores(z.astype(np.float64), ("gradtrust", "msp"))
        assert got is not None
        trust, conf, pred = got
        assert trust == reference["gradtrust"][0]  # exact equality: bit for bit
        assert conf == reference["msp"][0]
        assert pred == scores.predicted_class(z)[0]
        assert type(trust) is float and type(conf) is float and type(pred) is int


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("c", [2, 3, 4, 1000])
def test_gradtrust_msp_of_sample_is_none_when_a_logit_is_not_finite(c, bad):
    rng = np.random.default_rng(c)
    for where in ("largest", "smallest", "middle", "every"):
        z = rng.normal(size=(1, c)).astype(np.float32)
        if where == "largest":
            z[0, np.argmax(z)] = bad
        elif where == "smallest":
            z[0, np.argmin(z)] = bad
        elif where == "middle":
            z[0, c // 2] = bad
        else:
            z[:] = bad
        assert scores.gradtrust_msp_of_sample(z) is None, (where, z)


def test_gradtrust_msp_of_sample_warns_about_nothing_when_logits_span_float32():
    z = np.full((1, 1000), -3.4e38, dtype=np.float32)
    z[0, 7] = 3.4e38
    z[0, 9] = 3.3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = scores.gradtrust_msp_of_sample(z)
    reference = scores.compute_scores(z.astype(np.float64), ("gradtrust", "msp"))
    assert got == (reference["gradtrust"][0], reference["msp"][0], 7)


@pytest.mark.parametrize("c", [2, 10, 1000])
def test_gradtrust_and_msp_equal_compute_scores_without_warnings_when_spans_fit(c):
    rng = np.random.default_rng(c)
    n = max(1, 16000 // c)  # one block: the case that skips np.errstate
    z32 = np.clip(
        rng.normal(size=(n, c)) * rng.choice([0.01, 1.0, 30.0, 1e30, 3e38], size=(n, 1)),
        -3.4e38,
        3.4e38,
    ).astype(np.float32)
    z32[0] = -3.4e38  # the widest span float32 allows
    z32[0, 1] = 3.4e38
    logits = z32.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trust, conf = scores.gradtrust_and_msp(logits, spans_fit=True)
    reference = scores.compute_scores(logits, ("gradtrust", "msp"))
    np.testing.assert_array_equal(trust, reference["gradtrust"], strict=True)
    np.testing.assert_array_equal(conf, reference["msp"], strict=True)
