"""Test metrics at a threshold chosen on validation, and the ROC/PR curves, with torchmetrics."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional import classification as C


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, rule: str | float) -> float:
    """The decision threshold on P(PNEUMONIA) (positive when p > threshold, as torchmetrics counts):
    fixed, or the one that maximises F1 or Youden's J on `probs`."""
    if isinstance(rule, float):
        return rule
    if rule == "f1":
        precision, recall, thresholds = C.binary_precision_recall_curve(probs, labels)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        best = thresholds[f1[:-1].argmax()]  # the last (precision=1, recall=0) point has no threshold
    else:
        fpr, tpr, thresholds = C.binary_roc(probs, labels)
        best = thresholds[(tpr - fpr).argmax()].clamp(0, 1)
    # Curve thresholds mean p >= t; halfway to the next lower score means the same for p > t.
    below = probs[probs < best]
    return float((best + below.max()) / 2) if len(below) else float(best / 2)


def scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    labels = labels.long()
    (tn, fp), (fn, tp) = C.binary_confusion_matrix(probs, labels, threshold=threshold).tolist()
    kw: dict[str, Any] = {"threshold": threshold}
    return {
        "accuracy": C.binary_accuracy(probs, labels, **kw).item(),
        "precision": C.binary_precision(probs, labels, **kw).item(),
        "recall": C.binary_recall(probs, labels, **kw).item(),
        "specificity": C.binary_specificity(probs, labels, **kw).item(),
        "f1": C.binary_f1_score(probs, labels, **kw).item(),
        "auroc": C.binary_auroc(probs, labels).item(),
        "average_precision": C.binary_average_precision(probs, labels).item(),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def curves(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, list[dict[str, float]]]:
    """ROC and PR curves as rows, thinned to at most ~200 points for plots."""
    fpr, tpr, _ = C.binary_roc(probs, labels.long())
    precision, recall, _ = C.binary_precision_recall_curve(probs, labels.long())

    def rows(**cols: torch.Tensor) -> list[dict[str, float]]:
        n = len(next(iter(cols.values())))
        keep = sorted(set(torch.linspace(0, n - 1, min(n, 200)).round().long().tolist()))
        return [{k: round(float(v[i]), 5) for k, v in cols.items()} for i in keep]

    return {"roc": rows(fpr=fpr, tpr=tpr), "pr": rows(recall=recall, precision=precision)}
