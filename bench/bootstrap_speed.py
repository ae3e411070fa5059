"""The 95% intervals of evaluate (cxr.bootstrap: resamples as per-image counts, scores as weighted sums) against
the naive way (copy each resample, score it with cxr.metrics), on Kaggle's test size, binary and three
classes: seconds for 2,000 resamples (median of `--repeats`) and how far the two sets of intervals lie apart.

    python bench/bootstrap_speed.py
"""

import argparse
import statistics
import time

import torch

from cxr import bootstrap, metrics

SCORES = ("accuracy", "recall", "specificity", "f1", "auroc")


def case(classes: int, n: int = 624) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(classes)
    labels = torch.randint(classes, (n,), generator=g)
    if classes == 2:
        return (torch.rand(n, generator=g) * 0.7 + labels * 0.3).float(), labels
    return torch.softmax(torch.randn(n, classes, generator=g) + torch.nn.functional.one_hot(labels) * 1.5, 1), labels


def naive(probs: torch.Tensor, labels: torch.Tensor, resamples: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(1)
    names = [str(c) for c in range(probs.shape[1])] if probs.ndim == 2 else []
    by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    values: dict[str, list[float]] = {k: [] for k in SCORES}
    for _ in range(resamples):
        idx = torch.cat([c[torch.randint(len(c), (len(c),), generator=gen)] for c in by_class])
        for k in SCORES:
            values[k].append(metrics.metric(k, probs[idx], labels[idx], names, 0.5))
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {k: torch.quantile(torch.tensor(v, dtype=torch.float64), q).tolist() for k, v in values.items()}


def vectorised(probs: torch.Tensor, labels: torch.Tensor, resamples: int) -> dict[str, list[float] | None]:
    return bootstrap.intervals(probs, labels, 0.5, bootstrap.resample_counts(labels, resamples, seed=0))


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
    print(f"{args.resamples} stratified resamples of 624 images; seconds, median of {args.repeats}\n")
    print("| task | naive (copies) s | vectorised s | speed-up | largest endpoint gap |")
    print("|---|---|---|---|---|")
    for classes in (2, 3):
        probs, labels = case(classes)
        t_naive, ref = timed(naive, probs, labels, args.resamples, repeats=args.repeats)
        t_vec, ours = timed(vectorised, probs, labels, args.resamples, repeats=args.repeats)
        gap = max(abs(a - b) for k in SCORES for a, b in zip(ours[k], ref[k], strict=True))
        task = "binary" if classes == 2 else "three classes"
        print(f"| {task} | {t_naive:.2f} | {t_vec:.3f} | {t_naive / t_vec:.0f}x | {gap:.4f} |", flush=True)


if __name__ == "__main__":
    main()
