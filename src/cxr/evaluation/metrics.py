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
    if labels.unique().numel() < 2:
        return 0.5  # no rule can be applied to one class (the split stage refuses such a val split)
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


def scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float | None]:
    labels = labels.long()
    (tn, fp), (fn, tp) = C.binary_confusion_matrix(probs, labels, threshold=threshold).tolist()
    kw: dict[str, Any] = {"threshold": threshold}
    both = labels.unique().numel() == 2  # ranking scores are undefined on one class: null, not torchmetrics' 0
    return {
        "accuracy": C.binary_accuracy(probs, labels, **kw).item(),
        "precision": C.binary_precision(probs, labels, **kw).item(),
        "recall": C.binary_recall(probs, labels, **kw).item(),
        "specificity": C.binary_specificity(probs, labels, **kw).item(),
        "f1": C.binary_f1_score(probs, labels, **kw).item(),
        "auroc": C.binary_auroc(probs, labels).item() if both else None,
        "average_precision": C.binary_average_precision(probs, labels).item() if both else None,
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def multiclass_scores(probs: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float | None]:
    """Argmax predictions: accuracy, macro averages (the headline figures), and each class's own."""
    labels, k = labels.long(), len(names)
    kw: dict[str, Any] = {"num_classes": k}
    out = {"accuracy": C.multiclass_accuracy(probs, labels, average="micro", **kw).item()}
    per_class = {"precision": C.multiclass_precision, "recall": C.multiclass_recall,
                 "specificity": C.multiclass_specificity, "f1": C.multiclass_f1_score}
    for metric, fn in per_class.items():
        values = fn(probs, labels, average=None, **kw)
        out[metric] = values.mean().item()
        out |= {f"{metric}_{name}": v for name, v in zip(names, values.tolist(), strict=True)}
    every = labels.unique().numel() == k
    out["auroc"] = C.multiclass_auroc(probs, labels, average="macro", **kw).item() if every else None
    out["average_precision"] = (C.multiclass_average_precision(probs, labels, average="macro", **kw).item()
                                if every else None)
    return out


def task_scores(probs: torch.Tensor, labels: torch.Tensor, names: list[str],
                threshold: float) -> dict[str, float | None]:
    """Binary scores at `threshold` for P(PNEUMONIA) probabilities, argmax scores for (N, K) ones."""
    return scores(probs, labels, threshold) if probs.ndim == 1 else multiclass_scores(probs, labels, names)


def confusion(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> list[list[int]]:
    """Rows actual, columns predicted."""
    if probs.ndim == 1:
        return C.binary_confusion_matrix(probs, labels.long(), threshold=threshold).tolist()
    return C.multiclass_confusion_matrix(probs, labels.long(), num_classes=probs.shape[1]).tolist()


def curves(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, list[dict[str, float]]]:
    """ROC and PR curves as rows, thinned to at most ~200 points for plots. With more classes: the
    micro average (every class's one-vs-rest decisions pooled)."""
    if probs.ndim == 2:
        probs, labels = probs.reshape(-1), torch.nn.functional.one_hot(labels.long(), probs.shape[1]).reshape(-1)
    fpr, tpr, _ = C.binary_roc(probs, labels.long())
    precision, recall, _ = C.binary_precision_recall_curve(probs, labels.long())

    def rows(**cols: torch.Tensor) -> list[dict[str, float]]:
        n = len(next(iter(cols.values())))
        keep = sorted(set(torch.linspace(0, n - 1, min(n, 200)).round().long().tolist()))
        return [{k: round(float(v[i]), 5) for k, v in cols.items()} for i in keep]

    return {"roc": rows(fpr=fpr, tpr=tpr), "pr": rows(recall=recall, precision=precision)}
