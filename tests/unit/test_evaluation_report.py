"""Report pieces (tables, CSV, the generated document section) and the evaluate command."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from gradtrust.core.scores import SCORE_NAMES, compute_scores
from gradtrust.errors import ConfigError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.tools.demo.cnn import DemoCNN
from gradtrust.tools.evaluate import cli, report
from gradtrust.tools.evaluate.roundtrip import TARGETS, evaluate_round_trips, heldout_set
from gradtrust.tools.evaluate.runner import (
    POOLED,
    Plan,
    demo_data,
    run_evaluation,
    stratified_subset,
)
from gradtrust.tools.evaluate.scoring import InProcessScorer
from tests.conftest import DEMO_ONNX


def test_table_bolds_the_best_of_each_column_when_directions_differ():
    values = {"a": (0.9, 0.30), "b": (0.8, 0.10), "c": (0.9, math.nan)}
    text = report.table(
        [("hi", lambda m: values[m][0]), ("lo", lambda m: values[m][1])],
        ["a", "b", "c"],
        [False, True],
    )
    lines = text.splitlines()
    assert lines[0] == "| method | hi | lo |"
    assert lines[2] == "| a | **0.900** | 0.300 |"
    assert lines[3] == "| b | 0.800 | **0.100** |"
    assert lines[4] == "| c | **0.900** | n/a |"  # ties share the bold; n/a never wins


def test_update_document_replaces_only_the_generated_section_when_markers_exist(tmp_path):
    doc = tmp_path / "E.md"
    doc.write_text(f"# Title\nprose\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    report.update_document(doc, f"{report.BEGIN}\nnew\n{report.END}\n")
    assert doc.read_text() == f"# Title\nprose\n{report.BEGIN}\nnew\n{report.END}\nafter\n"
    doc.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no generated section"):
        report.update_document(doc, "x")


def test_stratified_subset_takes_equal_shares_when_classes_are_balanced():
    labels = np.repeat(np.arange(10), 100)
    picked = stratified_subset(labels, 7, seed=0)
    assert np.bincount(labels[picked]).tolist() == [7] * 10
    np.testing.assert_array_equal(picked, stratified_subset(labels, 7, seed=0))


def test_in_process_scorer_serves_the_same_scores_as_the_server_core_when_scoring(digits):
    images, labels = digits
    scorer = InProcessScorer(DEMO_ONNX, batch_size=50)
    scored = scorer.score(images[:120])
    out = OnnxClassifier(DEMO_ONNX).run(images[:120], ["logits", "features"])
    expected = compute_scores(out["logits"], SCORE_NAMES, out["features"])
    assert list(scored.scores) == list(SCORE_NAMES)
    for name in SCORE_NAMES:
        np.testing.assert_allclose(scored.scores[name], expected[name], rtol=1e-6)
    np.testing.assert_array_equal(scored.pred, out["logits"].argmax(1))
    assert "odin" in scorer.unavailable


def test_in_process_scorer_refuses_a_torch_twin_when_its_weights_differ(digits):
    scorer = InProcessScorer(DEMO_ONNX, DemoCNN())
    with pytest.raises(ConfigError, match="disagree"):
        scorer.check_twin(digits[0][:8])


def test_run_evaluation_produces_a_row_per_setting_and_method_when_plan_is_small():
    data = demo_data()
    scorer = InProcessScorer(DEMO_ONNX)
    plan = Plan(sweep_per_class=3, corruptions=("contrast",), severities=(1, 5), ood_sets=())
    ev = run_evaluation(scorer, data, plan)
    methods = len(scorer.methods)
    assert len(ev.rows) == methods * (1 + 2 + 1)  # clean, two severities, pooled; no OOD
    pooled = [r for r in ev.rows if r["setting"] == "pooled"]
    assert {r["n"] for r in pooled} == {60} and {r["shift"] for r in pooled} == {POOLED}
    contrast = [r for r in ev.rows if r["setting"] == "corruption"]
    assert {r["n"] for r in contrast} == {30} and {r["severity"] for r in contrast} == {1, 5}
    msp = [r for r in ev.rows if r["setting"] == "clean" and r["method"] == "msp"][0]
    assert msp["accuracy"] > 0.95 and 0 <= msp["ece_raw"] < 0.1 and 0 <= msp["ece"] < 0.1


def test_round_trips_report_every_target_when_the_plan_has_corruptions():
    data = demo_data()
    scorer = InProcessScorer(DEMO_ONNX)
    plan = Plan(sweep_per_class=20, corruptions=("brightness",), severities=(3, 4), ood_sets=())
    ev = run_evaluation(scorer, data, plan)
    rows = evaluate_round_trips(scorer, data, ev, plan)
    assert [r["target"] for r in rows] == [str(t) for t in TARGETS] * 2
    assert rows[0]["fit_samples"] == 500 and rows[0]["heldout_samples"] == 1000
    assert rows[2]["fit_samples"] == 1000 and rows[2]["heldout_samples"] == 400
    shifted = rows[2:]
    assert all(r["ece_trust_prob"] < r["ece_softmax"] for r in shifted)
    ev.round_trips = rows
    assert "### Calibration round trip" in report.markdown(ev)


def test_heldout_set_is_the_demo_test_split_when_mix_is_clean():
    images, labels = heldout_set("clean")
    data = demo_data()
    np.testing.assert_array_equal(images, data.test_images)
    np.testing.assert_array_equal(labels, data.test_labels)


def test_evaluate_command_writes_csv_plots_and_document_when_run(tmp_path, capsys):
    doc = tmp_path / "EVALUATION.md"
    doc.write_text(f"# Results\n{report.BEGIN}\n{report.END}\n")
    out = tmp_path / "img"
    code = cli.main(
        [
            "evaluate",
            "--onnx",
            str(DEMO_ONNX),
            "--no-torch",
            "--sweep-per-class",
            "3",
            "--corruptions",
            "gaussian_noise,brightness",
            "--severities",
            "1,5",
            "--sets",
            "fashion_mnist,letters",
            "--out",
            str(out),
            "--docs",
            str(doc),
            "--no-round-trip",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = len(SCORE_NAMES)
    assert len(rows) == methods * (1 + 4 + 1 + 2)  # clean, 2 x 2 sweeps, pooled, 2 OOD sets
    assert {r["setting"] for r in rows} == {"clean", "corruption", "pooled", "ood"}
    for name in ("retained_accuracy", "gradtrust_vs_confidence", "severity_curves"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    text = doc.read_text()
    assert text.startswith("# Results\n") and "### AUAC by setting" in text
    assert "](img/retained_accuracy.png)" in text
    assert "**not available**: `odin`" in text


def test_evaluate_command_refuses_a_name_when_it_is_unknown(capsys):
    assert cli.main(["evaluate", "--corruptions", "fog", "--no-torch"]) == 2
    assert "unknown corruption ['fog']" in capsys.readouterr().err
