"""95% stratified bootstrap intervals of the headline scores, vectorised. A resample is a row of per-image counts
drawn within each stratum (each class, or finer), so every resample keeps the split's class counts; every
threshold score is then a weighted count and AUROC a weighted Mann-Whitney sum, so 2,000 resamples of a few
hundred images take milliseconds instead of the seconds a loop over resampled copies takes."""

from __future__ import annotations

import torch

from cxr.metrics import ratio
from cxr.task import predicted

RESAMPLES = 2000
LEVELS = (0.025, 0.975)


def resample_counts(strata: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples, N) float64: how often each image is drawn when each stratum's images are drawn with
    replacement as many times as the stratum has images."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(resamples, len(strata), dtype=torch.float64)
    for s in strata.unique(sorted=True):
        members = torch.nonzero(strata == s).flatten()
        drawn = members[torch.randint(len(members), (resamples, len(members)), generator=gen)]
        counts.scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
    return counts


def weighted_auroc(scores: torch.Tensor, positive: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(R,) AUROC of `scores` for each row of weights (R, N): the weighted share of (positive, negative) pairs
    ranked right, ties counting half, which is the trapezoidal area under the ROC curve."""
    order = scores.argsort()
    s, pos, w = scores[order], positive[order].bool(), w[:, order]
    group = torch.cat([torch.zeros(1, dtype=torch.long), (s[1:] != s[:-1]).long().cumsum(0)])  # ties share one
    neg = torch.zeros(w.shape[0], int(group[-1]) + 1, dtype=torch.float64).index_add_(1, group, w * ~pos)
    credit = neg.cumsum(1) - neg / 2  # negatives below each tie group, and half of those inside it
    wp = w * pos
    return (wp * credit[:, group]).sum(1) / (wp.sum(1) * (w * ~pos).sum(1))


def weighted_scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float,
                    w: torch.Tensor) -> dict[str, torch.Tensor]:
    """(R,) of each WITH_INTERVAL score for each row of weights (R, N). Binary scores at `threshold`; with more
    classes, argmax decisions and macro averages over classes (as metrics.multiclass_scores)."""
    k = 2 if probs.ndim == 1 else probs.shape[1]
    cells = torch.nn.functional.one_hot(labels.long() * k + predicted(probs, threshold), k * k).double()
    cm = (w @ cells).reshape(-1, k, k)  # (R, actual, predicted)
    tp = cm.diagonal(dim1=1, dim2=2)
    fp, fn = cm.sum(1) - tp, cm.sum(2) - tp
    tn = cm.sum((1, 2))[:, None] - tp - fp - fn
    per_class = {"recall": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
                 "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    out = {"accuracy": tp.sum(1) / cm.sum((1, 2))}
    if k == 2:  # the positive class's (PNEUMONIA's) own figures
        out |= {key: v[:, 1] for key, v in per_class.items()}
        out["auroc"] = weighted_auroc(probs.double(), labels == 1, w)
    else:
        out |= {key: v.mean(1) for key, v in per_class.items()}
        out["auroc"] = torch.stack([weighted_auroc(probs[:, c].double(), labels == c, w) for c in range(k)]).mean(0)
    return out


def interval(values: torch.Tensor) -> list[float] | None:
    """The 95% percentile interval of resampled values; None where a resample left the score undefined."""
    if values.isnan().any():
        return None
    return [round(v, 6) for v in torch.quantile(values, torch.tensor(LEVELS, dtype=torch.float64)).tolist()]


def intervals(probs: torch.Tensor, labels: torch.Tensor, threshold: float, w: torch.Tensor) -> dict[str, list | None]:
    """score -> [low, high], the 95% interval over the resamples `w` (resample_counts) of the images."""
    return {key: interval(v) for key, v in weighted_scores(probs.detach().cpu(), labels.cpu(), threshold, w).items()}


def share_interval(hits: torch.Tensor, w: torch.Tensor) -> list[float] | None:
    """The 95% interval of the share of `hits` among the images of `hits` (a boolean mask over a subset given by
    its weight columns `w`, (R, n)): e.g. the sensitivity within one pneumonia subtype."""
    total = w.sum(1)
    return interval(ratio((w * hits.double()).sum(1), total)) if len(hits) else None
