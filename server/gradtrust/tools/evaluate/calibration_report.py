"""The report ``gradtrust calibrate`` writes beside a calibration: a short markdown page, a
reliability diagram and a risk-coverage plot of every held-out part.

The page says which signal was chosen and why, whether calibration was accepted, and
every candidate's AUROC, AURC and ECE with bootstrap intervals on clean and shifted
held-out data, so a reader can see how far the served TRUST_PROB is from softmax
confidence and from the other candidates, noise included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.core.calibration import TrustCalibration
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.assessment import RAW_CONFIDENCE, Assessment, Interval
from gradtrust.tools.evaluate.calibration import MapBalance
from gradtrust.tools.evaluate.signals import CONFIDENCE, Selection

MARKDOWN = "calibration_report.md"
RELIABILITY = "calibration_reliability.png"
RISK_COVERAGE = "calibration_risk_coverage.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(assessment: Assessment, chosen: str) -> list[str]:
    lines = [
        f"**{assessment.part}** held-out data: {assessment.samples} samples, "
        f"{assessment.wrong} wrong (accuracy {100 * assessment.accuracy:.1f} %).",
        "",
        "| candidate | AUROC right vs wrong | AUROC minus softmax | AURC (lower = better) "
        "| ECE (lower = better) |",
        "|---|---|---|---|---|",
    ]
    order = sorted(
        (n for n in assessment.rows if n != RAW_CONFIDENCE),
        key=lambda n: (
            -(
                assessment.rows[n]["auroc"].value
                if math.isfinite(assessment.rows[n]["auroc"].value)
                else -1
            )
        ),
    )
    for name in [RAW_CONFIDENCE, *order]:
        row = assessment.rows[name]
        gain = assessment.auroc_gain.get(name)
        label = f"**{name} (served TRUST_PROB)**" if name == chosen else name
        if name == CONFIDENCE:
            label += " (isotonic map of softmax)"
        lines.append(
            f"| {label} | {row['auroc']} | {_signed(gain) if gain else '–'} | "
            f"{row['aurc']} | {row['ece']} |"
        )
    return lines


def _signed(interval: Interval) -> str:
    if not math.isfinite(interval.value):
        return "n/a"
    return f"{interval.value:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def markdown(
    entry: str,
    calibration: TrustCalibration,
    selection: Selection,
    assessments: Sequence[Assessment],
    problems: Sequence[str],
    command: str,
    written: bool,
    warnings: Sequence[str] = (),
) -> str:
    """The report page (GitHub markdown)."""
    signal = calibration.signal
    status = (
        "**Refused**: nothing was written to the entry.\n\n" + "\n".join(f"- {p}" for p in problems)
        if problems
        else (
            "Accepted and written to the entry." if written else "Accepted (dry run: not written)."
        )
    )
    picked = (
        "forced with --signal"
        if selection.forced
        else "highest mean out-of-fold AUROC over clean and shifted calibration data among "
        "candidates not significantly worse than softmax confidence on either"
    )
    lines = [
        f"# Trust calibration of `{entry}`",
        "",
        f"Command: `{command}`",
        "",
        status,
        "",
        *[f"**Warning**: {w}.\n" for w in warnings],
        f"- Served `TRUST_PROB` = map(signal); signal: **{signal.name}** ({picked}), "
        + (
            f"an L2 logistic combination (penalty {signal.l2:g}) of {', '.join(signal.inputs)}"
            if signal.kind == "combination"
            else "one input as it is"
        ),
        f"- Fitted on {calibration.fitted_on.get('samples')} samples "
        f"({calibration.fitted_on.get('wrong')} wrong): {calibration.fitted_on.get('data', '')}",
        f"- Signal chosen by {selection.folds}-fold cross-validation over the calibration "
        "data (folds by source image); the chosen candidate then refitted on all of it. "
        "Candidates: every input, softmax confidence paired with each other input "
        "(`msp+NAME`), and the combination of all inputs.",
        "- Out-of-fold AUROC minus softmax confidence's, by part: "
        + (
            ", ".join(
                f"{part} {gain:+.3f} (SE {selection.gain_se[signal.name].get(part, math.nan):.3f})"
                for part, gain in selection.gain.get(signal.name, {}).items()
            )
            or "(softmax confidence itself)"
        ),
        f"- Low-trust threshold on TRUST_PROB: {calibration.low_trust_threshold:.4f} "
        f"({calibration.target}; {100 * calibration.achieved_on_calibration:.1f} % on the "
        "calibration data).",
        "- TRUST_PROB: centred isotonic map with a minimum block size and Laplace-smoothed "
        "levels, so it is never exactly 0 or 1.",
        *_balance_lines(calibration),
        "",
        "Intervals are 2.5-97.5 % bootstrap percentiles, resampling whole source images (a "
        "corrupted copy is drawn with its image); ECE percentiles can sit above the point "
        "value because resampling adds binning noise. 'AUROC minus softmax' is paired.",
        "",
    ]
    for a in assessments:
        lines += [*_table(a, signal.name if signal.kind == "input" else "combination"), ""]
    lines += [
        f"![reliability]({RELIABILITY})",
        "",
        f"![risk-coverage]({RISK_COVERAGE})",
        "",
    ]
    return "\n".join(lines)


def _balance_lines(calibration: TrustCalibration) -> list[str]:
    """How much the clean part weighed in the map, and the out-of-fold ECE excesses behind
    the choice (nothing for a calibration without shifted data)."""
    balance = MapBalance.from_selection(calibration.selection)
    if balance is None:
        return []
    weight = balance.clean_weight
    lines = [
        f"- The map weighs the clean part {100 * weight:g} % and the shifted part "
        f"{100 * (1 - weight):g} % ({calibration.selection['map_balance']['rule']}). Out of "
        "fold, TRUST_PROB's ECE minus softmax confidence's at that weight: "
        + ", ".join(f"{part} {value:+.4f}" for part, value in balance.chosen_excess.items())
        + (
            "."
            if balance.no_worse or balance.stated
            else ". **No weight kept TRUST_PROB as calibrated as softmax confidence on both "
            "parts**: on this model one monotone map of the signal cannot serve clean and "
            "shifted traffic; calibrate on data that looks like your traffic, or state its "
            "clean share with `--clean-share`."
        ),
        "",
        "| clean weight | "
        + " | ".join(f"ECE minus softmax, {p}" for p in balance.chosen_excess)
        + " |",
        "|---:|" + "---:|" * len(balance.chosen_excess),
    ]
    lines += [
        f"| {w:g} | " + " | ".join(f"{v:+.4f}" for v in parts.values()) + " |"
        for w, parts in balance.excess.items()
    ]
    return lines


def reliability_diagram(
    assessments: Sequence[Assessment], chosen: str, path: str | os.PathLike[str]
) -> None:
    """Accuracy per probability bin against the bin's mean probability: TRUST_PROB and raw
    softmax confidence, one panel per held-out part."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(assessments), figsize=(5 * len(assessments), 4.6), squeeze=False
    )
    edges = np.linspace(0.0, 1.0, M.ECE_BINS + 1)
    for ax, a in zip(axes[0], assessments, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
        for name, label, color in (
            (chosen, "TRUST_PROB", "C3"),
            (RAW_CONFIDENCE, "softmax confidence", "k"),
        ):
            p = a.probabilities[name]
            idx = np.searchsorted(edges[1:-1], p, side="left")
            counts = np.bincount(idx, minlength=M.ECE_BINS)
            mean_p = np.bincount(idx, weights=p, minlength=M.ECE_BINS)
            hits = np.bincount(idx, weights=a.correct.astype(float), minlength=M.ECE_BINS)
            used = counts > 0
            ece = M.ece(p, a.correct)
            ax.plot(
                mean_p[used] / counts[used],
                hits[used] / counts[used],
                "o-",
                color=color,
                label=f"{label} (ECE {ece:.3f})",
            )
        ax.set(
            title=f"{a.part} held-out ({a.samples} samples)",
            xlabel="predicted probability of being right",
            ylabel="observed accuracy",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def risk_coverage(
    assessments: Sequence[Assessment], chosen: str, path: str | os.PathLike[str]
) -> None:
    """Error rate of the most trusted share of predictions against that share: the chosen
    signal, softmax confidence and the best other candidates."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(assessments), figsize=(5 * len(assessments), 4.6), squeeze=False
    )
    for ax, a in zip(axes[0], assessments, strict=True):
        others = sorted(
            (n for n in a.rows if n not in (chosen, RAW_CONFIDENCE)),
            key=lambda n: a.rows[n]["aurc"].value,
        )[:3]
        for i, name in enumerate([chosen, RAW_CONFIDENCE, *others]):
            tp = M.expected_kept_correct(a.signals[name], a.correct)
            k = np.arange(1, tp.size)
            risk = 1.0 - tp[1:] / k
            style = (
                {"color": "C3", "lw": 2.4}
                if name == chosen
                else (
                    {"color": "k", "lw": 1.8}
                    if name == RAW_CONFIDENCE
                    else {"color": ("C0", "C1", "C2", "C4")[i % 4], "lw": 1.0}
                )
            )
            label = "softmax confidence" if name == RAW_CONFIDENCE else name
            if name == chosen:
                label = f"{name} (TRUST_PROB)"
            ax.plot(
                k / k[-1], risk, label=f"{label}, AURC {a.rows[name]['aurc'].value:.4f}", **style
            )
        ax.set(
            title=f"{a.part} held-out",
            xlabel="coverage (share of predictions kept, most trusted first)",
            ylabel="risk (error rate of the kept predictions)",
            xlim=(0, 1),
        )
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    folder: str | os.PathLike[str],
    entry: str,
    calibration: TrustCalibration,
    selection: Selection,
    assessments: Sequence[Assessment],
    problems: Sequence[str],
    command: str,
    written: bool,
    warnings: Sequence[str] = (),
) -> list[Path]:
    """Write the markdown page and both figures into ``folder``; returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    chosen = calibration.signal.name
    paths = [out / MARKDOWN, out / RELIABILITY, out / RISK_COVERAGE]
    paths[0].write_text(
        markdown(entry, calibration, selection, assessments, problems, command, written, warnings),
        encoding="utf-8",
    )
    reliability_diagram(assessments, chosen, paths[1])
    risk_coverage(assessments, chosen, paths[2])
    return paths
