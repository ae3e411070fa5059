"""cxr.bootstrap, the one bootstrap of the project: resamples drawn by patient within strata, as per-image counts.
Checked against a textbook cluster bootstrap that copies the drawn patients' images and scores the copy with
cxr.metrics, on Kaggle's real test set (its 624 images of 427 patients, up to 9 images each)."""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from conftest import manifest
from cxr import bootstrap
from cxr import metrics as M
from cxr.data.gray import patient_id

SCORES = ("accuracy", "recall", "specificity", "f1", "auroc")


def _binary(n: int, seed: int, positive: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < positive).long()
    probs = (torch.rand(n, generator=g) * 0.6 + labels * 0.3).round(decimals=2)  # overlapping, many ties
    return probs, labels


def kaggle_test(seed: int = 0, patient_effect: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Kaggle's official test images (names, labels, patients) with scores that share a patient effect, as a
    model's scores do: one patient's images look alike, so it errs on all of them or on none."""
    rows = manifest("chest_xray_224")
    meta = [{"name": r["path"], "patient_id": patient_id(r["path"])} for r in rows if r["split"] == "test"]
    labels = torch.tensor([int("PNEUMONIA" in m["name"]) for m in meta])
    g = torch.Generator().manual_seed(seed)
    ids = sorted({m["patient_id"] for m in meta})
    effect = dict(zip(ids, (torch.randn(len(ids), generator=g) * patient_effect).tolist(), strict=True))
    logit = (labels * 2 - 1) * 1.2 + torch.tensor([effect[m["patient_id"]] for m in meta]) + \
        torch.randn(len(meta), generator=g) * 0.5
    return logit.sigmoid().float(), labels, meta


def textbook(probs: torch.Tensor, labels: torch.Tensor, strata: list[int], patients: list[str], names: list[str],
             resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The textbook cluster bootstrap, independent of cxr.bootstrap: within each stratum (a patient's: the one most
    of its images are in, the lowest on a tie), draw as many patients as it has with replacement, copy all of
    their images, score the copy with cxr.metrics, take the 2.5 and 97.5 percentiles. Images without a patient
    id are patients of their own."""
    images: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        images[p or f"image {i}"].append(i)
    by_stratum: dict[int, list[list[int]]] = defaultdict(list)
    for idx in images.values():
        counts = Counter(strata[i] for i in idx)
        by_stratum[min(s for s, n in counts.items() if n == max(counts.values()))].append(idx)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in SCORES}
    for _ in range(resamples):
        idx = torch.tensor([i for groups in by_stratum.values() for g in rng.integers(len(groups), size=len(groups))
                            for i in groups[g]])
        got = M.multiclass_scores(probs[idx], labels[idx], names) if names else M.scores(probs[idx], labels[idx], 0.5)
        for k in values:
            values[k].append(got[k])
    return {k: np.percentile(v, [2.5, 97.5]) for k, v in values.items()}


def width(ci: dict[str, list[float] | None]) -> dict[str, float]:
    return {k: v[1] - v[0] for k, v in ci.items() if v}


def test_by_patient_the_intervals_are_wider_than_by_image_and_the_same_with_one_image_a_patient():
    probs, labels, meta = kaggle_test()
    d = bootstrap.design(labels, meta)
    assert d.unit == "patient" and d.patients == 427 and d.describe()["images"] == 624
    by_patient = bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(d))
    by_image = bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(bootstrap.by_image(d.strata)))
    wider = {k: width(by_patient)[k] / width(by_image)[k] for k in SCORES}
    # 82 patients hold 279 of the 624 images, nearly all of them pneumonia (a NORMAL patient has one or two)
    assert all(r > 1.05 for r in wider.values()) and wider["recall"] > 1.3, wider
    # One image a patient (each its own id): the same draws as the image bootstrap, to the last digit.
    alone = [m | {"patient_id": f"p{i}"} for i, m in enumerate(meta)]
    same = bootstrap.design(labels, alone)
    assert same.unit == "patient" and same.patients == 624
    assert bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(same)) == by_image
    # No ids at all: the unit is the image.
    none = bootstrap.design(labels, [m | {"patient_id": ""} for m in meta])
    assert none.unit == "image" and torch.equal(bootstrap.resample_counts(none), bootstrap.resample_counts(same))


