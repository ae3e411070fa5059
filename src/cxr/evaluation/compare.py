"""The compare stage: one leaderboard row per variant, sorted by a test metric."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr.errors import CxrError
from cxr.io import atomic_path, write_csv
from cxr.params import Params

COLUMNS = ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "average_precision")


def leaderboard(p: Params, reports: Path) -> list[dict[str, Any]]:
    rows = []
    for variant in p.models:
        path = reports / variant / "metrics.json"
        if not path.exists():
            raise CxrError(f"{path} is missing; run `dvc repro` to train and evaluate {variant}")
        m = json.loads(path.read_text())
        train_path = reports / variant / "train.json"
        train = json.loads(train_path.read_text()) if train_path.exists() else {}
        rows.append({"variant": variant, "arch": p.variant(variant).arch,
                     **{k: round(m["test"][k], 4) for k in COLUMNS},
                     "accuracy_at_0.5": _round(m.get("test_threshold_0_5", {}).get("accuracy")),
                     "threshold": _round(m.get("threshold")), "epochs": train.get("epochs_run"),
                     "train_seconds": train.get("train_seconds")})
    if p.compare.metric not in COLUMNS:
        raise CxrError(f"compare.metric: {p.compare.metric!r} is not one of {', '.join(COLUMNS)}")
    return sorted(rows, key=lambda r: -r[p.compare.metric])


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def write_leaderboard(rows: list[dict[str, Any]], out: Path, metric: str) -> None:
    write_csv(out.with_suffix(".csv"), rows)
    head = list(rows[0]) if rows else ["variant"]
    lines = [f"# Leaderboard (test split, sorted by {metric})", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in head) + " |" for r in rows]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
