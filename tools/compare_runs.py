"""Two pipeline runs of the same data, compared the way promotion compares models: each variant's (and
ensemble's) validation AUROC, run B minus run A, with a 95% paired bootstrap interval over the validation patients.
B passes where the interval includes 0 or lies above it. Test figures are read from each run's reports (the
evaluate stage's, computed once) and shown beside it, never compared.

    python tools/compare_runs.py /tmp/run-float32 /tmp/run-bf16      # two project folders after `dvc repro`

Each folder is a project whose workspace holds a run's outputs: data/split, models/, ensembles/, reports/ and
comparison/leaderboard.json. The validation images must be the same in both (checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from cxr import bootstrap, cli, inference, params
from cxr.data.store import Split, load_split, size_dir
from cxr.errors import CxrError
from cxr.metrics import auroc


def val_probs(run: Path, entry: str) -> tuple[torch.Tensor, Split, str]:
    """An entry's validation probabilities as evaluate computed them (its TTA views averaged), the validation
    split, and the training precision."""
    folder = run / ("ensembles" if (run / "ensembles" / entry).is_dir() else "models") / entry
    model, card = inference.load(folder / "model.pt")
    evaluation = json.loads((run / "reports" / entry / "evaluation.json").read_text())
    # the views it was evaluated with; the temperature: AUROC does not change with it
    card = dataclasses.replace(card, tta_views=tuple(tuple(v) for v in evaluation["tta_views"]))
    val = load_split(size_dir(run / "data" / "split", card.image_size), "val")
    train = run / "reports" / entry / "train.json"
    precision = json.loads(train.read_text()).get("precision", "float32") if train.exists() else "-"
    return card.probs_of(model, val.images), val, precision


def main(args: argparse.Namespace) -> None:
    a, b = Path(args.a), Path(args.b)
    series = params.load(a / "params.yaml").split.series  # strata as evaluate draws them
    entries = [r["variant"] for r in json.loads((a / "comparison" / "leaderboard.json").read_text())]
    print(f"A = {a}, B = {b}; validation AUROC B - A, 95% interval of {bootstrap.RESAMPLES} paired bootstrap resamples "
          "(by patient where the names give one); "
          "test as each run's evaluate stage reported it\n")
    print("| entry | precision A / B | val AUROC A | val AUROC B | B - A [95% CI] | B | "
          "test acc A / B | sens A / B | spec A / B | test AUROC A / B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in entries:
        (pa, va, prec_a), (pb, vb, prec_b) = val_probs(a, entry), val_probs(b, entry)
        if [m["name"] for m in va.meta] != [m["name"] for m in vb.meta] or not np.array_equal(va.labels, vb.labels):
            raise CxrError(f"{entry}: the two runs' validation splits differ; compare runs of the same data and seed")
        labels = torch.from_numpy(va.labels)
        w = bootstrap.resample_counts(bootstrap.design(labels, va.meta, series))
        stats = bootstrap.paired("auroc", (pb, 0.5), (pa, 0.5), labels, w)
        if stats["ci95"] is None:
            raise CxrError(f"{entry}: validation has one class in some resamples, so AUROC has no interval")
        low, high = stats["ci95"]
        verdict = "worse" if high < 0 else "better" if low > 0 else "equal"
        ta, tb = (json.loads((r / "reports" / entry / "metrics.json").read_text())["test"] for r in (a, b))
        test = " | ".join(f"{ta[k]:.3f} / {tb[k]:.3f}" for k in ("accuracy", "recall", "specificity", "auroc"))
        print(f"| {entry} | {prec_a} / {prec_b} | {auroc(pa, labels):.4f} | {auroc(pb, labels):.4f} | "
              f"{stats['difference']:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict} | "
              f"{test} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the reference run's project folder")
    parser.add_argument("b", help="the run compared with it")
    cli.run(main, parser)
