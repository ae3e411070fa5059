"""The split stage: carve missing splits by patient, check duplicates and leakage, balance train."""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cxr import CLASSES, SPLITS
from cxr.data.store import Split, load_split, save_split, sizes_in, splits_in
from cxr.errors import CxrError
from cxr.io import atomic_paths, write_json
from cxr.params import SplitParams

log = logging.getLogger(__name__)
MIN_VAL = 100  # fewer validation images than this is warned of: one image moves accuracy by 1% or more


def _groups(data: Split) -> np.ndarray:
    # Same patient, or same bytes when the name has no patient id, stay on one side of a split.
    return np.array([m["patient_id"] or f"sha:{m['sha256']}" for m in data.meta])


def carve(data: Split, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, carved) with about `fraction` carved out, stratified by label, grouped by patient."""
    n_splits = max(2, round(1 / fraction))
    if np.bincount(data.labels, minlength=2).min() < n_splits:
        raise CxrError(f"too few images of a class ({np.bincount(data.labels, minlength=2).tolist()}) to carve a "
                       f"{fraction:.0%} split; add images or lower split.val_fraction / split.test_fraction")
    carved = first_fold(data.labels, _groups(data), n_splits, seed)
    return np.flatnonzero(~carved), np.flatnonzero(carved)


def first_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The test fold of the first split of scikit-learn's StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed), as a mask; the same draws, without importing scikit-learn (a second of the stage's
    start-up). Groups, shuffled, are placed from the most to the least uneven class mix, each in the fold that
    keeps every class's share across folds most even (ties: the fold with fewer images)."""
    _, y_inv, y_cnt = np.unique(labels, return_inverse=True, return_counts=True)
    _, groups_inv = np.unique(groups, return_inverse=True)
    counts = np.zeros((groups_inv.max() + 1, len(y_cnt)))
    np.add.at(counts, (groups_inv, y_inv), 1)
    perm = np.arange(len(counts))
    np.random.RandomState(seed).shuffle(perm)
    counts = counts[perm]
    folds, per_fold = np.zeros(len(counts), dtype=int), np.zeros((n_splits, len(y_cnt)))
    for g in np.argsort(-np.std(counts, axis=1), kind="stable"):
        best, best_eval, best_size = 0, np.inf, np.inf
        for i in range(n_splits):
            per_fold[i] += counts[g]
            fold_eval = np.mean(np.std(per_fold / y_cnt.reshape(1, -1), axis=0))
            per_fold[i] -= counts[g]
            size = np.sum(per_fold[i])
            if fold_eval < best_eval or (np.isclose(fold_eval, best_eval) and size < best_size):
                best, best_eval, best_size = i, fold_eval, size
        per_fold[best] += counts[g]
        folds[g] = best
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size)
    return folds[inv_perm[groups_inv]] == 0


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


def downsample(data: Split, seed: int, n_classes: int = 2) -> Split:
    """Drop random images of the larger classes until every class has as many as the smallest."""
    counts = np.bincount(data.labels, minlength=n_classes)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), counts.min(), replace=False)
                           for c in range(n_classes)])
    return data.take(np.sort(keep))


SUBTYPES = ("bacteria", "virus")  # the causes of pneumonia Kaggle's file names state


def subtype(name: str) -> str:
    """'bacteria' or 'virus' where a Kaggle file name says which (person1_bacteria_1.jpeg), else ''."""
    base = Path(name).name.lower()
    return "virus" if "virus" in base else "bacteria" if "bacteria" in base else ""


def three_class(data: Split) -> Split:
    """PNEUMONIA (1) becomes BACTERIA (1) or VIRUS (2) by the Kaggle file name (person1_bacteria_1.jpeg)."""
    labels = data.labels.copy()
    unknown = []
    for i, m in enumerate(data.meta):
        if labels[i] == 1:
            cause = subtype(m["name"])
            if cause == "virus":
                labels[i] = 2
            elif not cause:
                unknown.append(m["name"])
    if unknown:
        raise CxrError(f"data.labels three_class: {len(unknown)} PNEUMONIA images have neither 'bacteria' nor "
                       f"'virus' in their file names (e.g. {unknown[0]}), so this source cannot give 3 classes; "
                       "use Kaggle's file names or data.labels: binary")
    return Split(data.images, labels, data.meta)


def _counts(data: Split, names: tuple[str, ...]) -> dict[str, int]:
    return {label: int((data.labels == i).sum()) for i, label in enumerate(names)}


def _check_classes(counts: dict[str, dict[str, int]]) -> None:
    """Train and val need every class (fitting, early stopping, the threshold and promotion use them);
    a test split of one class is allowed: its scores that need both classes come out as null."""
    for name in ("train", "val"):
        missing = [c for c, n in counts[name].items() if n == 0]
        if missing:
            raise CxrError(f"the {name} split has no {' or '.join(missing)} images ({counts[name]}); training and "
                           f"model selection need every class: add them to the source's {name}/ folder, or remove "
                           f"that folder so that {name} is carved from train")
    missing = [c for c, n in counts["test"].items() if n == 0]
    if missing:
        log.warning("the test split has no %s images: AUROC and average precision will be null", "/".join(missing))


