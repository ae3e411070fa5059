"""How the project's outputs read for people, each written once: the names of the scores, a score with its
interval (long and short), a shift report in words. Reports, tables, MLflow descriptions and log lines all say
it through here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class ScoreName(NamedTuple):
    short: str  # a column of a terminal's table whose columns are all test scores: "sens"
    long: str  # a column beside validation's, or a line of the seed spread: "test AUROC"
    word: str  # in sentences and DVC's plots: "sensitivity"
    # Its name in comparison/scores.json, the only DVC metrics file: `dvc exp show` names its columns
    # test_auroc.<variant>, val_auroc.<variant>...: short, unique, each saying its split (the comparison run's
    # MLflow metrics too). None: not in that file.
    dvc: str | None = None


# Leaderboard keys (a test score, or val_<score>) -> their names, in the order comparison/scores.json lists them:
# the one place a score is named, so that every table, sentence and metric name says the same.
SCORE_NAMES = {
    "auroc": ScoreName("AUROC", "test AUROC", "AUROC", "test_auroc"),
    "val_auroc": ScoreName("val AUROC", "val AUROC", "validation AUROC", "val_auroc"),
    "accuracy": ScoreName("acc", "test acc", "accuracy", "test_acc"),
    "recall": ScoreName("sens", "sens", "sensitivity", "test_sens"),
    "specificity": ScoreName("spec", "spec", "specificity", "test_spec"),
    "f1": ScoreName("F1", "test F1", "F1"),
}
# The test scores that tables and one-line summaries show, in their order.
SHOWN = ("accuracy", "recall", "specificity", "auroc")


def score_text(x: float | int | str | None, ci: Sequence[float] | None = None, short: bool = False) -> str:
    """A score with its 95% interval where it has one, as every report, table and log line writes it: 0.9167
    [0.894–0.938] (4 digits, which tell apart variants that 3 would tie; the interval's 4th digit would be noise
    beside its width), or `short`, for a terminal's columns, 0.917 [.894–.938] (leading zeros dropped to fit).
    Missing: n/a (`short`: -); a name or a count in a row of scores: as it is."""
    if x is None:
        return "-" if short else "n/a"
    if isinstance(x, str | int):
        return str(x)
    value = f"{x:.3f}" if short else f"{x:.4f}"
    if not ci:
        return value
    low, high = (f"{c:.3f}".removeprefix("0") if short else f"{c:.3f}" for c in ci)
    return f"{value} [{low}–{high}]"


def shift_summary(report: dict[str, Any], compared: str, files: str, meaning: str = "") -> list[str]:
    """A shift report (cxr.shift) in words, a paragraph a line: what was `compared` ("" where a heading says it),
    the verdict and its `meaning` to the reader; where it was measured, the domain classifiers the verdict does not
    already quote (those that tell the sets apart it does), the images on each side and where `files` (report and
    figure) are. The leaderboard and `cxr retrain`'s summary both say it so (here, not in cxr.shift: the compare
    stage would import torch and scipy for it)."""
    said = f"{compared}: {report['verdict']}." if compared else f"{report['verdict']}."
    lines = [f"{said} {meaning}".rstrip()]
    if "domain" not in report:  # not measured: the verdict says why
        return lines
    domains = [("the images", report["domain"])]
    if report.get("model"):
        domains.append((f"{report['model']['variant']}'s features", report["model"]["domain"]))
    unquoted = [f"on {what}, AUROC {score_text(d['auroc'], d['ci95'])}" for what, d in domains
                if not d.get("different")]
    ref, target = report["reference"], report["target"]
    return [*lines, ("Domain classifiers (0.5: indistinguishable): " + "; ".join(unquoted) + "; " if unquoted
                     else "Measured on ") + f"{ref['images']} images ({ref['name']}) against {target['images']} "
            f"({target['name']}). Report and figure: {files}."]
