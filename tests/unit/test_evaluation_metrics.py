"""The evaluation metrics on hand-computed cases, and against brute-force references.

Throughout, "perfect ranking" means every correct prediction outscores every wrong one.
With N = 4 samples and the default grid of 100 retained fractions, the kept counts are
k = 1, 2, 3, 4 for 25 grid points each, so AUAC is the plain mean of the four accuracies.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtrust.errors import InvalidInputError
from gradtrust.tools.evaluate import metrics as M

# Two classes; samples 0 and 1 are right, 2 and 3 wrong.
LABELS = np.array([0, 1, 0, 1])
PREDS = np.array([0, 1, 1, 0])
CORRECT = LABELS == PREDS


def all_metrics(scores: list[float], labels=LABELS, preds=PREDS) -> dict[str, float]:
    return M.misprediction_metrics(np.array(scores, float), labels, preds)


def test_metrics_are_best_when_ranking_is_perfect():
    got = all_metrics([4.0, 3.0, 2.0, 1.0])
    assert got["auroc"] == 1.0
    assert got["fpr95"] == 0.0
    # Risk at k = 1..4: 0, 0, 1/3, 1/2.
    assert got["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4, abs=1e-12)
    # Accuracy at k = 1..4: 1, 1, 2/3, 1/2.
    assert got["auac"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4, abs=1e-12)
    # Macro-F1 at k = 1..4: 1 (only class 0 present), 1, then both classes 2/3, both 1/2.
    assert got["aufc"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4, abs=1e-12)


def test_metrics_are_worst_when_ranking_is_reversed():
    got = all_metrics([1.0, 2.0, 3.0, 4.0])
    assert got["auroc"] == 0.0
    assert got["fpr95"] == 1.0
    assert got["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4, abs=1e-12)
    assert got["auac"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4, abs=1e-12)
    # Kept order 3, 2, 1, 0: F1 per class 0, 0, (0 and 1/2), (1/2 and 1/2).
    assert got["aufc"] == pytest.approx((0 + 0 + 1 / 4 + 1 / 2) / 4, abs=1e-12)


def test_metrics_are_chance_level_when_every_score_ties():
    got = all_metrics([7.0, 7.0, 7.0, 7.0])
    assert got["auroc"] == 0.5
    assert got["fpr95"] == 1.0  # a tied group is accepted as a whole
    assert got["aurc"] == pytest.approx(0.5, abs=1e-12)
    assert got["auac"] == pytest.approx(0.5, abs=1e-12)
    # Each sample kept with weight k/4: per class TP = FP = FN = k/4, F1 = 1/2.
    assert got["aufc"] == pytest.approx(0.5, abs=1e-12)


def test_metrics_split_a_straddling_tie_when_one_group_is_tied():
    # Scores 3, 2, 2, 1: the tie holds one correct and one wrong sample.
    got = all_metrics([3.0, 2.0, 2.0, 1.0])
    # Pairs (correct, wrong): (3,2) 1, (3,1) 1, (2,2) 1/2, (2,1) 1.
    assert got["auroc"] == pytest.approx(3.5 / 4)
    np.testing.assert_allclose(M.expected_kept_correct([3, 2, 2, 1], CORRECT), [0, 1, 1.5, 2, 2])
    assert got["aurc"] == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4, abs=1e-12)
    assert got["auac"] == pytest.approx((1 + 0.75 + 2 / 3 + 0.5) / 4, abs=1e-12)
    # TPR 95 % of 2 positives needs both, so the threshold is 2 and the tied wrong one passes.
    assert got["fpr95"] == 0.5


def test_metrics_take_defined_values_when_every_prediction_is_correct():
    labels = np.array([0, 1, 2, 1])
    got = all_metrics([0.3, 0.1, 0.9, 0.5], labels, labels)
    assert math.isnan(got["auroc"]) and math.isnan(got["fpr95"])
    assert (got["aurc"], got["auac"], got["aufc"]) == (0.0, 1.0, 1.0)


def test_metrics_take_defined_values_when_every_prediction_is_wrong():
    labels = np.array([0, 1, 2, 1])
    got = all_metrics([0.3, 0.1, 0.9, 0.5], labels, (labels + 1) % 3)
    assert math.isnan(got["auroc"]) and math.isnan(got["fpr95"])
    assert (got["aurc"], got["auac"], got["aufc"]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(("pred", "expected"), [(3, (0.0, 1.0, 1.0)), (2, (1.0, 0.0, 0.0))])
def test_metrics_take_defined_values_when_there_is_a_single_sample(pred, expected):
    got = all_metrics([0.42], np.array([3]), np.array([pred]))
    assert (got["aurc"], got["auac"], got["aufc"]) == expected
    assert math.isnan(got["auroc"]) and math.isnan(got["fpr95"])


def test_accuracy_curve_keeps_ceil_of_fraction_when_grid_is_given():
    scores = np.arange(10.0)[::-1]  # sample 0 most trusted
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)
    curve = M.accuracy_curve(scores, correct, [0.1, 0.29, 0.3, 0.31, 1.0])
    # k = 1, 3, 3, 4, 10: the float 0.29 * 10 = 2.9 rounds up to 3, not to 2.
    np.testing.assert_allclose(curve, [1.0, 1.0, 1.0, 0.75, 0.8])
    assert M.kept_counts(100, [0.29])[0] == 29


def test_fpr_at_tpr_uses_the_highest_threshold_reaching_the_rate_when_positives_are_many():
    # 20 positives at 1..20, negatives at 1.5 and 18.5; 95 % of 20 = 19 positives, so the
    # threshold is the 19th highest positive (2): only the negative at 18.5 passes it.
    pos = np.arange(1.0, 21.0)
    scores = np.concatenate((pos, [1.5, 18.5]))
    flags = np.concatenate((np.ones(20, bool), np.zeros(2, bool)))
    assert M.fpr_at_tpr(scores, flags) == 0.5
    assert M.fpr_at_tpr(scores, flags, tpr=1.0) == 1.0


def test_ece_sums_weighted_bin_gaps_when_bins_differ():
    # 0.95 twice (half right): |0.5 - 0.95| * 2/4; 0.55 right: 0.45/4; 0.15 wrong: 0.15/4.
    got = M.ece([0.95, 0.95, 0.55, 0.15], [1, 0, 1, 0])
    assert got == pytest.approx(0.45 * 0.5 + 0.45 / 4 + 0.15 / 4)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    assert M.ece([1.0, 1.0, 0.5, 0.5], [1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-15)


def test_ece_equals_the_confidence_gap_when_all_correct_or_all_wrong():
    assert M.ece([0.9] * 4, [1] * 4) == pytest.approx(0.1)
    assert M.ece([0.9] * 4, [0] * 4) == pytest.approx(0.9)
    assert M.ece([0.7], [1]) == pytest.approx(0.3)


def test_ece_puts_a_value_on_a_bin_edge_into_the_lower_bin_when_bins_are_right_closed():
    # 1/15 and 0.0 share the first bin (0, 1/15]: mean confidence 1/30, accuracy 1/2.
    assert M.ece([1 / 15, 0.0], [1, 0]) == pytest.approx(0.5 - 1 / 30)


def test_ece_refuses_values_when_they_are_not_probabilities():
    with pytest.raises(InvalidInputError, match="probabilities in"):
        M.ece([1.5, 0.2], [1, 0])


def test_ood_metrics_are_perfect_when_in_distribution_scores_are_all_higher():
    assert M.ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0]) == {"ood_auroc": 1.0, "ood_fpr95": 0.0}
    assert M.ood_metrics([1.0, 2.0], [5.0, 6.0]) == {"ood_auroc": 0.0, "ood_fpr95": 1.0}


@pytest.mark.parametrize(
    ("scores", "flags", "message"),
    [
        ([1.0, 2.0], [1], "2 samples but"),
        ([], [], "no samples"),
        ([1.0, math.nan], [1, 0], "NaN or infinite"),
        ([1.0, 2.0], [1, 2], "booleans"),
        ([[1.0, 2.0]], [[1, 0]], "1-D"),
    ],
)
def test_metrics_refuse_input_when_it_is_malformed(scores, flags, message):
    with pytest.raises(InvalidInputError, match=message):
        M.auroc(scores, flags)


def test_metrics_leave_inputs_untouched_when_computing():
    scores = np.array([3.0, 1.0, 2.0, 2.0])
    before = scores.copy()
    all_metrics(list(scores))
    M.aurc(scores, CORRECT)
    np.testing.assert_array_equal(scores, before)


def _brute_force_expected_kept(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Average, over every order consistent with the scores, of the cumulative correct counts."""
    totals = np.zeros(scores.size + 1)
    orders = [
        p
        for p in itertools.permutations(range(scores.size))
        if all(scores[p[i]] >= scores[p[i + 1]] for i in range(scores.size - 1))
    ]
    for order in orders:
        totals += np.concatenate(([0], np.cumsum(correct[list(order)])))
    return totals / len(orders)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=6))