def split(gray: Path, out: Path, p: SplitParams, seed: int, labels: str = "binary",
          report_path: Path | None = None) -> dict[str, Any]:
    """Write `out`/<size>/{train,val,test}_* from the grayscale arrays of each size, with the same images
    in each; return the report (and write it to `report_path`, together with `out`)."""
    sizes = sizes_in(gray)
    if not sizes:
        raise CxrError(f"{gray} holds no image sizes; run `dvc repro grayscale`")
    report, chosen = _select(gray / str(sizes[0]), p, seed, labels)
    with atomic_paths(out, *([report_path] if report_path else [])) as (tmp, *report_tmp):  # `out` first
        tmp.mkdir()
        for path in report_tmp:
            write_json(path, report)
        present = splits_in(gray / str(sizes[0]))
        for size in sizes:
            folder = tmp / str(size)
            folder.mkdir()
            sources = [np.load(gray / str(size) / f"{s}_images.npy", mmap_mode="r") for s in present]
            starts = np.cumsum([0, *(len(a) for a in sources)])
            for name, rows in chosen.items():
                images = np.empty((len(rows.labels), size, size), dtype=np.uint8)
                for a, start in zip(sources, starts, strict=False):  # rows number the sources one after another
                    here = (rows.images >= start) & (rows.images < start + len(a))
                    images[here] = a[rows.images[here] - start]
                save_split(folder, name, Split(images, rows.labels, rows.meta))
            (folder / "classes.json").write_text(json.dumps(report["classes"]))
            shutil.copy(gray / str(size) / "preprocessing.json", folder)
    log.info("split counts %s; duplicates %s", report["counts"], report["duplicates"]["across_splits"])
    return report


def _select(gray: Path, p: SplitParams, seed: int, labels: str) -> tuple[dict[str, Any], dict[str, Split]]:
    """The report, and per output split a Split whose `images` are row numbers in the source's splits, counted
    one after another (in SPLITS order). Every step reads labels and metadata only, so one selection serves
    every image size."""
    present = splits_in(gray)
    if "train" not in present:
        raise CxrError(f"the source has no train split (it has {', '.join(present) or 'none'}); "
                       "a source needs train/ images")
    names = CLASSES[labels]
    splits, start = {}, 0
    for s in present:
        data = load_split(gray, s, mmap=True)
        splits[s] = Split(np.arange(start, start + len(data.labels)), data.labels, data.meta)
        start += len(data.labels)
    if labels == "three_class":
        splits = {s: three_class(d) for s, d in splits.items()}
    report: dict[str, Any] = {"classes": list(names), "source_counts": {s: _counts(d, names) for s, d in
                                                                        splits.items()}, "carved": [],
                              "pooled": p.pool}
    crossing = duplicates(splits)["patient_ids_across_splits"]
    if crossing and not p.pool:
        log.warning("%d patients have images in more than one of the source's splits (%s): scores on those "
                    "splits are optimistic, as the model has seen these patients; set split.pool: true to "
                    "re-split every image by patient", sum(crossing.values()),
                    ", ".join(f"{k}: {v}" for k, v in crossing.items()))
    report["source_patients_across_splits"] = crossing
    if p.pool:  # one pool, carved again below into test and val by patient
        splits = {"train": Split(np.concatenate([d.images for d in splits.values()]),
                                 np.concatenate([d.labels for d in splits.values()]),
                                 [m for d in splits.values() for m in d.meta])}
    for name, fraction in (("test", p.test_fraction), ("val", p.val_fraction)):
        if name not in splits:
            kept, carved = carve(splits["train"], fraction, seed)
            splits[name], splits["train"] = splits["train"].take(carved), splits["train"].take(kept)
            report["carved"].append(name)
    if "val" in present and not p.pool and len(splits["val"].labels) < MIN_VAL:
        log.warning("the source's val split has only %d images (Kaggle's val/ folder has 16): early stopping, the "
                    "threshold and the choice of model would rest on them; remove that folder (or move its images "
                    "to train/) so that split.val_fraction carves a validation split by patient",
                    len(splits["val"].labels))
    report["duplicates"] = duplicates(splits)
    report["dropped_duplicates"] = drop_duplicates(splits) if p.drop_duplicates else {}
    if p.balance == "downsample":
        splits["train"] = downsample(splits["train"], seed, len(names))
    report["counts"] = {s: _counts(splits[s], names) for s in SPLITS}
    _check_classes(report["counts"])
    return report, {s: splits[s] for s in SPLITS}
