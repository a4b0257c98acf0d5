"""Trust calibration: the gradient features (against autograd), the probability map (never
0 or 1), the file (v2, v1 refused, probe), the fit (signal choice, logistic combination,
refusals), the folder input through the entry's preprocessing, and the calibrate command."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from gradtrust.core import trust_features
from gradtrust.core.calibration import (
    TAIL_SHARE,
    ProbabilityMap,
    Signal,
    ThresholdTarget,
    TrustCalibration,
    compute_inputs,
    input_names,
    load_model_calibration,
)
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import FEATURES, LOGITS
from gradtrust.serving.decoding import decode_batch
from gradtrust.tools.evaluate import cli
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.assessment import (
    RAW_CONFIDENCE,
    Assessment,
    Interval,
    assess,
    calibration_warnings,
    verdict,
)
from gradtrust.tools.evaluate.calibration import (
    CLEAN_WEIGHTS,
    MIN_ERRORS,
    MapBalance,
    achieved,
    balanced_weights,
    choose_map_balance,
    choose_threshold,
    fit_part_weighted_map,
    fit_probability_map,
    fit_trust_calibration,
    tolerance,
)
from gradtrust.tools.evaluate.calibration_report import MARKDOWN, RELIABILITY, RISK_COVERAGE
from gradtrust.tools.evaluate.folder import (
    EntryPreprocessing,
    entry_spec,
    folder_data,
    read_image_folder,
)
from gradtrust.tools.evaluate.repository import read_config_parameters, set_config_parameter
from gradtrust.tools.evaluate.shifts import corrupt
from gradtrust.tools.evaluate.signals import CalibrationRefused, fit_logistic, select_signal
from tests.conftest import DEMO_ONNX, MODEL_REPOSITORY
from tests.reference.autograd_trust_features import gradient_features_by_autograd

ENTRY = MODEL_REPOSITORY / "gradtrust_mnist"


# ---- gradient features: exact against autograd -------------------------------------------


def _autograd_case(c: int, d: int, n: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    head = nn.Linear(d, c).double()
    with torch.no_grad():
        head.weight.mul_(3.0)
    return head, torch.randn(n, d, dtype=torch.float64)


@pytest.mark.parametrize(("c", "d"), [(2, 5), (4, 7), (10, 16), (1000, 8)])
def test_gradient_features_match_autograd_when_heads_are_random(c, d):
    head, h = _autograd_case(c, d, 6, seed=c)
    with torch.no_grad():
        z = head(h).numpy()
    names = trust_features.feature_names(c, 3, has_features=True)
    got = trust_features.compute_gradient_features(z, names, h.numpy(), 3)
    want = gradient_features_by_autograd(head, h, 3)
    assert set(got) == set(want)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-9, err_msg=name)


def test_gradient_features_match_autograd_when_the_model_is_the_trained_demo(digits):
    classifier = OnnxClassifier(DEMO_ONNX)
    out = classifier.run(digits[0][:24], [LOGITS, FEATURES])
    weight = torch.from_numpy(classifier.head_weight().astype(np.float64))
    h = torch.from_numpy(out[FEATURES].astype(np.float64))
    head = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        head.weight.copy_(weight)
        # The bias that reproduces the served logits exactly from these features.
        head.bias.copy_(torch.from_numpy(out[LOGITS][0].astype(np.float64)) - weight @ h[0])
        z = head(h).numpy()
    names = trust_features.feature_names(10, 3, has_features=True)
    got = trust_features.compute_gradient_features(z, names, h.numpy(), 3)
    want = gradient_features_by_autograd(head, h, 3)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-8, atol=1e-8, err_msg=name)


def test_gradient_ratio_features_do_not_change_when_a_constant_is_added_to_every_logit():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (50, 10))
    names = trust_features.feature_names(10, 3, has_features=False)
    base = trust_features.compute_gradient_features(z, names)
    moved = trust_features.compute_gradient_features(z + 37.5, names)
    for name in names:
        np.testing.assert_allclose(moved[name], base[name], rtol=1e-12, atol=1e-9)


def test_gradient_features_stay_finite_when_logits_are_uniform_or_far_apart():
    z = np.array([[0.0] * 4, [1e3, 0, 0, 0], [1e300, -1e300, 0, 3], [5, 5, 1, 0]])
    h = np.array([[0.0] * 3, [1e-200, 0, 0], [1e200, 1, 1], [1, 2, 3]])
    names = trust_features.feature_names(4, 3, has_features=True)
    got = trust_features.compute_gradient_features(z, names, h, 3)
    for name in names:
        assert np.isfinite(got[name]).all(), name
    assert got["cf_ratio_1"][0] == pytest.approx(0.0)  # uniform: P and Q look alike


def test_gradient_features_of_a_sample_do_not_depend_on_the_rest_of_the_batch():
    rng = np.random.default_rng(1)
    z, h = rng.normal(0, 3, (30, 10)), rng.normal(size=(30, 6))
    names = trust_features.feature_names(10, 3, has_features=True)
    whole = trust_features.compute_gradient_features(z, names, h)
    alone = trust_features.compute_gradient_features(z[7:8], names, h[7:8])
    for name in names:
        assert whole[name][7] == alone[name][0]


def test_compute_inputs_refuses_a_name_when_it_is_neither_a_score_nor_a_feature():
    with pytest.raises(InvalidInputError, match="bogus"):
        compute_inputs(np.zeros((2, 3)), ("msp", "bogus"))


# ---- the probability map: strictly inside (0, 1) ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-50, 50), st.booleans()), min_size=1, max_size=300),
    st.sampled_from([1, 5, 30]),
)
def test_trust_prob_is_never_exactly_0_or_1_when_fitted_on_any_labels(pairs, min_block):
    signal = np.array([s for s, _ in pairs])
    correct = np.array([c for _, c in pairs])
    prob_map = fit_probability_map(signal, correct, min_block=min_block)
    probe = np.concatenate((signal, [-1e308, -1e3, 0.0, 1e3, 1e308]))
    p = prob_map(probe)
    assert ((p > 0) & (p < 1)).all()
    p32 = p.astype(np.float32)  # what the server sends
    assert ((p32 > 0) & (p32 < 1)).all()
    assert (np.diff(prob_map(np.sort(probe))) >= 0).all()  # monotone


def test_probability_map_is_laplace_smoothed_per_block_when_blocks_reach_the_minimum():
    signal = np.arange(8.0)
    correct = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    m = fit_probability_map(signal, correct, min_block=4)
    # Two blocks of four: 0 of 4 right -> 1/6, 4 of 4 right -> 5/6, knots at block means.
    assert m.x == (1.5, 5.5)
    assert m.y == pytest.approx((1 / 6, 5 / 6))
    assert fit_probability_map(signal, correct, min_block=8).y == pytest.approx((0.5,))


def test_probability_map_keeps_rising_beyond_its_knots_by_at_most_the_tail_share():
    m = ProbabilityMap((0.5, 0.9, 0.99), (0.3, 0.8, 0.97))
    above = np.array([0.99, 0.995, 0.999, 0.9999, 1.0, 2.0, 1e308])
    below = np.array([-1e308, -5.0, 0.0, 0.49, 0.5])
    # Strictly increasing where a flat tail would tie every more confident prediction ...
    assert (np.diff(m(above)[:-1]) > 0).all()
    assert (np.diff(m(below)[1:]) > 0).all()
    assert (np.diff(m(above).astype(np.float32)[:5]) > 0).all()  # also as served
    # ... by no more than the tail share of the distance left to 1 (or to 0).
    assert m(above).max() <= 0.97 + TAIL_SHARE * 0.03 + 1e-15
    assert m(below).min() >= 0.3 - TAIL_SHARE * 0.3 - 1e-15
    np.testing.assert_allclose(m(np.array([0.5, 0.7, 0.99])), [0.3, 0.55, 0.97], rtol=1e-15)


def test_fitted_map_ranks_confident_predictions_as_finely_as_softmax_when_they_cluster_at_1():
    # Confidences within 1e-3 of 1 where accuracy still rises with confidence, and a large
    # top block: right and wrong must still be told apart after the cast to float32.
    rng = np.random.default_rng(8)
    z = rng.uniform(1, 7, 5000)
    msp = 1.0 - 0.5 * 10.0**-z
    correct = rng.random(msp.size) < 0.2 + 0.1 * z
    m = fit_probability_map(msp, correct, min_block=1000)
    assert m.tail_widths == pytest.approx((m.x[0] - msp.min(), msp.max() - m.x[-1]))
    served = M.auroc(m(msp).astype(np.float32), correct)
    # A flat tail loses 0.0025 here, a tail as wide as the knot spacing 0.00014.
    assert served >= M.auroc(msp.astype(np.float32), correct) - 5e-5
    assert ProbabilityMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def _two_populations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A softmax-like confidence that is calibrated on clean data (first half) and
    over-confident under shift (second half: accuracy 0.35 below the confidence)."""
    rng = np.random.default_rng(seed)
    part = (np.arange(n) >= n // 2).astype(np.int64)
    msp = rng.uniform(0.4, 1.0, n)
    accuracy = np.where(part == 0, msp, np.clip(msp - 0.35, 0.0, 1.0))
    return msp, rng.random(n) < accuracy, part


def test_choose_map_balance_keeps_equal_weights_when_both_parts_look_alike():
    rng = np.random.default_rng(5)
    n = 6000
    msp = rng.uniform(0.4, 1.0, n)
    correct = rng.random(n) < msp - 0.2  # the same over-confidence in both parts
    part = (np.arange(n) >= n // 2).astype(np.int64)
    balance = choose_map_balance(msp, msp, correct, np.arange(n), part)
    assert balance.clean_weight == 0.5
    assert balance.no_worse


def test_choose_map_balance_weighs_the_clean_part_more_when_equal_weights_understate_it():
    msp, correct, part = _two_populations(8000, 6)
    balance = choose_map_balance(msp, msp, correct, np.arange(msp.size), part)
    # Equal weights put the map halfway between the two populations: worse than softmax
    # confidence (already calibrated) on clean data, better on shifted data.
    assert balance.excess[0.5]["clean"] > 0.05
    assert balance.excess[0.5]["shifted"] < -0.05
    assert balance.clean_weight > 0.5
    chosen = balance.excess[balance.clean_weight]
    assert max(chosen.values()) < max(balance.excess[0.5].values())
    # The weight nearest to equal that keeps both parts no worse, or the best compromise.
    if balance.no_worse:
        nearer = [w for w in CLEAN_WEIGHTS if abs(w - 0.5) < abs(balance.clean_weight - 0.5)]
        assert all(max(balance.excess[w].values()) > 0 for w in nearer)
    else:
        assert max(chosen.values()) == min(max(e.values()) for e in balance.excess.values())


def test_choose_map_balance_takes_the_stated_clean_share_when_the_user_gives_one():
    msp, correct, part = _two_populations(4000, 8)
    for share in (0.9, 0.1234):  # on the grid, and off it
        balance = choose_map_balance(msp, msp, correct, np.arange(msp.size), part, stated=share)
        assert balance.clean_weight == share and balance.stated
        assert set(balance.chosen_excess) == {"clean", "shifted"}  # judged like the others
        assert MapBalance.from_selection({"map_balance": balance.to_dict()}) == balance


def test_fit_trust_calibration_fits_map_and_threshold_for_the_stated_clean_share():
    msp, correct, part = _two_populations(3000, 9)
    inputs = {"msp": msp, "margin": msp + 0.01}
    args = (inputs, correct, np.arange(msp.size), ThresholdTarget("flag_rate", 0.05))
    calibration, _, _ = fit_trust_calibration(*args, force="msp", parts=part, clean_share=0.9)
    stated = balanced_weights(part, 0.9)
    expected = fit_part_weighted_map(msp, correct, stated)
    assert calibration.map == expected
    trust_prob = calibration.map(msp)
    assert calibration.achieved_on_calibration == achieved(
        trust_prob, correct, calibration.low_trust_threshold, "flag_rate", stated
    )
    assert MapBalance.from_selection(calibration.selection) == MapBalance(
        0.9, MapBalance.from_selection(calibration.selection).excess, stated=True
    )
    for bad in ({"clean_share": 1.5, "parts": part}, {"clean_share": 0.9}):
        with pytest.raises(InvalidInputError, match="clean share"):
            fit_trust_calibration(*args, force="msp", **bad)


def test_balanced_weights_give_the_clean_part_its_share_when_parts_differ_in_size():
    part = np.array([0] * 10 + [1] * 90)
    w = balanced_weights(part, 0.8)
    assert w.sum() == pytest.approx(100.0)
    assert w[part == 0].sum() == pytest.approx(80.0)
    np.testing.assert_allclose(balanced_weights(part, 0.5), 100 / (2 * np.bincount(part)[part]))


def test_fit_trust_calibration_records_the_map_balance_when_parts_are_given():
    msp, correct, part = _two_populations(3000, 7)
    calibration, _, _ = fit_trust_calibration(
        {"msp": msp, "margin": msp + 0.01},
        correct,
        np.arange(msp.size),
        ThresholdTarget("flag_rate", 0.05),
        force="msp",
        parts=part,
    )
    balance = calibration.selection["map_balance"]
    assert balance["clean_weight"] > 0.5
    assert f"{balance['clean_weight']:g}" in balance["ece_minus_softmax_by_weight"]
    # Readers of the file (report, CLI) see the balance the fit chose, judged the same way.
    recorded = MapBalance.from_selection(calibration.selection)
    assert recorded == choose_map_balance(msp, msp, correct, np.arange(msp.size), part)
    assert MapBalance.from_selection({}) is None
    # The map then sits closer to the clean population: clean samples near 0.9 confidence
    # get a probability nearer 0.9 than the equal-weights midpoint of 0.9 and 0.55.
    assert calibration.map(np.array([0.9]))[0] > 0.75


def test_probability_map_refuses_values_of_0_or_1_when_read_from_a_file():
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        ProbabilityMap((0.0, 1.0), (0.0, 0.9))
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        ProbabilityMap((0.0, 1.0), (0.2, 1.0))


# ---- the logistic combination and the signal choice --------------------------------------


def test_fit_logistic_matches_scikit_learn_when_the_penalty_is_the_same():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3))
    y = rng.random(400) < 1 / (1 + np.exp(-(x @ [1.5, -0.5, 0.0] + 0.3)))
    coef, intercept = fit_logistic(x, y, l2=2.0)
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(coef, ref.coef_[0], atol=1e-6)
    assert intercept == pytest.approx(ref.intercept_[0], abs=1e-6)


