"""Calibration: isotonic maps GradTrust -> P(correct), thresholds with stated targets, the
JSON the server loads, the config.pbtxt edit, and the in-process round trip on real data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtrust.core.calibration import (
    IsotonicMap,
    ThresholdTarget,
    TrustCalibration,
    load_model_calibration,
)
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.tools.evaluate import cli
from gradtrust.tools.evaluate.calibration import (
    achieved,
    check_heldout,
    choose_threshold,
    fit_calibration,
    fit_isotonic,
    isotonic_breakpoints,
    tolerance,
)
from gradtrust.tools.evaluate.repository import set_config_parameter, write_calibration
from gradtrust.tools.evaluate.runner import demo_data
from gradtrust.tools.evaluate.scoring import InProcessScorer
from gradtrust.tools.evaluate.shifts import with_corruptions
from tests.conftest import DEMO_ONNX, MODEL_REPOSITORY

ENTRY = MODEL_REPOSITORY / "gradtrust_mnist"


# ---- isotonic regression ---------------------------------------------------------------


def test_isotonic_breakpoints_pool_a_violating_pair_when_y_drops():
    xs, ys = isotonic_breakpoints([1, 2, 3, 4], [1, 0, 1, 1])
    # (1, 2) pool to 0.5; (3, 4) are both 1 and pool into one flat block.
    np.testing.assert_array_equal(xs, [1, 2, 3, 4])
    np.testing.assert_array_equal(ys, [0.5, 0.5, 1.0, 1.0])


def test_isotonic_breakpoints_give_tied_x_one_value_when_x_repeats():
    xs, ys = isotonic_breakpoints([2, 1, 2, 3], [1, 0, 0, 1])
    np.testing.assert_array_equal(xs, [1, 2, 3])
    np.testing.assert_array_equal(ys, [0.0, 0.5, 1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=1, max_size=60))
def test_isotonic_map_matches_scikit_learn_when_fitted_on_the_same_data(pairs):
    from sklearn.isotonic import IsotonicRegression

    x = np.array([float(a) for a, _ in pairs])
    y = np.array([float(b) for _, b in pairs])
    ours = fit_isotonic(x, y)
    reference = IsotonicRegression(out_of_bounds="clip").fit(x, y)
    probe = np.linspace(-2, 22, 97)
    np.testing.assert_allclose(ours(probe), reference.predict(probe), atol=1e-12)


def test_isotonic_map_is_monotone_and_flat_outside_when_applied():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = rng.random(300) < 1 / (1 + np.exp(-2 * x))
    m = fit_isotonic(x, y)
    probe = np.linspace(-10, 10, 2001)
    p = m(probe)
    assert (np.diff(p) >= 0).all() and p.min() >= 0 and p.max() <= 1
    assert m(-1e9) == m.y[0] and m(1e9) == m.y[-1]


@pytest.mark.parametrize(
    ("x", "y"), [((1.0, 1.0), (0.1, 0.2)), ((1.0, 2.0), (0.5, 0.4)), ((1.0,), (1.5,))]
)
def test_isotonic_map_refuses_breakpoints_when_they_are_not_monotone_probabilities(x, y):
    with pytest.raises(ConfigError):
        IsotonicMap(x, y)


# ---- thresholds -------------------------------------------------------------------------


def test_choose_threshold_flags_at_most_the_rate_when_target_is_a_flag_rate():
    scores = np.arange(1.0, 11.0)
    t = choose_threshold(scores, np.ones(10, bool), ThresholdTarget("flag_rate", 0.3))
    assert t == 3.5  # midway between the 3rd and 4th values: flags 1, 2, 3
    assert achieved(scores, np.ones(10, bool), t, "flag_rate") == 0.3
    # Ties cannot be split: with four 1.0 values a 30 % target flags none of them.
    tied = np.array([1.0, 1, 1, 1, 5, 6, 7, 8, 9, 10])
    assert choose_threshold(tied, np.ones(10, bool), ThresholdTarget("flag_rate", 0.3)) == 1.0


def test_choose_threshold_catches_the_errors_when_target_is_an_error_recall():
    scores = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    correct = np.array([0, 1, 0, 1, 1, 0, 1, 1], bool)  # errors at 1, 3, 6
    t = choose_threshold(scores, correct, ThresholdTarget("error_recall", 0.6))
    assert t == 3.5  # ceil(0.6 * 3) = 2 errors: flag up to 3
    assert achieved(scores, correct, t, "error_recall") == pytest.approx(2 / 3)
    with pytest.raises(InvalidInputError, match="needs wrong predictions"):
        choose_threshold(scores, np.ones(8, bool), ThresholdTarget("error_recall", 0.5))


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("flag-rate=0.1", "flag_rate", 0.1), ("error_recall=80%", "error_recall", 0.8)],
)
def test_threshold_target_parses_text_when_written_as_kind_equals_value(text, kind, value):
    assert ThresholdTarget.parse(text) == ThresholdTarget(kind, value)


@pytest.mark.parametrize("text", ["flag-rate", "recall=0.5", "flag-rate=1.5", "flag-rate=x"])
def test_threshold_target_refuses_text_when_malformed(text):
    with pytest.raises(InvalidInputError):
        ThresholdTarget.parse(text)


def test_tolerance_is_three_standard_errors_of_a_rate_difference_when_sizes_are_known():
    got = tolerance(ThresholdTarget("flag_rate", 0.1), 500, 1000)
    assert got == pytest.approx(3 * math.sqrt(0.09 * (1 / 500 + 1 / 1000)))


# ---- the JSON file and config.pbtxt ------------------------------------------------------


def _small_calibration() -> TrustCalibration:
    rng = np.random.default_rng(1)
    g = rng.uniform(1, 10, 400)
    correct = rng.random(400) < (g / 10)
    return fit_calibration(
        {"gradtrust": g, "msp": g / 10}, correct, ThresholdTarget("flag_rate", 0.2), data="t"
    )


def test_trust_calibration_round_trips_through_json_when_saved_and_loaded(tmp_path):
    cal = _small_calibration()
    cal.to_json(tmp_path / "c.json")
    loaded = TrustCalibration.from_json(tmp_path / "c.json")
    assert loaded == cal
    probe = np.linspace(0, 11, 50)
    np.testing.assert_array_equal(loaded.apply(probe), cal.apply(probe))
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["format"] == "gradtrust-trust-calibration" and data["version"] == 1
    assert set(data["maps"]) == {"gradtrust", "msp"} and data["target"]["kind"] == "flag_rate"


def test_load_model_calibration_returns_none_when_the_entry_has_no_file(tmp_path):
    assert load_model_calibration(tmp_path) is None
    cal = _small_calibration()
    cal.to_json(tmp_path / "trust_calibration.json")
    assert load_model_calibration(tmp_path) == cal


def test_trust_calibration_refuses_a_file_when_its_format_is_unknown(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ConfigError, match="re-run `gradtrust calibrate`"):
        TrustCalibration.from_json(path)


CONFIG = """name: "m"
parameters [
  { key: "scores", value: { string_value: "msp" } },  # keep me
  { key: "low_trust_threshold", value: { string_value: "3.0" } }
]
"""


def test_set_config_parameter_changes_only_the_value_when_the_key_exists():
    out = set_config_parameter(CONFIG, "low_trust_threshold", "2.75")
    assert out == CONFIG.replace('"3.0"', '"2.75"')


def test_set_config_parameter_appends_an_entry_when_the_key_is_missing():
    text = 'name: "m"\nparameters [\n  { key: "scores", value: { string_value: "a]" } }  # [x]\n]\n'
    out = set_config_parameter(text, "low_trust_threshold", "2.5")
    assert out == (
        'name: "m"\nparameters [\n  { key: "scores", value: { string_value: "a]" } },  # [x]\n'
        '  { key: "low_trust_threshold", value: { string_value: "2.5" } }\n]\n'
    )
    assert set_config_parameter(out, "low_trust_threshold", "9") == out.replace('"2.5"', '"9"')


def test_set_config_parameter_fills_an_empty_list_when_it_has_no_entries():
    out = set_config_parameter("parameters [ ]\n", "k", "v")
    assert out == 'parameters [\n  { key: "k", value: { string_value: "v" } }\n]\n'


def test_set_config_parameter_adds_a_block_when_there_are_no_parameters():
    out = set_config_parameter('name: "m"\n', "low_trust_threshold", "4")
    assert out == 'name: "m"\n\nparameters [\n  { key: "low_trust_threshold", value: { ' + (
        'string_value: "4" } }\n]\n'
    )


def test_set_config_parameter_edits_the_value_when_the_entry_spans_lines():
    text = 'parameters {\n  key: "low_trust_threshold"\n  value: { string_value: "1" }\n}\n'
    out = set_config_parameter(text, "low_trust_threshold", "6.5")
    assert out == text.replace('"1"', '"6.5"')


def test_write_calibration_writes_json_and_threshold_when_given_a_model_entry(tmp_path):
    entry = tmp_path / "gradtrust_mnist"
    entry.mkdir()
    original = (ENTRY / "config.pbtxt").read_text()
    (entry / "config.pbtxt").write_text(original)
    cal = _small_calibration()
    json_path, config_path = write_calibration(entry, cal)
    assert TrustCalibration.from_json(json_path) == cal
    expected = set_config_parameter(original, "low_trust_threshold", repr(cal.low_trust_threshold))
    assert config_path.read_text() == expected
    assert f'string_value: "{cal.low_trust_threshold!r}"' in expected


# ---- the round trip on real held-out data ------------------------------------------------


@pytest.fixture(scope="module")
def scorer() -> InProcessScorer:
    return InProcessScorer(DEMO_ONNX, intra_op_threads=2)


@pytest.fixture(scope="module")
def demo():
    return demo_data()


def _fit_and_check(scorer, cal_x, cal_y, held_x, held_y, target):
    fitted = scorer.score(cal_x)
    cal = fit_calibration(fitted.scores, fitted.correct(cal_y), target)
    held = scorer.score(held_x)
    return cal, check_heldout(
        cal, held.scores["gradtrust"], held.scores["msp"], held.correct(held_y)
    )


def test_calibration_beats_softmax_ece_and_meets_flag_rate_when_checked_on_clean_test(scorer, demo):
    target = ThresholdTarget("flag_rate", 0.1)
    cal, check = _fit_and_check(
        scorer,
        demo.calibration_images,
        demo.calibration_labels,
        demo.test_images,
        demo.test_labels,
        target,
    )
    assert check.ece_trust_prob < check.ece_confidence, check
    assert abs(check.achieved - target.value) <= check.tolerance, check
    assert check.passed


def test_calibration_beats_softmax_ece_and_meets_error_recall_when_traffic_is_shifted(scorer, demo):
    kinds = ("gaussian_noise", "defocus_blur", "brightness")
    cal_x, cal_y = with_corruptions(
        demo.calibration_images, demo.calibration_labels, seed=0, corruptions=kinds
    )
    held_x, held_y = with_corruptions(demo.test_images, demo.test_labels, seed=1, corruptions=kinds)
    target = ThresholdTarget("error_recall", 0.8)
    cal, check = _fit_and_check(scorer, cal_x, cal_y, held_x, held_y, target)
    assert cal.fitted_on["wrong"] > 300  # enough errors for a recall target to mean something
    assert check.ece_trust_prob < check.ece_confidence / 2, check
    assert abs(check.achieved - target.value) <= check.tolerance, check
    # The server sees GradTrust in float32; the map must not care about that rounding.
    held = scorer.score(held_x[:2000]).scores["gradtrust"]
    gap = np.abs(cal.apply(held.astype(np.float32)) - cal.apply(held)).max()
    assert gap < 1e-3


def test_calibrate_command_writes_the_model_entry_when_run_on_a_copy(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "gradtrust_mnist" / "1").mkdir(parents=True)
    shutil.copy(ENTRY / "config.pbtxt", repo / "gradtrust_mnist" / "config.pbtxt")
    code = cli.main(
        [
            "calibrate",
            "--model-repository",
            str(repo),
            "--onnx",
            str(DEMO_ONNX),
            "--target",
            "flag-rate=0.1",
            "--strict",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    cal = TrustCalibration.from_json(repo / "gradtrust_mnist" / "trust_calibration.json")
    config = (repo / "gradtrust_mnist" / "config.pbtxt").read_text()
    assert f'string_value: "{cal.low_trust_threshold!r}"' in config
    assert "held-out (1000 samples)" in out and "OK" in out
    assert Path(ENTRY / "config.pbtxt").read_text() != config  # the real entry is untouched
