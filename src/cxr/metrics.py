"""Scores at a threshold chosen on validation, ROC/PR curves, calibration. Plain torch, with
torchmetrics' definitions (tests/test_metrics.py checks every figure against it): importing torchmetrics costs
each train and evaluate stage about a second and a half, as it loads torchvision and its image metrics."""

from __future__ import annotations

import math
from typing import Any

import torch

from cxr.task import as_threshold, predicted

RANKING = ("auroc", "average_precision")  # the scores of the ranking, at no threshold


def ratio(num: torch.Tensor | float, den: torch.Tensor | float) -> torch.Tensor:
    """num / den, 0 where den is 0 (torchmetrics' zero_division=0)."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _clf_curve(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """False and true positives when calling p >= t positive, for each distinct score t, highest first."""
    probs, labels = probs.detach().cpu(), labels.cpu()  # a few thousand scores; float64 (which MPS lacks)
    order = probs.argsort(descending=True)
    p, y = probs[order].double(), labels[order].double()
    last = torch.cat([torch.nonzero(p[1:] != p[:-1]).flatten(), torch.tensor([len(p) - 1])])  # of each tie
    tps = y.cumsum(0)[last]
    return last + 1 - tps, tps, p[last]


def roc(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fpr, tpr and thresholds, from (0, 0) at threshold 1; a rate with no cases in its class is 0."""
    fps, tps, thresholds = _clf_curve(probs, labels)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    fps, tps, thresholds = torch.cat([zero, fps]), torch.cat([zero, tps]), torch.cat([one, thresholds])
    return ratio(fps, fps[-1]), ratio(tps, tps[-1]), thresholds


def pr_curve(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """precision and recall, by rising threshold, ending at (recall 0, precision 1), which has no threshold."""
    fps, tps, thresholds = _clf_curve(probs, labels)
    recall = ratio(tps, tps[-1]) if tps[-1] > 0 else torch.ones_like(tps)  # no positives: as torchmetrics
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return torch.cat([(tps / (tps + fps)).flip(0), one]), torch.cat([recall.flip(0), zero]), thresholds.flip(0)


def auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve, by the trapezoidal rule; (N, K) probs: the mean of each class against the rest."""
    if probs.ndim == 2:
        return sum(auroc(probs[:, k], labels == k) for k in range(probs.shape[1])) / probs.shape[1]
    fpr, tpr, _ = roc(probs, labels)
    return float(torch.trapezoid(tpr, fpr))


def average_precision(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over thresholds of precision times the recall gained; (N, K) probs: the mean over classes."""
    if probs.ndim == 2:
        return sum(average_precision(probs[:, k], labels == k) for k in range(probs.shape[1])) / probs.shape[1]
    precision, recall, _ = pr_curve(probs, labels)
    return float(-((recall[1:] - recall[:-1]) * precision[:-1]).sum())


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, rule: str | float) -> float:
    """The decision threshold on P(PNEUMONIA) (positive when p > threshold): fixed, or the one that
    maximises F1 or Youden's J on `probs`. Always a value of the scores' float32, so that it falls on the
    intended side of every score whichever precision compares them."""
    if isinstance(rule, float):
        return as_threshold(rule)
    if labels.unique().numel() < 2:
        return 0.5  # no rule can be applied to one class (the split stage refuses such a val split)
    fps, tps, thresholds = _clf_curve(probs, labels)
    pos, neg = tps[-1], fps[-1]
    # Each score is one division of whole numbers, so equal scores are equal floats and ties break as stated.
    if rule == "f1":  # 2tp / (2tp + fp + fn); of equal ones, the lowest threshold
        score, thresholds = (2 * tps / (tps + fps + pos)).flip(0), thresholds.flip(0)
    else:  # Youden's J = tpr - fpr, from roc()'s (0, 0) point at threshold 1; of equal ones, the highest
        score = torch.cat([torch.zeros(1, dtype=torch.float64), (tps * neg - fps * pos) / (pos * neg)])
        thresholds = torch.cat([torch.ones(1, dtype=torch.float64), thresholds])
    best = float(thresholds[score.argmax()])
    # Curve thresholds mean p >= t; halfway to the next lower score means the same for p > t. Between two
    # adjacent float32 scores the halfway point rounds to one of them: then the lower score itself is the
    # threshold (p > lower calls exactly the scores from `best` up positive).
    below = probs[probs < best]
    lower = float(below.max()) if len(below) else 0.0
    mid = as_threshold((best + lower) / 2)
    return mid if mid < best else as_threshold(lower)


