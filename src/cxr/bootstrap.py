"""95% bootstrap intervals of the headline scores, clustered by patient and vectorised: the one bootstrap of the
project (evaluation's intervals, promotion's paired comparison, the shift report's domain AUROC).

A resample draws patients with replacement within each stratum (class, and pneumonia subtype where the file
names say it) and takes all of each drawn patient's images: images of one patient are not independent, so
resampling images would make every interval too narrow. An image without a patient id is its own cluster; where
no image has one, the unit is the image. A resample is a row of per-image counts, so every threshold score is a
weighted count and AUROC a weighted Mann-Whitney sum: 2,000 resamples of a few hundred images take milliseconds
instead of the seconds a loop over resampled copies takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxr.data.split import SUBTYPES, series_of, subtype
from cxr.metrics import ratio
from cxr.params import HEADLINE, WITH_INTERVAL
from cxr.task import predicted

RESAMPLES = 2000
LEVELS = (0.025, 0.975)


@dataclass(frozen=True)
class Design:
    """What a resample draws from: each image's stratum and cluster (images of one patient share a cluster)."""

    strata: torch.Tensor  # (N,) long
    clusters: torch.Tensor  # (N,) long, numbered by first appearance
    patients: int = 0  # distinct patient ids among the images

    @property
    def unit(self) -> str:
        """What a resample draws: "patient" where some image names its patient, else "image"."""
        return "patient" if self.patients else "image"

    def describe(self, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
        """The record written next to each set of intervals: unit, counts and resamples."""
        return {"unit": self.unit, "patients": self.patients,
                "clusters": int(self.clusters.max()) + 1 if len(self.clusters) else 0, "images": len(self.clusters),
                "resamples": resamples, "seed": seed, "level": 0.95}


def clusters_of(patients: Sequence[str]) -> torch.Tensor:
    """(N,) cluster number per image, by first appearance: images sharing a non-empty patient id share one, an
    image without an id is a cluster of its own."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p or f"\0{i}", len(ids)) for i, p in enumerate(patients)], dtype=torch.long)


def design(labels: torch.Tensor, meta: Sequence[dict[str, Any]], series: Sequence[str] = ()) -> Design:
    """Strata by class and, within it, the pneumonia subtype the file name gives ('' where none) and the series
    the `series` patterns find (split.series); clusters by the metadata's patient_id."""
    cause = torch.tensor([SUBTYPES.index(c) + 1 if (c := subtype(m["name"])) else 0 for m in meta], dtype=torch.long)
    strata = labels.long() * (len(SUBTYPES) + 1) + cause
    if series:
        _, found = np.unique([series_of(m["name"], list(series))[0] for m in meta], return_inverse=True)
        strata = strata * (int(found.max()) + 1) + torch.from_numpy(found.reshape(-1))
    return by_patient(strata, [m.get("patient_id") or "" for m in meta])


def by_patient(strata: torch.Tensor, patients: Sequence[str]) -> Design:
    """Images clustered by their patient ids ('' where unknown: an image alone)."""
    return Design(strata, clusters_of(patients), len(set(patients) - {""}))


def by_image(strata: torch.Tensor) -> Design:
    """Every image its own cluster."""
    return Design(strata, torch.arange(len(strata)))


def cluster_strata(clusters: torch.Tensor, strata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's cluster renumbered 0..C-1, and each cluster's stratum: the one most of its images are in (the
    lowest on a tie), for a patient whose images span strata (Kaggle has bacterial and viral images of one)."""
    _, cluster = torch.unique(clusters, return_inverse=True)
    mix = torch.zeros(int(cluster.max()) + 1, int(strata.max()) + 1, dtype=torch.long)
    mix.index_put_((cluster, strata.long()), torch.ones_like(cluster), accumulate=True)
    return cluster, mix.argmax(1)  # argmax: the first of equal maxima


def resample_counts(d: Design, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples, N) float64: how often each image is drawn when each stratum's clusters are drawn with
    replacement as many times as the stratum has clusters, each draw taking all of the cluster's images. With
    one image per cluster this is the stratified image bootstrap, draw for draw."""
    if not len(d.clusters):
        return torch.zeros(resamples, 0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    cluster, stratum = cluster_strata(d.clusters, d.strata)
    counts = torch.zeros(resamples, len(stratum), dtype=torch.float64)
    for s in stratum.unique(sorted=True):
        members = torch.nonzero(stratum == s).flatten()
        drawn = members[torch.randint(len(members), (resamples, len(members)), generator=gen)]
        counts.scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
    return counts[:, cluster]


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


def weighted_average_precision(scores: torch.Tensor, positive: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(R,) average precision for each row of weights (R, N): the precision at each distinct score, highest
    first, times the recall gained there (as metrics.average_precision)."""
    order = scores.argsort(descending=True)
    s, pos, w = scores[order], positive[order].bool(), w[:, order]
    group = torch.cat([torch.zeros(1, dtype=torch.long), (s[1:] != s[:-1]).long().cumsum(0)])
    size = (w.shape[0], int(group[-1]) + 1)
    tp = torch.zeros(size, dtype=torch.float64).index_add_(1, group, w * pos)
    fp = torch.zeros(size, dtype=torch.float64).index_add_(1, group, w * ~pos)
    precision = ratio(tp.cumsum(1), tp.cumsum(1) + fp.cumsum(1))
    return (tp * precision).sum(1) / tp.sum(1)


RANKED = {"auroc": weighted_auroc, "average_precision": weighted_average_precision}


def weighted_scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float, w: torch.Tensor,
                    keys: Sequence[str] = HEADLINE) -> dict[str, torch.Tensor]:
    """(R,) of each headline score for each row of weights (R, N). Binary scores at `threshold`; with more
    classes, argmax decisions and macro averages over classes (as metrics.multiclass_scores). The ranking scores
    are computed only when in `keys`."""
    k = 2 if probs.ndim == 1 else probs.shape[1]
    cells = torch.nn.functional.one_hot(labels.long() * k + predicted(probs, threshold), k * k).double()
    cm = (w @ cells).reshape(-1, k, k)  # (R, actual, predicted)
    tp = cm.diagonal(dim1=1, dim2=2)
    fp, fn = cm.sum(1) - tp, cm.sum(2) - tp
    tn = cm.sum((1, 2))[:, None] - tp - fp - fn
    per_class = {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
                 "specificity": ratio(tn, tn + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    out = {"accuracy": tp.sum(1) / cm.sum((1, 2))}
    if k == 2:  # the positive class's (PNEUMONIA's) own figures
        out |= {key: v[:, 1] for key, v in per_class.items()}
        out |= {key: f(probs.double(), labels == 1, w) for key, f in RANKED.items() if key in keys}
    else:
        out |= {key: v.mean(1) for key, v in per_class.items()}
        out |= {key: torch.stack([f(probs[:, c].double(), labels == c, w) for c in range(k)]).mean(0)
                for key, f in RANKED.items() if key in keys}
    return out


def interval(values: torch.Tensor) -> list[float] | None:
    """The 95% percentile interval of resampled values; None where a resample left the score undefined."""
    if values.isnan().any():
        return None
    return [round(v, 6) for v in torch.quantile(values, torch.tensor(LEVELS, dtype=torch.float64)).tolist()]


def intervals(probs: torch.Tensor, labels: torch.Tensor, threshold: float, w: torch.Tensor) -> dict[str, list | None]:
    """score -> [low, high] of each WITH_INTERVAL score, the 95% interval over the resamples `w`
    (resample_counts)."""
    values = weighted_scores(probs.detach().cpu(), labels.cpu(), threshold, w, WITH_INTERVAL)
    return {key: interval(values[key]) for key in WITH_INTERVAL}


def share_interval(hits: torch.Tensor, w: torch.Tensor) -> list[float] | None:
    """The 95% interval of the share of `hits` among the images of `hits` (a boolean mask over a subset given by
    its weight columns `w`, (R, n)): e.g. the sensitivity within one pneumonia subtype."""
    total = w.sum(1)
    return interval(ratio((w * hits.double()).sum(1), total)) if len(hits) else None


def paired(name: str, a: tuple[torch.Tensor, float], b: tuple[torch.Tensor, float], labels: torch.Tensor,
           w: torch.Tensor) -> dict[str, Any]:
    """score(a) - score(b) of two models' (probs, threshold) on the same images, and its 95% interval over the
    resamples `w`: the same resampled patients for both models. The interval is None where a resample leaves the
    score undefined (it is never computed on the resamples that happen to work)."""
    one = torch.ones(1, len(labels), dtype=torch.float64)
    diff = [weighted_scores(p.detach().cpu(), labels.cpu(), t, torch.cat([one, w]), [name])[name] for p, t in (a, b)]
    d = diff[0] - diff[1]
    ci = interval(d[1:])
    return {"difference": float(d[0]), "ci95": ci, "resamples": len(w)}
