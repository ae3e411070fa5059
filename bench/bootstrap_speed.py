"""The 95% intervals of evaluate (cxr.bootstrap: patients drawn within strata, resamples as per-image counts,
scores as weighted sums) against the naive way (copy each resample's drawn patients' images, score the copy with
cxr.metrics), on Kaggle's official test set (624 images of 427 patients, from ../shared/data's manifest; without
it, 624 images in clusters of its sizes), binary and three classes: seconds for 2,000 resamples (median of
`--repeats`), how far the two sets of intervals lie apart, and how much wider than by image they are.

    python bench/bootstrap_speed.py
"""

import argparse
import csv
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cxr import bootstrap, metrics
from cxr.data.gray import patient_id

SCORES = ("accuracy", "recall", "specificity", "f1", "auroc")
MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "MANIFEST.csv"


def patients(n: int = 624) -> list[str]:
    """Kaggle test's patient of each image, or (without the data) 624 images in clusters of up to 9."""
    if MANIFEST.exists():
        with MANIFEST.open() as f:
            return [patient_id(r["path"]) for r in csv.DictReader(f) if r["split"] == "test"]
    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.geometric(0.6, n), 9)
    return [f"p{i}" for i, s in enumerate(sizes) for _ in range(s)][:n]


def case(classes: int, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and scores per patient: one class each, and a shared effect (a model errs on all of one patient's
    images or none)."""
    g = torch.Generator().manual_seed(classes)
    n, names = len(ids), sorted(set(ids))
    effect = dict(zip(names, torch.randn(len(names), generator=g).tolist(), strict=True))
    shared = torch.tensor([effect[p] for p in ids])
    label = dict(zip(names, torch.randint(classes, (len(names),), generator=g).tolist(), strict=True))
    labels = torch.tensor([label[p] for p in ids])  # one class a patient, as a stratum holds whole patients
    if classes == 2:
        return ((labels * 2 - 1) * 1.2 + shared + torch.randn(n, generator=g) * 0.5).sigmoid().float(), labels
    logits = torch.randn(n, classes, generator=g) + torch.nn.functional.one_hot(labels) * 1.5 + shared[:, None]
    return torch.softmax(logits, 1), labels


def naive(probs: torch.Tensor, labels: torch.Tensor, d: bootstrap.Design, resamples: int) -> dict[str, list[float]]:
    """Per resample: draw each class's patients with replacement, copy their images, score the copy."""
    names = [str(c) for c in range(probs.shape[1])] if probs.ndim == 2 else []
    members: dict[int, list[torch.Tensor]] = defaultdict(list)
    for c in d.clusters.unique():
        idx = torch.nonzero(d.clusters == c).flatten()
        members[int(d.strata[idx[0]])].append(idx)
    gen = torch.Generator().manual_seed(1)
    values: dict[str, list[float]] = {k: [] for k in SCORES}
    for _ in range(resamples):
        idx = torch.cat([g[i] for g in members.values() for i in torch.randint(len(g), (len(g),), generator=gen)])
        for k in SCORES:
            values[k].append(metrics.metric(k, probs[idx], labels[idx], names, 0.5))
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {k: torch.quantile(torch.tensor(v, dtype=torch.float64), q).tolist() for k, v in values.items()}


def vectorised(probs: torch.Tensor, labels: torch.Tensor, d: bootstrap.Design,
               resamples: int) -> dict[str, list[float] | None]:
    return bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(d, resamples, seed=0))


def timed(fn, *args, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ids = patients()
    where = "Kaggle's test patients" if MANIFEST.exists() else "synthetic clusters (no ../shared/data)"
    print(f"{args.resamples} resamples of {len(ids)} images of {len(set(ids))} patients ({where}), drawn by patient "
          f"within each class; seconds, median of {args.repeats}\n")
    print("| task | naive (copies) s | vectorised s | speed-up | largest endpoint gap | width by patient / by image |")
    print("|---|---|---|---|---|---|")
    for classes in (2, 3):
        probs, labels = case(classes, ids)
        d = bootstrap.by_patient(labels, ids)
        t_naive, ref = timed(naive, probs, labels, d, args.resamples, repeats=args.repeats)
        t_vec, ours = timed(vectorised, probs, labels, d, args.resamples, repeats=args.repeats)
        gap = max(abs(a - b) for k in SCORES for a, b in zip(ours[k], ref[k], strict=True))
        by_image = vectorised(probs, labels, bootstrap.by_image(labels), args.resamples)
        ratio = statistics.median((ours[k][1] - ours[k][0]) / (by_image[k][1] - by_image[k][0]) for k in SCORES)
        task = "binary" if classes == 2 else "three classes"
        print(f"| {task} | {t_naive:.2f} | {t_vec:.3f} | {t_naive / t_vec:.0f}x | {gap:.4f} | {ratio:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