def threshold_range(probs: torch.Tensor, labels: torch.Tensor, rule: str | float,
                    slack: int = 0) -> tuple[float, float] | None:
    """[low, high]: the lowest and highest thresholds t (positive when p > t) that score the best `rule` score
    on `probs`, or, with `slack` = k, within k more errors of the best (k images of the rarer class for
    Youden's J; k more false calls at the best point for F1). On a nearly separable validation split the
    near-best range is wide: where in it choose_threshold lands is set by one or two images, not by evidence.
    None for a fixed threshold or one class."""
    if isinstance(rule, float) or labels.unique().numel() < 2:
        return None
    fps, tps, d = _clf_curve(probs, labels)
    pos, neg = tps[-1], fps[-1]
    zero = torch.zeros(1, dtype=torch.float64)
    fps, tps = torch.cat([zero, fps]), torch.cat([zero, tps])  # 0: nothing positive, j: p >= d[j - 1] positive
    if rule == "f1":
        score = 2 * tps / (tps + fps + pos)
        at = score.argmax()
        floor = 2 * tps[at] / (tps[at] + fps[at] + pos + slack)  # the best point with `slack` more errors
    else:
        score = (tps * neg - fps * pos) / (pos * neg)
        floor = score.max() - slack / min(pos, neg)
    # decision j holds for t in [d[j], d[j - 1]): between the next lower score and its own lowest score
    low, high = torch.cat([d, zero]), torch.cat([torch.ones(1, dtype=torch.float64), d])
    near = score >= floor - 1e-12 if slack else score == score.max()
    return float(low[near].min()), float(high[near].max())


OPERATING_SPECIFICITY = (0.90, 0.95, 0.99)


def threshold_at_specificity(probs: torch.Tensor, labels: torch.Tensor, target: float) -> float:
    """The lowest threshold (positive when p > t) whose specificity on these images is at least `target`: the
    most sensitive operating point that keeps false positives to 1 - target of the negatives."""
    neg = probs[labels == 0].sort(descending=True).values
    allowed = math.floor((1 - target) * len(neg) + 1e-9)  # negatives that may score above t
    return as_threshold(float(neg[allowed])) if allowed < len(neg) else 0.0


