"""Model settings and per-request options: what is accepted, and what each error says."""

from __future__ import annotations

import pytest

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.settings import (
    DEFAULT_SCORES,
    ModelSettings,
    class_index,
    parse_request,
    parse_score_names,
)

LABELS = [str(i) for i in range(10)]


def settings(**params: str) -> ModelSettings:
    return ModelSettings.from_parameters(params, LABELS)


def test_settings_use_documented_defaults_when_config_sets_nothing():
    s = settings()
    assert s.scores == DEFAULT_SCORES
    assert "gradtrust" not in s.scores  # it has its own output
    assert s.contrast_k == 3
    assert s.pixel_min is None and s.pixel_max is None


def test_settings_read_every_parameter_when_config_sets_them():
    s = settings(
        scores="msp, margin",
        contrast_k="2",
        low_trust_threshold="2.5",
        pixel_range="0,1",
    )
    assert s.scores == ("msp", "margin")
    assert (s.contrast_k, s.low_trust_threshold, s.pixel_min, s.pixel_max) == (2, 2.5, 0.0, 1.0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"scores": "msp,nonsense"}, "unknown score name(s) ['nonsense']"),
        ({"contrast_k": "zero"}, "contrast_k"),
        ({"pixel_range": "1,0"}, "min < max"),
        ({"low_trust_threshhold": "2"}, "unknown config parameter(s) ['low_trust_threshhold']"),
        ({"metrics_flush_seconds": "1"}, "unknown config parameter(s) ['metrics_flush_seconds']"),
    ],
)
def test_settings_raise_config_error_naming_the_key_when_a_parameter_is_bad(params, message):
    with pytest.raises(ConfigError) as info:
        ModelSettings.from_parameters(params, LABELS)
    assert message in str(info.value)


def test_settings_raise_when_labels_list_fewer_than_two_classes():
    with pytest.raises(ConfigError, match="at least two classes"):
        ModelSettings.from_parameters({}, ["only"])


def test_request_asks_for_nothing_expensive_when_it_names_no_parameters():
    opts = parse_request("", settings(), want_scores=False, want_heatmap=False)
    assert opts.scores is None and opts.heatmap_method is None and opts.contrast_class is None


def test_request_gets_model_default_scores_when_it_asks_for_scores_without_names():
    opts = parse_request("{}", settings(scores="energy,msp"), want_scores=True, want_heatmap=False)
    assert opts.scores == ("energy", "msp")


def test_request_overrides_scores_and_k_when_parameters_name_them():
    opts = parse_request(
        '{"scores": "margin,contrast_trust", "contrast_k": 5}', settings(), True, False
    )
    assert opts.scores == ("margin", "contrast_trust") and opts.contrast_k == 5


def test_request_defaults_to_gradcam_when_heatmap_is_requested_without_method():
    assert parse_request({}, settings(), False, True).heatmap_method == "gradcam"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('{"scores": "msp,msp"}', "repeat"),
        ('{"scores": ""}', "names no score"),
        ('{"contrast_k": -1}', "'contrast_k' must be an integer >= 1, got -1"),
        ('{"heatmap_method": "lime"}', "unknown heatmap_method 'lime'"),
        ('{"contrast_class": 10}', "out of range: the model has classes 0..9"),
        ('{"contrast_class": "cat"}', "neither a class index"),
        ('{"temperature": 2}', "unknown request parameter(s) ['temperature']"),
        ("{not json", "not valid JSON"),
    ],
)
def test_request_raises_invalid_input_naming_the_problem_when_a_parameter_is_bad(params, message):
    with pytest.raises(InvalidInputError) as info:
        parse_request(params, settings(), want_scores=True, want_heatmap=True)
    assert message in str(info.value)


def test_class_index_accepts_label_or_index_when_both_name_the_same_class():
    labels = ["cat", "dog", "bird"]
    assert class_index("dog", labels) == 1
    assert class_index(2, labels) == 2
    assert class_index("0", labels) == 0


def test_score_names_are_parsed_in_given_order_when_spaces_surround_them():
    assert parse_score_names(" energy ,msp", "x") == ("energy", "msp")
