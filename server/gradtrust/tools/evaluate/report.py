"""Tables (markdown, best in bold), the CSV of every row, and the generated part of
``docs/EVALUATION.md``."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.errors import ConfigError
from gradtrust.tools.evaluate.runner import (
    LOWER_IS_BETTER,
    MISPREDICTION_METRICS,
    OOD_METRICS,
    POOLED,
    Evaluation,
    select,
)

BEGIN = "<!-- BEGIN GENERATED: gradtrust evaluate (do not edit by hand) -->"
END = "<!-- END GENERATED -->"
CSV_FIELDS = ("setting", "shift", "severity", "method", "n", *MISPREDICTION_METRICS, *OOD_METRICS)
TITLES = {
    "accuracy": "accuracy",
    "auac": "AUAC",
    "aufc": "AUFC",
    "aurc": "AURC",
    "auroc": "AUROC",
    "fpr95": "FPR@95TPR",
    "ece": "ECE (smoothed isotonic)",
    "ece_raw": "ECE (raw)",
    "ood_auroc": "AUROC",
    "ood_fpr95": "FPR@95TPR",
}


def write_csv(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """One line per (setting, shift, severity, method); empty cells where a metric does not
    apply or is undefined."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in evaluation.rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def _round_trips(evaluation: Evaluation) -> str:
    lines = [
        "| fitted on (wrong / samples) | judged on (samples) | target | signal | threshold "
        "(TRUST_PROB) | achieved (fit) | achieved (held-out) | tolerance | met | "
        "ECE TRUST_PROB | ECE softmax |",
        "|---|---|---|---|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in evaluation.round_trips:
        head = (
            f"| {r['fit_on']} ({r['fit_wrong']} / {r['fit_samples']}) | {r['checked_on']} "
            f"({r['heldout_samples']}) | {r['target']} |"
        )
        if "refused" in r:
            why = str(r["refused"]).split(":", 1)[0]
            lines.append(f"{head} refused: {why} | | | | | | | |")
            continue
        lines.append(
            f"{head} {r['signal']} | {r['threshold']:.3f} | "
            f"{100 * r['achieved_fit']:.1f} % | {100 * r['achieved_heldout']:.1f} % | "
            f"+-{100 * r['tolerance']:.1f} % | {'yes' if r['target_met'] else '**no**'} | "
            f"{_bold_if(r['ece_trust_prob'], r['ece_softmax'])} | "
            f"{_bold_if(r['ece_softmax'], r['ece_trust_prob'])} |"
        )
    return "\n".join(lines)


def _bold_if(value: float, other: float) -> str:
    return f"**{value:.4f}**" if value < other else f"{value:.4f}"


def _mean(rows: Sequence[dict[str, Any]], metric: str) -> float:
    values = [r[metric] for r in rows if not math.isnan(r.get(metric, math.nan))]
    return float(np.mean(values)) if values else math.nan


def table(
    columns: Sequence[tuple[str, Callable[[str], float]]],
    methods: Sequence[str],
    lower_is_better: Sequence[bool],
    digits: int = 3,
) -> str:
    """A markdown table, methods x columns; the best value of each column in bold (ties too).

    ``columns`` are (header, method -> value); ``lower_is_better`` says per column which
    direction wins. Undefined values print as "n/a" and never win.
    """
    values = np.array([[fn(m) for _, fn in columns] for m in methods], dtype=np.float64)
    rounded = np.round(values, digits)
    lines = [
        "| method | " + " | ".join(h for h, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    best = []
    for j, low in enumerate(lower_is_better):
        col = rounded[:, j]
        finite = col[np.isfinite(col)]
        best.append(math.nan if finite.size == 0 else (finite.min() if low else finite.max()))
    for i, method in enumerate(methods):
        cells = []
        for j in range(len(columns)):
            v = rounded[i, j]
            text = "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"
            cells.append(f"**{text}**" if np.isfinite(v) and v == best[j] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_shift(evaluation: Evaluation, metric: str) -> str:
    """Methods x settings for one metric; corruptions averaged over their severities."""
    rows = evaluation.rows
    corruptions = list(dict.fromkeys(r["shift"] for r in select(rows, setting="corruption")))
    near = list(dict.fromkeys(r["shift"] for r in select(rows, setting="near_shift")))

    def column(**where: Any) -> Callable[[str], float]:
        return lambda m: _mean(select(rows, method=m, **where), metric)

    columns = [("clean", column(setting="clean"))]
    columns += [(name, column(setting="near_shift", shift=name)) for name in near]
    columns += [(name, column(setting="corruption", shift=name)) for name in corruptions]
    if corruptions:
        columns.append(("all corruptions", column(setting="corruption")))
        columns.append((POOLED, column(setting="pooled")))
    low = [metric in LOWER_IS_BETTER] * len(columns)
    return table(columns, evaluation.methods, low)


def _all_metrics(evaluation: Evaluation, **where: Any) -> str:
    metrics = [m for m in MISPREDICTION_METRICS if m not in ("accuracy", "ece_raw")]
    columns = [
        (TITLES[k], lambda m, k=k: _mean(select(evaluation.rows, method=m, **where), k))
        for k in metrics
    ]
    return table(columns, evaluation.methods, [k in LOWER_IS_BETTER for k in metrics])


def _ood(evaluation: Evaluation) -> str:
    sets = list(dict.fromkeys(r["shift"] for r in select(evaluation.rows, setting="ood")))

    def column(metric: str, **where: Any) -> Callable[[str], float]:
        return lambda m: _mean(select(evaluation.rows, setting="ood", method=m, **where), metric)

    columns = [
        (f"{name} {TITLES[metric]}", column(metric, shift=name))
        for name in sets
        for metric in OOD_METRICS
    ]
    if sets:
        columns.append(("mean AUROC", column("ood_auroc")))
    low = [k.endswith("FPR@95TPR") for k, _ in columns]
    return table(columns, evaluation.methods, low)


def _severity(evaluation: Evaluation, metric: str) -> str:
    severities = sorted({r["severity"] for r in select(evaluation.rows, setting="corruption")})
    columns = [
        (
            f"severity {s}",
            lambda m, s=s: _mean(
                select(evaluation.rows, setting="corruption", severity=s, method=m), metric
            ),
        )
        for s in severities
    ]
    return table(columns, evaluation.methods, [metric in LOWER_IS_BETTER] * len(columns))


def _accuracy_line(evaluation: Evaluation, **where: Any) -> str:
    rows = select(evaluation.rows, method=evaluation.methods[0], **where)
    return f"{_mean(rows, 'accuracy'):.3f}" if rows else "n/a"


def markdown(evaluation: Evaluation, image_dir: str = "img/evaluation") -> str:
    """The generated results section: tables, plots and what was not available."""
    ev = evaluation
    sev = sorted({r["severity"] for r in select(ev.rows, setting="corruption")})
    acc_by_sev = ", ".join(
        f"{s}: {_accuracy_line(ev, setting='corruption', severity=s)}" for s in sev
    )
    clean_rows = select(ev.rows, setting="clean", method=ev.methods[0])
    out = [
        BEGIN,
        "",
        "### Samples and accuracy",
        "",
        f"- clean test: {clean_rows[0]['n'] if clean_rows else 0} digits, "
        f"accuracy {_accuracy_line(ev, setting='clean')}; raw softmax ECE "
        f"{_mean(select(ev.rows, setting='clean', method='msp'), 'ece_raw'):.4f}",
    ]
    for name in dict.fromkeys(r["shift"] for r in select(ev.rows, setting="near_shift")):
        out.append(
            f"- near shift `{name}`: accuracy "
            f"{_accuracy_line(ev, setting='near_shift', shift=name)}"
        )
    if sev:
        n_sweep = select(ev.rows, setting="corruption")[0]["n"]
        out.append(
            f"- corruption sweeps: {n_sweep} test digits per (corruption, severity); mean "
            f"accuracy by severity {acc_by_sev}"
        )
    for name, source in ev.sources.items():
        out.append(f"- set `{name}`: {source}")
    for name, why in ev.unavailable.items():
        out.append(f"- **not available**: `{name}`: {why}")
    sections = [
        ("AUAC by setting (higher is better)", _by_shift(ev, "auac")),
        ("AUROC, correct vs wrong, by setting (higher is better)", _by_shift(ev, "auroc")),
        ("AUFC by setting (higher is better)", _by_shift(ev, "aufc")),
        ("All misprediction metrics, clean test", _all_metrics(ev, setting="clean")),
        (
            "All misprediction metrics, mean over every corruption and severity",
            _all_metrics(ev, setting="corruption"),
        ),
        (
            "All misprediction metrics, every corruption and severity pooled into one stream",
            _all_metrics(ev, setting="pooled"),
        ),
        ("AUROC by severity (mean over corruptions)", _severity(ev, "auroc")),
        ("Out-of-distribution detection: clean test (in) vs each set (out)", _ood(ev)),
    ]
    if ev.round_trips:
        sections.append(
            (
                "Calibration round trip (calibrate's fit: chosen signal -> TRUST_PROB, "
                "low-trust threshold on it)",
                _round_trips(ev),
            )
        )
    for title, body in sections:
        out += ["", f"### {title}", "", body]
    out += [
        "",
        "### Plots",
        "",
        f"![accuracy vs retained fraction]({image_dir}/retained_accuracy.png)",
        "",
        f"![GradTrust vs softmax confidence]({image_dir}/gradtrust_vs_confidence.png)",
        "",
        f"![severity curves]({image_dir}/severity_curves.png)",
        "",
        END,
    ]
    return "\n".join(out) + "\n"


def update_document(path: str | os.PathLike[str], generated: str) -> None:
    """Replace the generated section of ``path`` (between the markers), keep the prose."""
    doc = Path(path)
    text = doc.read_text(encoding="utf-8") if doc.is_file() else f"{BEGIN}\n{END}\n"
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ConfigError(
            f"{doc} has no generated section; add the two lines\n{BEGIN}\n{END}\n"
            "where the results should go"
        )
    doc.write_text(text[:start] + generated + text[end + len(END) + 1 :], encoding="utf-8")