def confusion(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> list[list[int]]:
    """Rows actual, columns predicted (as `predicted`)."""
    k = 2 if probs.ndim == 1 else probs.shape[1]
    labels = labels.cpu().long()
    return torch.bincount(labels * k + predicted(probs.detach().cpu(), threshold), minlength=k * k) \
        .reshape(k, k).tolist()


def _at_threshold(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    (tn, fp), (fn, tp) = confusion(probs, labels, threshold)
    return {"accuracy": (tp + tn) / len(labels), "precision": float(ratio(tp, tp + fp)),
            "recall": float(ratio(tp, tp + fn)), "specificity": float(ratio(tn, tn + fp)),
            "f1": float(ratio(2 * tp, 2 * tp + fp + fn)), "tn": tn, "fp": fp, "fn": fn, "tp": tp}


def scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float | None]:
    s = _at_threshold(probs, labels, threshold)
    ranking = {k: metric(k, probs, labels, [], threshold) for k in RANKING}
    return {k: s[k] for k in ("accuracy", "precision", "recall", "specificity", "f1")} | ranking | \
        {k: s[k] for k in ("tn", "fp", "fn", "tp")}


def multiclass_scores(probs: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float | None]:
    """Argmax predictions: accuracy, macro averages (the headline figures), and each class's own."""
    cm = torch.tensor(confusion(probs, labels), dtype=torch.float64)
    tp = cm.diagonal()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    out: dict[str, float | None] = {"accuracy": float(tp.sum() / cm.sum())}
    per_class = {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
                 "specificity": ratio(tn, tn + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    for key, values in per_class.items():
        out[key] = float(values.mean())
        out |= {f"{key}_{name}": float(v) for name, v in zip(names, values, strict=True)}
    return out | {k: metric(k, probs, labels, names, 0.5) for k in RANKING}


def curves(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, list[dict[str, float]]]:
    """ROC and PR curves as rows, thinned to at most ~200 points for plots. With more classes: the
    micro average (every class's one-vs-rest decisions pooled)."""
    if probs.ndim == 2:
        probs, labels = probs.reshape(-1), torch.nn.functional.one_hot(labels.long(), probs.shape[1]).reshape(-1)
    fpr, tpr, _ = roc(probs, labels)
    precision, recall, _ = pr_curve(probs, labels)

    def rows(**cols: torch.Tensor) -> list[dict[str, float]]:
        n = len(next(iter(cols.values())))
        keep = sorted(set(torch.linspace(0, n - 1, min(n, 200)).round().long().tolist()))
        return [{k: round(float(v[i]), 5) for k, v in cols.items()} for i in keep]

    return {"roc": rows(fpr=fpr, tpr=tpr), "pr": rows(recall=recall, precision=precision)}


def metric(name: str, probs: torch.Tensor, labels: torch.Tensor, names: list[str], threshold: float) -> float | None:
    """One score (binary at `threshold`, else argmax), computing only what it needs: the bootstrap calls this
    thousands of times."""
    if name in RANKING:  # undefined without every class: null, not a 0 (a rate over no cases would be 0)
        if labels.unique().numel() < (probs.shape[1] if probs.ndim == 2 else 2):
            return None
        return (auroc if name == "auroc" else average_precision)(probs, labels)
    if probs.ndim == 1:
        return _at_threshold(probs, labels, threshold)[name]
    return multiclass_scores(probs, labels, names)[name]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, probabilities: Any) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [1/20, 20] that minimises the negative log-likelihood of
    `probabilities(logits, T)` (the model's own rule, TTA averaging included) on these labels, by golden-section
    search on log T (the NLL of one temperature is unimodal in practice and cheap: no retraining)."""
    labels = labels.cpu().long()

    def nll(log_t: float) -> float:
        p = probabilities(logits, math.exp(log_t)).double().clamp(1e-12, 1 - 1e-12)
        if p.ndim == 1:
            return float(-(labels * p.log() + (1 - labels) * (1 - p).log()).mean())
        return float(-p[torch.arange(len(labels)), labels].log().mean())

    lo, hi, g = -math.log(20), math.log(20), (math.sqrt(5) - 1) / 2
    for _ in range(40):  # the bracket shrinks by 0.618 a step: 40 steps leave ~1e-8 of it
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def _confidence(probs: torch.Tensor, labels: torch.Tensor, top_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and hit per image: the top label's probability and whether it is right (binary: the decision
    at 0.5), or (binary only) P(PNEUMONIA) and whether the image is PNEUMONIA."""
    probs, labels = probs.detach().cpu().double(), labels.cpu()
    if probs.ndim == 1 and not top_label:
        return probs, labels.double()
    if probs.ndim == 1:
        probs = torch.stack([1 - probs, probs], 1)
    conf, top = probs.max(1)
    return conf, (top == labels).double()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10,
                top_label: bool = False) -> list[dict[str, float]]:
    """Per bin of equal width in confidence (binary: P(PNEUMONIA) unless `top_label`; more classes: the top
    probability): the mean confidence, the observed frequency (of PNEUMONIA, or of a correct top class) and
    the count."""
    conf, hit = _confidence(probs, labels, top_label or probs.ndim == 2)
    which = (conf * bins).long().clamp(max=bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        if m.any():
            rows.append({"bin": b, "confidence": float(conf[m].mean()), "frequency": float(hit[m].mean()),
                         "count": int(m.sum())})
    return rows


def _gap(rows: list[dict[str, float]], n: int) -> float:
    return sum(r["count"] * abs(r["confidence"] - r["frequency"]) for r in rows) / n


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error as Guo et al. (2017) define it: top-label confidence (binary: max(p, 1 - p))
    against accuracy, the count-weighted mean gap over equal-width bins."""
    return _gap(reliability(probs, labels, bins, top_label=True), len(labels))


def class_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Class-wise ECE: each class's probability against how often the image is that class, averaged over the
    classes (binary: P(PNEUMONIA)'s, which equals NORMAL's). Unlike `ece` it sees a model that is confident
    in the wrong direction on one class."""
    if probs.ndim == 1:
        return _gap(reliability(probs, labels, bins), len(labels))
    return sum(_gap(reliability(probs[:, k], labels == k, bins), len(labels)) for k in range(probs.shape[1])) \
        / probs.shape[1]