def test_a_resample_takes_every_image_of_each_drawn_patient_within_its_stratum():
    probs, labels, meta = kaggle_test()
    d = bootstrap.design(labels, meta)
    w = bootstrap.resample_counts(d, 50, seed=3)
    draws: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(50, dtype=torch.float64))
    patients: Counter = Counter()
    for c in d.clusters.unique():
        members = w[:, d.clusters == c]
        assert (members == members[:, :1]).all()  # the patient's images are drawn together, as often
        counts = Counter(d.strata[d.clusters == c].tolist())
        stratum = min(k for k, n in counts.items() if n == max(counts.values()))  # the lowest on a tie
        draws[stratum] += members[:, 0]
        patients[stratum] += 1
    for s, n in patients.items():  # each stratum draws as many patients as it has, in every resample
        assert (draws[s] == n).all(), s
    assert not torch.equal(w[0], w[1])


def test_with_series_patterns_each_series_keeps_its_patients_in_every_resample():
    """split.series adds a stratum: Kaggle's IM and NORMAL2-IM normals draw as many patients of their own series as
    they hold, so each series' interval is that of its own images; without patterns the strata stay as they were."""
    probs, labels, meta = kaggle_test()
    series = [r"^(?P<series>NORMAL2-IM|IM)-(?P<number>\d+)-"]
    plain, by_series = bootstrap.design(labels, meta), bootstrap.design(labels, meta, series)
    assert torch.equal(plain.clusters, by_series.clusters) and len(by_series.strata.unique()) == \
        len(plain.strata.unique()) + 1  # the normals split in two
    w = bootstrap.resample_counts(by_series, 200, seed=1)
    for prefix in ("IM-", "NORMAL2-IM-"):
        mine = torch.tensor([m["name"].split("/")[-1].startswith(prefix) for m in meta])
        patients = len({m["patient_id"] for m, h in zip(meta, mine.tolist(), strict=True) if h})
        first = {c: i for i, c in reversed(list(enumerate(by_series.clusters.tolist())))}  # a cluster's first image
        heads = torch.zeros(len(meta), dtype=torch.bool)
        heads[list(first.values())] = True
        assert (w[:, mine & heads].sum(1) == patients).all(), prefix
    assert torch.equal(bootstrap.resample_counts(plain, 20, seed=1), bootstrap.resample_counts(
        bootstrap.design(labels, meta, ()), 20, seed=1))


@pytest.mark.parametrize("three", [False, True])
def test_clustered_intervals_agree_with_a_textbook_cluster_bootstrap_within_monte_carlo_error(three):
    """Counts as weights against copies: the same intervals within Monte Carlo error (2,000 resamples: an endpoint
    moves by about 0.005 between seeds), and at weight 1 exactly the point scores."""
    probs, labels, meta = kaggle_test(seed=1)
    names: list[str] = []
    if three:  # NORMAL, BACTERIA, VIRUS by the file names; scores of three classes sharing the patient effect
        labels = torch.tensor([0 if "NORMAL" in m["name"] else 1 if "bacteria" in m["name"] else 2 for m in meta])
        g = torch.Generator().manual_seed(5)
        probs = torch.softmax(torch.randn(len(labels), 3, generator=g) * 0.8 +
                              torch.nn.functional.one_hot(labels, 3) * 1.5 + probs[:, None].logit() * 0.5, 1)
        names = ["NORMAL", "BACTERIA", "VIRUS"]
    exact = M.multiclass_scores(probs, labels, names) if three else M.scores(probs, labels, 0.5)
    ones = torch.ones(1, len(labels), dtype=torch.float64)
    for k, v in bootstrap.weighted_scores(probs, labels, 0.5, ones).items():
        assert float(v[0]) == pytest.approx(exact[k], abs=1e-12), k
    d = bootstrap.design(labels, meta)
    ours = bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(d, 2000, seed=0))
    ref = textbook(probs, labels, d.strata.tolist(), [m["patient_id"] for m in meta], names, 2000, seed=1)
    for k, (lo, hi) in ours.items():
        assert lo == pytest.approx(ref[k][0], abs=0.015) and hi == pytest.approx(ref[k][1], abs=0.015), k
        assert lo < exact[k] < hi and hi - lo > 0.02, k  # an interval around the score, not a point