def test_expected_kept_correct_equals_average_over_tie_orders_when_scores_tie(pairs):
    scores = np.array([float(s) for s, _ in pairs])
    correct = np.array([c for _, c in pairs])
    np.testing.assert_allclose(
        M.expected_kept_correct(scores, correct), _brute_force_expected_kept(scores, correct)
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=30))
def test_auroc_equals_pairwise_count_when_compared_with_brute_force(pairs):
    scores = np.array([float(s) for s, _ in pairs])
    pos = np.array([c for _, c in pairs])
    if pos.all() or not pos.any():
        assert math.isnan(M.auroc(scores, pos))
        return
    diff = scores[pos][:, None] - scores[~pos][None, :]
    expected = (np.count_nonzero(diff > 0) + 0.5 * np.count_nonzero(diff == 0)) / diff.size
    assert M.auroc(scores, pos) == pytest.approx(expected, abs=1e-12)


def test_ranking_metrics_ignore_the_scale_when_scores_are_transformed_monotonically():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=200)
    labels = rng.integers(0, 3, 200)
    preds = np.where(rng.random(200) < 0.7, labels, (labels + 1) % 3)
    a = M.misprediction_metrics(scores, labels, preds)
    b = M.misprediction_metrics(np.exp(3 * scores) + 10, labels, preds)
    assert a == pytest.approx(b, abs=1e-12)
