"""The split stage: carve missing splits by patient, check duplicates and leakage, balance train."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from cxr import LABELS, SPLITS
from cxr.data.store import Split, load_split, save_split, splits_in
from cxr.errors import CxrError
from cxr.io import atomic_path
from cxr.params import SplitParams

log = logging.getLogger(__name__)


def _groups(data: Split) -> np.ndarray:
    # Same patient, or same bytes when the name has no patient id, stay on one side of a split.
    return np.array([m["patient_id"] or f"sha:{m['sha256']}" for m in data.meta])


def carve(data: Split, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, carved) with about `fraction` carved out, stratified by label, grouped by patient."""
    n_splits = max(2, round(1 / fraction))
    if np.bincount(data.labels, minlength=2).min() < n_splits:
        raise CxrError(f"too few images of a class ({np.bincount(data.labels).tolist()}) to carve a "
                       f"{fraction:.0%} split; add images or lower split.val_fraction / split.test_fraction")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    kept, carved = next(folds.split(np.zeros(len(data.labels)), data.labels, _groups(data)))
    return np.sort(kept), np.sort(carved)


def duplicates(splits: dict[str, Split]) -> dict[str, Any]:
    """Byte-identical images (same sha256 of the source bytes) within and across splits, and patients
    present in more than one split."""
    where: dict[str, list[tuple[str, int]]] = defaultdict(list)
    patients: dict[str, set[str]] = defaultdict(set)
    for name, data in splits.items():
        for i, m in enumerate(data.meta):
            where[m["sha256"]].append((name, i))
            if m["patient_id"]:
                patients[m["patient_id"]].add(name)
    within = {s: 0 for s in splits}
    across: dict[str, int] = defaultdict(int)
    shared_patients: dict[str, int] = defaultdict(int)
    for names in patients.values():
        for pair in _pairs(names):
            shared_patients[pair] += 1
    examples = []
    for locs in where.values():
        if len(locs) < 2:
            continue
        names = [n for n, _ in locs]
        for s in set(names):
            within[s] += names.count(s) - 1
        for pair in _pairs(set(names)):
            across[pair] += 1
        if len(examples) < 10:
            examples.append([f"{n}:{splits[n].meta[i]['name']}" for n, i in locs])
    return {"within_split_extra_copies": within, "across_splits": dict(across),
            "patient_ids_across_splits": dict(shared_patients), "examples": examples}


def _pairs(names: set[str]) -> list[str]:
    kinds = sorted(names, key=SPLITS.index)
    return [f"{a}-{b}" for i, a in enumerate(kinds) for b in kinds[i + 1:]]


def drop_duplicates(splits: dict[str, Split]) -> dict[str, int]:
    """Keep the first copy within a split, and drop from train (then val) whatever a later split holds,
    so the evaluation splits stay as they were."""
    seen: set[str] = set()
    dropped = {}
    for name in sorted(splits, key=SPLITS.index, reverse=True):  # test, val, train
        data, keep, here = splits[name], [], set()
        for i, m in enumerate(data.meta):
            if m["sha256"] not in seen and m["sha256"] not in here:
                keep.append(i)
                here.add(m["sha256"])
        dropped[name] = len(data.meta) - len(keep)
        splits[name] = data.take(np.array(keep, dtype=np.int64))
        seen |= here
    return dropped


def downsample(data: Split, seed: int) -> Split:
    """Drop random images of the majority class until the classes are equal."""
    counts = np.bincount(data.labels, minlength=len(LABELS))
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), counts.min(), replace=False)
                           for c in range(len(LABELS))])
    return data.take(np.sort(keep))


def _counts(data: Split) -> dict[str, int]:
    return {label: int((data.labels == i).sum()) for i, label in enumerate(LABELS)}


def split(gray: Path, out: Path, p: SplitParams, seed: int) -> dict[str, Any]:
    """Write `out`/{train,val,test}_* from the grayscale arrays; return the report."""
    present = splits_in(gray)
    if "train" not in present:
        raise CxrError(f"the source has no train split (it has {', '.join(present) or 'none'}); "
                       "a source needs train/ images")
    splits = {s: load_split(gray, s) for s in present}
    report: dict[str, Any] = {"source_counts": {s: _counts(d) for s, d in splits.items()}, "carved": []}
    for name, fraction in (("test", p.test_fraction), ("val", p.val_fraction)):
        if name not in splits:
            kept, carved = carve(splits["train"], fraction, seed)
            splits[name], splits["train"] = splits["train"].take(carved), splits["train"].take(kept)
            report["carved"].append(name)
    report["duplicates"] = duplicates(splits)
    report["dropped_duplicates"] = drop_duplicates(splits) if p.drop_duplicates else {}
    if p.balance == "downsample":
        splits["train"] = downsample(splits["train"], seed)
    report["counts"] = {s: _counts(splits[s]) for s in SPLITS}
    with atomic_path(out, is_dir=True) as tmp:
        for s in SPLITS:
            save_split(tmp, s, splits[s])
    log.info("split counts %s; duplicates %s", report["counts"], report["duplicates"]["across_splits"])
    return report