@pytest.mark.parametrize("three", [False, True])
def test_image_intervals_agree_with_a_textbook_image_bootstrap(three):
    """The same bootstrap with every image its own cluster (a source without patient ids, e.g. MedMNIST)."""
    if three:
        g = torch.Generator().manual_seed(3)
        labels = torch.randint(3, (400,), generator=g)
        probs = torch.softmax(torch.randn(400, 3, generator=g) + torch.nn.functional.one_hot(labels, 3) * 1.2, 1)
        names = ["a", "b", "c"]
    else:
        (probs, labels), names = _binary(624, 5, 0.625), []
    w = bootstrap.resample_counts(bootstrap.by_image(labels), 2000)
    for c in labels.unique():  # every resample keeps each class's count
        assert (w[:, labels == c].sum(1) == (labels == c).sum()).all()
    ours = bootstrap.intervals(probs, labels, 0.5, w)
    ref = textbook(probs, labels, labels.tolist(), [""] * len(labels), names, 2000, seed=1)
    for k, (lo, hi) in ours.items():
        assert lo == pytest.approx(ref[k][0], abs=0.012) and hi == pytest.approx(ref[k][1], abs=0.012), k


def test_the_paired_difference_resamples_the_same_patients_for_both_models():
    probs, labels, meta = kaggle_test(seed=2)
    g = torch.Generator().manual_seed(0)
    noisy = (probs + torch.randn(len(probs), generator=g) * 0.002).clamp(0, 1)  # the same model, a little noise
    bad = (probs.logit() + torch.randn(len(probs), generator=g) * 2.5).sigmoid()
    w = bootstrap.resample_counts(bootstrap.design(labels, meta), 1000, seed=1)
    same = bootstrap.paired("auroc", (noisy, 0.5), (probs, 0.5), labels, w)
    lo, hi = same["ci95"]
    assert lo < 0 < hi and hi - lo < 0.01 and same["resamples"] == 1000  # paired: tiny, though AUROC's own is wide
    assert same["difference"] == pytest.approx(M.auroc(noisy, labels) - M.auroc(probs, labels), abs=1e-6)
    better = bootstrap.paired("auroc", (probs, 0.5), (bad, 0.5), labels, w)
    assert 0 < better["ci95"][0] < better["difference"] < better["ci95"][1]
    for key in ("accuracy", "precision", "average_precision"):  # every score promotion may be set to
        d = bootstrap.paired(key, (probs, 0.5), (bad, 0.5), labels, w)
        point = {"average_precision": M.average_precision}.get(key)
        exact = point(probs, labels) - point(bad, labels) if point else \
            M.scores(probs, labels, 0.5)[key] - M.scores(bad, labels, 0.5)[key]
        assert d["difference"] == pytest.approx(exact, abs=1e-6) and d["ci95"][0] < d["difference"] < d["ci95"][1]
    one_class = bootstrap.paired("auroc", (probs[labels == 1], 0.5), (bad[labels == 1], 0.5), labels[labels == 1],
                                 w[:, labels == 1])
    assert one_class["ci95"] is None  # undefined: said, not computed on the resamples that happen to work