def _synthetic(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two independent noisy views of correctness and a pure-noise input (named like real
    inputs, which a signal must use)."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.7
    a = correct + rng.normal(0, 0.8, n)
    b = correct + rng.normal(0, 0.8, n)
    return {
        "msp": 1 / (1 + np.exp(-a)),
        "margin": b,
        "feature_norm": rng.normal(size=n),
    }, correct


def test_select_signal_prefers_a_combination_when_inputs_carry_independent_evidence():
    inputs, correct = _synthetic(3000, 3)
    selection = select_signal(inputs, correct, np.arange(correct.size), seed=0)
    # Both combinations hold the two informative views; the noise input adds nothing.
    assert selection.chosen in ("combination", "msp+margin")
    best_single = max(selection.auroc["msp"], selection.auroc["margin"])
    assert selection.auroc[selection.chosen] > best_single + 0.02
    assert selection.auroc["feature_norm"] == pytest.approx(0.5, abs=0.05)
    assert not selection.eligible["feature_norm"]  # significantly worse than softmax


def test_select_signal_keeps_softmax_when_a_candidate_is_better_shifted_but_worse_clean():
    rng = np.random.default_rng(11)
    n = 4000
    part = (np.arange(n) >= n // 2).astype(int)  # clean half, shifted half
    correct = rng.random(n) < 0.75
    soft = correct + rng.normal(0, 0.7, n)
    # Sharp under shift, pure noise on clean data: better on average, worse on clean.
    shift_only = np.where(part == 1, correct + rng.normal(0, 0.3, n), rng.normal(0, 1, n))
    inputs = {"msp": 1 / (1 + np.exp(-soft)), "feature_norm": shift_only}
    selection = select_signal(inputs, correct, np.arange(n), seed=0, parts=part)
    assert selection.gain["feature_norm"]["shifted"] > 0.05
    assert selection.gain["feature_norm"]["clean"] < -0.1
    assert not selection.eligible["feature_norm"]
    assert selection.chosen != "feature_norm"


def test_fit_trust_calibration_refuses_when_the_data_has_too_few_errors():
    inputs, correct = _synthetic(400, 4)
    correct[:] = True
    correct[: MIN_ERRORS - 1] = False
    with pytest.raises(CalibrationRefused, match=f"only {MIN_ERRORS - 1} wrong predictions"):
        fit_trust_calibration(
            inputs, correct, np.arange(correct.size), ThresholdTarget("flag_rate", 0.05)
        )


def test_verdict_refuses_a_signal_when_it_ranks_errors_worse_than_softmax_beyond_the_noise():
    inputs, correct = _synthetic(2000, 5)
    target = ThresholdTarget("flag_rate", 0.05)
    groups = np.arange(correct.size)
    cal, _, fitted = fit_trust_calibration(inputs, correct, groups, target, force="feature_norm")
    held_inputs, held_correct = _synthetic(1500, 6)
    part = assess("clean", fitted, held_inputs, held_correct, resamples=100)
    problems = verdict(cal.signal.name, [part])
    assert len(problems) == 1 and "worse than softmax confidence" in problems[0]
    assert part.auroc_gain["feature_norm"].high < 0
    # The best signal of the same fit is accepted: its interval does not lie below 0.
    assert verdict("combination", [part]) == []
    assert part.auroc_gain["combination"].value > 0


def test_calibration_warnings_name_the_part_when_trust_prob_is_less_calibrated_than_softmax():
    def part(name: str, ece_trust: float, ece_soft: float) -> Assessment:
        rows = {
            "msp": {"ece": Interval(ece_trust, 0.0, 1.0)},
            RAW_CONFIDENCE: {"ece": Interval(ece_soft, 0.0, 1.0)},
        }
        return Assessment(name, 500, 20, 0.96, rows=rows)

    warnings = calibration_warnings(
        "msp", [part("clean", 0.047, 0.014), part("shifted", 0.04, 0.09)]
    )
    assert len(warnings) == 1
    assert "on clean held-out data" in warnings[0] and "ECE 0.0470 against 0.0140" in warnings[0]
    assert calibration_warnings("msp", [part("clean", 0.01, 0.014)]) == []


def test_assess_reports_every_candidate_and_the_served_softmax_when_given_held_out_data():
    inputs, correct = _synthetic(1500, 7)
    _, _, fitted = fit_trust_calibration(
        inputs, correct, np.arange(correct.size), ThresholdTarget("flag_rate", 0.1)
    )
    held_inputs, held_correct = _synthetic(800, 8)
    part = assess("shifted", fitted, held_inputs, held_correct, np.arange(800) // 4, 50)
    reported = {"msp", "margin", "feature_norm", "combination", "CONFIDENCE (softmax, as served)"}
    assert reported <= set(part.rows) and len(set(part.rows) - reported) <= 1  # + the chosen
    for row in part.rows.values():
        for interval in row.values():
            assert interval.low <= interval.high
    soft = part.rows["CONFIDENCE (softmax, as served)"]["auroc"].value
    assert soft == pytest.approx(M.auroc(held_inputs["msp"], held_correct))


# ---- the file ---------------------------------------------------------------------------------


def _small_calibration() -> TrustCalibration:
    rng = np.random.default_rng(9)
    z = rng.normal(0, 3, (600, 4))
    labels = np.where(rng.random(600) < 0.8, z.argmax(1), rng.integers(0, 4, 600))
    correct = z.argmax(1) == labels
    inputs = compute_inputs(z, input_names(4, 3, False), None, 3)
    cal, _, _ = fit_trust_calibration(
        inputs, correct, np.arange(600), ThresholdTarget("flag_rate", 0.2), probe=(z[:3], None)
    )
    return cal


def test_trust_calibration_round_trips_through_json_when_saved_and_loaded(tmp_path):
    cal = _small_calibration()
    cal.to_json(tmp_path / "c.json")
    loaded = TrustCalibration.from_json(tmp_path / "c.json")
    z = np.random.default_rng(10).normal(0, 5, (40, 4))
    np.testing.assert_array_equal(loaded.apply(z), cal.apply(z))
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["version"] == 2 and "score" not in data and "maps" not in data
    assert 0 < data["low_trust_threshold"] < 1


def test_trust_calibration_refuses_a_version_1_file_with_a_message_to_recalibrate(tmp_path):
    path = tmp_path / "trust_calibration.json"
    path.write_text(
        json.dumps(
            {
                "format": "gradtrust-trust-calibration",
                "version": 1,
                "score": "gradtrust",
                "maps": {"gradtrust": {"x": [1.0, 2.0], "y": [0.0, 1.0]}},
                "low_trust_threshold": 1.5,
                "target": {"kind": "flag_rate", "value": 0.05},
            }
        )
    )
    with pytest.raises(ConfigError, match="version 1.*re-run `gradtrust calibrate`"):
        load_model_calibration(tmp_path)


def test_trust_calibration_refuses_a_file_when_its_inputs_are_computed_differently_now(tmp_path):
    data = _small_calibration().to_dict()
    name = data["signal"]["inputs"][0]
    data["probe"]["values"][name][0] += 0.5  # as if the score's definition had changed
    (tmp_path / "trust_calibration.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"{name}.*re-run `gradtrust calibrate`"):
        load_model_calibration(tmp_path)


def test_trust_calibration_keeps_the_held_out_ece_and_names_the_parts_softmax_won():
    calibration = replace(
        _small_calibration(),
        heldout_ece={
            "clean": {"trust_prob": 0.041, "confidence": 0.031},
            "shifted": {"trust_prob": 0.02, "confidence": 0.09},
        },
    )
    again = TrustCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.heldout_ece == calibration.heldout_ece
    assert again.less_calibrated_parts() == ("clean",)
    # Files written before the field existed load with nothing to report.
    older = {k: v for k, v in calibration.to_dict().items() if k != "heldout_ece"}
    assert TrustCalibration.from_dict(older).less_calibrated_parts() == ()


def test_signal_refuses_an_input_when_this_package_does_not_know_it():
    with pytest.raises(ConfigError, match="unknown input"):
        Signal("input", ("retired_score",))


def test_load_model_calibration_returns_none_when_the_entry_has_no_file(tmp_path):
    assert load_model_calibration(tmp_path) is None


def test_demo_entry_ships_a_version_2_calibration_when_loaded():
    cal = load_model_calibration(ENTRY)
    assert cal is not None and 0 < cal.low_trust_threshold < 1


# ---- thresholds (unchanged semantics, now on TRUST_PROB) -----------------------------------


def test_choose_threshold_flags_at_most_the_rate_when_target_is_a_flag_rate():
    scores = np.arange(1.0, 11.0)
    t = choose_threshold(scores, np.ones(10, bool), ThresholdTarget("flag_rate", 0.3))
    assert t == 3.5
    assert achieved(scores, np.ones(10, bool), t, "flag_rate") == 0.3


def test_choose_threshold_catches_the_errors_when_target_is_an_error_recall():
    scores = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    correct = np.array([0, 1, 0, 1, 1, 0, 1, 1], bool)
    t = choose_threshold(scores, correct, ThresholdTarget("error_recall", 0.6))
    assert t == 3.5
    with pytest.raises(InvalidInputError, match="needs wrong predictions"):
        choose_threshold(scores, np.ones(8, bool), ThresholdTarget("error_recall", 0.5))


@pytest.mark.parametrize(
    "target", [ThresholdTarget("flag_rate", 0.3), ThresholdTarget("error_recall", 0.6)]
)
def test_choose_threshold_counts_a_sample_as_its_copies_when_weights_are_whole_numbers(target):
    rng = np.random.default_rng(12)
    scores, correct = rng.normal(size=40), rng.random(40) < 0.6
    weights = rng.integers(1, 5, 40)
    copies = np.repeat(np.arange(40), weights)
    weighted = choose_threshold(scores, correct, target, weights.astype(float))
    assert weighted == choose_threshold(scores[copies], correct[copies], target)
    got = achieved(scores, correct, weighted, target.kind, weights.astype(float))
    assert got == pytest.approx(achieved(scores[copies], correct[copies], weighted, target.kind))


def test_probability_map_counts_a_sample_as_its_copies_when_weights_are_whole_numbers():
    rng = np.random.default_rng(13)
    signal, correct = rng.normal(size=200), rng.random(200) < 0.7
    weights = rng.integers(1, 4, 200)
    copies = np.repeat(np.arange(200), weights)
    a = fit_probability_map(signal, correct, min_block=20, weights=weights.astype(float))
    b = fit_probability_map(signal[copies], correct[copies], min_block=20)
    np.testing.assert_allclose(a.x, b.x)
    np.testing.assert_allclose(a.y, b.y)


@pytest.mark.parametrize("text", ["flag-rate", "recall=0.5", "flag-rate=1.5", "flag-rate=x"])
def test_threshold_target_refuses_text_when_malformed(text):
    with pytest.raises(InvalidInputError):
        ThresholdTarget.parse(text)


def test_tolerance_is_three_standard_errors_of_a_rate_difference_when_sizes_are_known():
    got = tolerance(ThresholdTarget("flag_rate", 0.1), 500, 1000)
    assert got == pytest.approx(3 * math.sqrt(0.09 * (1 / 500 + 1 / 1000)))


CONFIG = """name: "m"
parameters [
  { key: "scores", value: { string_value: "msp" } },  # keep me
  { key: "low_trust_threshold", value: { string_value: "3.0" } }
]
"""


def test_set_config_parameter_changes_only_the_value_when_the_key_exists():
    out = set_config_parameter(CONFIG, "low_trust_threshold", "2.75")
    assert out == CONFIG.replace('"3.0"', '"2.75"')


def test_read_config_parameters_reads_every_key_when_entries_span_lines(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(
        CONFIG + 'parameters {\n  key: "image_mean"\n  value: { string_value: "0.5" }\n}\n'
    )
    assert read_config_parameters(path) == {
        "scores": "msp",
        "low_trust_threshold": "3.0",
        "image_mean": "0.5",
    }


# ---- the folder input: real files through the entry's preprocessing ----------------------


def _write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, fmt: str) -> None:
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(img[0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.{fmt}", quality=90)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_folder_images_equal_what_the_server_decodes_when_files_are_real(tmp_path, digits, fmt):
    images, labels = digits[0][:40], digits[1][:40]
    _write_class_folders(tmp_path / "data", images, labels, fmt)
    spec = entry_spec(ENTRY, (1, 28, 28))
    got, got_labels, paths = read_image_folder(tmp_path / "data", [str(i) for i in range(10)], spec)
    served = decode_batch(np.array([[p.read_bytes()] for p in paths], dtype=object), spec)
    np.testing.assert_array_equal(EntryPreprocessing(spec)(got), served)
    order = [int(p.stem) for p in paths]
    np.testing.assert_array_equal(got_labels, labels[order])
    if fmt == "png":  # lossless: exactly the npz digits
        np.testing.assert_array_equal(EntryPreprocessing(spec)(got), images[order])


def test_folder_data_scores_like_the_npz_path_when_files_hold_the_same_digits(tmp_path, digits):
    images, labels = digits[0][:60], digits[1][:60]
    _write_class_folders(tmp_path / "data", images, labels, "png")
    data = folder_data(tmp_path / "data", ENTRY, (1, 28, 28), heldout_fraction=0.5, seed=0)
    assert data.to_input is not None
    assert 20 <= len(data.test_labels) <= 40
    assert len(data.test_labels) + len(data.calibration_labels) == 60
    classifier = OnnxClassifier(DEMO_ONNX)
    both = np.concatenate((data.test_images, data.calibration_images))
    from_folder = classifier.run(data.to_input(both), [LOGITS])[LOGITS]
    from_npz = classifier.run(images, [LOGITS])[LOGITS]  # the .npz path: input as it is

    def rows(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a.T[::-1])]

    np.testing.assert_array_equal(rows(from_folder), rows(from_npz))


def test_read_image_folder_names_unknown_and_missing_classes_when_folders_do_not_match(
    tmp_path, digits
):
    _write_class_folders(tmp_path / "data", digits[0][:20], digits[1][:20], "png")
    (tmp_path / "data" / "seven").mkdir()
    spec = entry_spec(ENTRY, (1, 28, 28))
    with pytest.raises(ConfigError, match=r"\['seven'\] are not classes.*\['extra'\] have no"):
        read_image_folder(tmp_path / "data", [*(str(i) for i in range(10)), "extra"], spec)


def test_read_image_folder_names_the_file_when_one_is_not_an_image(tmp_path, digits):
    _write_class_folders(tmp_path / "data", digits[0][:20], digits[1][:20], "png")
    bad = tmp_path / "data" / "3" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        read_image_folder(
            tmp_path / "data", [str(i) for i in range(10)], entry_spec(ENTRY, (1, 28, 28))
        )


# ---- the calibrate command on a copy of the demo entry ------------------------------------


def _repo_copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "gradtrust_mnist" / "1").mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt"):
        shutil.copy(ENTRY / name, repo / "gradtrust_mnist" / name)
    return repo


def _hard_npz(tmp_path: Path, digits) -> Path:
    """Real digits, the calibration half heavily corrupted (so there are errors to fit)."""
    images, labels = digits
    cal = np.concatenate([corrupt(images[:64], c, 5, s) for s, c in enumerate(
        ("gaussian_noise", "contrast", "defocus_blur", "elastic_transform"))])  # fmt: skip
    path = tmp_path / "hard.npz"
    np.savez(
        path,
        images=images[64:],
        labels=labels[64:],
        calibration_images=cal,
        calibration_labels=np.tile(labels[:64], 4),
    )
    return path


def _calibrate(repo: Path, data: Path, out: Path, *extra: str) -> int:
    return cli.main(
        [
            "calibrate", "--model-repository", str(repo), "--onnx", str(DEMO_ONNX),
            "--data", str(data), "--target", "flag-rate=0.1", "--shifted-per-class", "2",
            "--bootstrap", "40", "--out", str(out), *extra,
        ]
    )  # fmt: skip


def test_calibrate_writes_the_entry_and_a_report_when_the_signal_holds_up(tmp_path, digits, capsys):
    repo = _repo_copy(tmp_path)
    code = _calibrate(repo, _hard_npz(tmp_path, digits), tmp_path / "report")
    out = capsys.readouterr().out
    assert code == 0, out
    cal = load_model_calibration(repo / "gradtrust_mnist")
    assert cal is not None and cal.fitted_on["samples"] == 256
    for name in (MARKDOWN, RELIABILITY, RISK_COVERAGE):
        assert (tmp_path / "report" / name).stat().st_size > 500, name
    page = (tmp_path / "report" / MARKDOWN).read_text()
    assert "Accepted and written" in page and "**shifted** held-out" in page
    assert (ENTRY / "config.pbtxt").read_text() == (
        repo / "gradtrust_mnist" / "config.pbtxt"
    ).read_text()


def test_calibrate_refuses_and_writes_nothing_when_the_signal_ranks_worse_than_softmax(
    tmp_path, digits, capsys
):
    repo = _repo_copy(tmp_path)
    # ||h|| alone says little about whether this model is right: forced, it must be refused.
    code = _calibrate(
        repo, _hard_npz(tmp_path, digits), tmp_path / "report", "--signal", "feature_norm"
    )
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "ranks errors worse than softmax confidence" in captured.err
    assert not (repo / "gradtrust_mnist" / "trust_calibration.json").exists()
    assert "**Refused**" in (tmp_path / "report" / MARKDOWN).read_text()


def test_calibrate_fits_for_the_stated_clean_share_when_given_one(tmp_path, digits, capsys):
    repo = _repo_copy(tmp_path)
    data = _hard_npz(tmp_path, digits)
    code = _calibrate(repo, data, tmp_path / "r", "--mix", "corruptions", "--clean-share", "0.9")
    out = capsys.readouterr().out
    assert code == 0, out
    cal = load_model_calibration(repo / "gradtrust_mnist")
    assert cal is not None
    balance = MapBalance.from_selection(cal.selection)
    assert balance is not None and balance.stated and balance.clean_weight == 0.9
    assert "clean part weighs 90 %" in out and "the clean share you stated" in out
    assert "--clean-share 0.9" in (tmp_path / "r" / MARKDOWN).read_text()  # to reproduce it


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--clean-share", "0.9"), "needs --mix corruptions"),
        (("--mix", "corruptions", "--clean-share", "1.5"), "a share between 0 and 1"),
    ],
)
def test_calibrate_refuses_a_clean_share_when_it_cannot_apply(
    tmp_path, digits, capsys, extra, message
):
    repo = _repo_copy(tmp_path)
    with pytest.raises((SystemExit, ConfigError)) as info:
        code = _calibrate(repo, _hard_npz(tmp_path, digits), tmp_path / "r", *extra)
        raise SystemExit(code)
    captured = capsys.readouterr()
    assert message in captured.err + str(info.value)
    assert not (repo / "gradtrust_mnist" / "trust_calibration.json").exists()


def test_calibrate_exits_2_and_says_why_when_the_data_has_too_few_errors(tmp_path, digits, capsys):
    repo = _repo_copy(tmp_path)
    path = tmp_path / "easy.npz"
    images, labels = digits
    np.savez(path, images=images[:64], labels=labels[:64], calibration_images=images[64:],
             calibration_labels=labels[64:])  # fmt: skip
    assert _calibrate(repo, path, tmp_path / "report") == 2
    assert "wrong predictions" in capsys.readouterr().err
    assert not (repo / "gradtrust_mnist" / "trust_calibration.json").exists()


class _NoFeatures:
    """The demo classifier as a model without a 'features' output would present itself."""

    def __init__(self) -> None:
        self.real = OnnxClassifier(DEMO_ONNX)
        self.num_classes = self.real.num_classes
        self.input_shape = self.real.input_shape
        self.has_features = False
        self.has_activation = False


def test_service_refuses_a_calibration_when_its_signal_needs_features_the_model_lacks():
    from gradtrust.serving.service import TrustService
    from gradtrust.serving.settings import ModelSettings

    calibration = load_model_calibration(ENTRY)
    assert calibration is not None and calibration.needs_features
    settings = ModelSettings.from_parameters(
        {"pixel_range": "0,1", "scores": "msp"}, tuple(str(i) for i in range(10))
    )
    with pytest.raises(ConfigError, match="re-run `gradtrust calibrate`"):
        TrustService(_NoFeatures(), settings, calibration=calibration)  # type: ignore[arg-type]


def test_calibrate_fits_from_an_image_folder_when_given_one_with_corruptions_mixed_in(
    tmp_path, digits, capsys
):
    repo = _repo_copy(tmp_path)
    _write_class_folders(tmp_path / "images", digits[0], digits[1], "png")
    code = _calibrate(repo, tmp_path / "images", tmp_path / "report", "--mix", "corruptions")
    out = capsys.readouterr().out
    assert code == 0, out
    cal = load_model_calibration(repo / "gradtrust_mnist")
    assert cal is not None
    # The held-out ECE of both probabilities, per part, as the report states them.
    assert set(cal.heldout_ece) == {"clean", "shifted"}
    for ece in cal.heldout_ece.values():
        assert f"ECE TRUST_PROB {ece['trust_prob']:.4f} vs softmax {ece['confidence']:.4f}" in out
    balance = MapBalance.from_selection(cal.selection)
    assert balance is not None and f"clean part weighs {100 * balance.clean_weight:g} %" in out
    page = (tmp_path / "report" / MARKDOWN).read_text()
    assert f"The map weighs the clean part {100 * balance.clean_weight:g} %" in page
    assert page.count("|") > 4 * len(balance.excess)  # one table row per weight tried
    # 60 % of the 128 digits, each as it is and in 50 corrupted copies.
    assert cal.fitted_on["samples"] % 51 == 0 and 70 * 51 <= cal.fitted_on["samples"] <= 85 * 51
    assert "images" in cal.fitted_on["data"]
