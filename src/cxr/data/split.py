"""The split stage: carve missing splits by patient, check duplicates and leakage, balance train."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
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


# Under tracking.privacy: strict the metadata holds file names' pseudonyms: nothing can be read from them
STRICT_NAMES = (" (under tracking.privacy: strict file names are pseudonyms, so neither a series nor a subtype can be "
                "read from them; DICOM StudyDates still order acquisition)")


def series_of(name: str, patterns: list[str]) -> tuple[str, int | None]:
    """The acquisition series a file name names and its running number (None where the pattern has no
    `number` group), by the first of `patterns` that matches; ('', None) where none does."""
    base = os.path.basename(name)
    for pattern in patterns:
        if m := re.match(pattern, base):  # re caches the compiled patterns
            number = m.groupdict().get("number")
            if number and not number.isdigit():
                raise CxrError(f"split.series: {pattern!r} reads the number {number!r} from {base}; its group number "
                               "must match digits only, e.g. (?P<number>\\d+)")
            return m.group("series"), int(number) if number else None
    return "", None


def acquisition_of(meta: dict[str, Any], patterns: list[str]) -> tuple[str, int | None]:
    """An image's place in the order of acquisition: its DICOM StudyDate's rank (series "study"), else what its
    file name says (series_of)."""
    if meta.get("study_order"):
        return "study", int(meta["study_order"])
    return series_of(meta["name"], patterns)


def carve_blocks(data: Split, fraction: float, seed: int, patterns: list[str],
                 end: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Indices (kept, carved) as a new acquisition would come: within each numbered series (and class; DICOMs'
    study dates are one series, see acquisition_of), whole
    patients taken from `end` ("low" or "high") of the running numbers until the block holds `fraction` of the
    series' images, always leaving one patient to training; patients with no numbered image are carved at random
    by patient. A patient's images go together. Also the blocks, for the split report."""
    found = [acquisition_of(m, patterns) for m in data.meta]
    groups = _groups(data)
    rows: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, ((s, n), y) in enumerate(zip(found, data.labels, strict=True)):
        if n is not None:
            rows[(s, int(y))].append(i)
    chosen: set[str] = set()
    blocks: list[dict[str, Any]] = []
    for (series, label), here in sorted(rows.items()):
        number: dict[str, int] = {}  # a patient's place in the series: the lowest number of its images
        for i in here:
            number[groups[i]] = min(number.get(groups[i], found[i][1]), found[i][1])  # type: ignore[type-var]
        size = Counter(groups[i] for i in here)
        taken, images = [], 0
        for g in sorted(number, key=lambda g: (number[g], g), reverse=end == "high")[:len(number) - 1]:
            if images >= fraction * len(here):
                break
            taken.append(g)
            images += size[g]
        if taken:
            chosen |= set(taken)
            blocks.append({"series": series, "class": label, "numbers": [min(number[t] for t in taken),
                                                                          max(number[t] for t in taken)],
                           "patients": len(taken), "images": images, "of_images": len(here)})
    carved = np.isin(groups, list(chosen))
    rest = np.flatnonzero(~np.isin(groups, groups[[i for v in rows.values() for i in v]]))
    n_splits = max(2, round(1 / fraction))
    if len(rest) >= n_splits:  # patients without a numbered series: at random by patient, as val_by patient would
        carved[rest[first_fold(data.labels[rest], groups[rest], n_splits, seed)]] = True
    return np.flatnonzero(~carved), np.flatnonzero(carved), {
        "blocks": blocks, "unnumbered": {"images": len(rest), "carved": int(carved[rest].sum())}}


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
                       f"use Kaggle's file names or data.labels: binary{STRICT_NAMES}")
    return Split(data.images, labels, data.meta)


def _counts(data: Split, names: tuple[str, ...]) -> dict[str, int]:
    return {label: int((data.labels == i).sum()) for i, label in enumerate(names)}


def _check_classes(counts: dict[str, dict[str, int]], carved: list[str], val_by: str) -> None:
    """Train and val need every class (fitting, early stopping, the threshold and promotion use them);
    a test split of one class is allowed: its scores that need both classes come out as null."""
    for name in ("train", "val"):
        missing = [c for c, n in counts[name].items() if n == 0]
        if missing:
            if name == "train":
                fix = "add them to the source's train/ folder"
            elif name in carved:
                fix = "add images of that class to train/" + (
                    ", or set split.val_by: patient (no block of a numbered series holds that class, and too few "
                    "of its images are in no series)" if val_by == "acquisition" else "")
            else:
                fix = "add them to the source's val/ folder, or remove that folder so that val is carved from train"
            raise CxrError(f"the {name} split has no {' or '.join(missing)} images ({counts[name]}); training and "
                           f"model selection need every class: {fix}")
    missing = [c for c, n in counts["test"].items() if n == 0]
    if missing:
        log.warning("the test split has no %s images: AUROC and average precision will be null", "/".join(missing))


Likeness = Callable[[Split, Split], dict[str, Any]]  # (val, test) -> {"auroc": how well the images tell them apart}


def split(gray: Path, out: Path, p: SplitParams, seed: int, labels: str = "binary",
          report_path: Path | None = None, likeness: Likeness | None = None) -> dict[str, Any]:
    """Write `out`/<size>/{train,val,test}_* from the grayscale arrays of each size, with the same images
    in each; return the report (and write it to `report_path`, together with `out`). `likeness` measures, for
    split.val_by auto, how far each candidate validation's images are from test's."""
    sizes = sizes_in(gray)
    if not sizes:
        raise CxrError(f"{gray} holds no image sizes; run `dvc repro grayscale`")
    first = gray / str(sizes[0])
    choice = choose_validation(first, p, seed, labels, likeness) if p.val_by == "auto" else None
    report, chosen = _select(first, p, seed, labels, choice["by"] if choice else p.val_by)
    if choice:
        report["validation"]["choice"] = choice
        log.info("split.val_by auto: validation carved by %s: %s (reports/split.json)", choice["by"], choice["reason"])
    present = splits_in(first)
    with atomic_paths(out, *([report_path] if report_path else [])) as (tmp, *report_tmp):  # `out` first
        tmp.mkdir()
        for path in report_tmp:
            write_json(path, report)
        for size in sizes:
            folder = tmp / str(size)
            folder.mkdir()
            for name, rows in chosen.items():
                save_split(folder, name, _gather(gray / str(size), present, rows))
            (folder / "classes.json").write_text(json.dumps(report["classes"]))
            shutil.copy(gray / str(size) / "preprocessing.json", folder)
    log.info("split counts %s; duplicates %s", report["counts"], report["duplicates"]["across_splits"])
    return report


def _gather(folder: Path, present: list[str], rows: Split) -> Split:
    """The images of `rows` (row numbers in the source's splits, counted one after another) from `folder`."""
    sources = [np.load(folder / f"{s}_images.npy", mmap_mode="r") for s in present]
    starts = np.cumsum([0, *(len(a) for a in sources)])
    images = np.empty((len(rows.labels), *sources[0].shape[1:]), dtype=np.uint8)
    for a, start in zip(sources, starts, strict=False):
        here = (rows.images >= start) & (rows.images < start + len(a))
        images[here] = a[rows.images[here] - start]
    return Split(images, rows.labels, rows.meta)


def choose_validation(gray: Path, p: SplitParams, seed: int, labels: str,
                      likeness: Likeness | None) -> dict[str, Any]:
    """split.val_by auto: carve validation both ways and keep the one whose images are hardest to tell from the
    test images (the lower domain AUROC): the one that looks most like the data the model will meet. It reads
    test's images, never its labels."""
    if likeness is None:
        raise CxrError("split.val_by auto needs a measure of likeness (the split stage passes the shift report's "
                       "domain classifier)")
    present = splits_in(gray)
    if "val" in present and not p.pool:
        return {"by": "source", "reason": "the source has a validation split; nothing is carved"}
    if not any(acquisition_of(m, p.series)[1] is not None for m in load_split(gray, "train", mmap=True).meta):
        return {"by": "patient", "reason": "no training file name gives a numbered series (split.series), and no "
                                           "DICOM a StudyDate"}
    measured, failed = {}, {}
    for by in ("patient", "acquisition"):
        try:
            _, chosen = _select(gray, p, seed, labels, by, warn=False)
        except CxrError as e:  # e.g. a class the block cannot give validation: the other way is kept
            failed[by] = str(e)
            continue
        val, test = (_gather(gray, present, chosen[s]) for s in ("val", "test"))
        # a patient on both sides makes them look alike for a reason that is no acquisition (Kaggle's folders
        # share 170 patients): only validation's other patients are compared, where it has others
        theirs = {m["patient_id"] for m in test.meta} - {""}
        others = np.array([i for i, m in enumerate(val.meta) if m["patient_id"] not in theirs], dtype=np.int64)
        val = val.take(others) if len(others) >= MIN_VAL else val
        measured[by] = {**likeness(val, test), "val_images_compared": len(val.labels)}
        log.info("validation by %s: its images against test's, domain AUROC %.3f", by, measured[by]["auroc"])
    if len(measured) < 2:
        if not measured:
            raise CxrError(f"split.val_by auto: neither way carves a usable validation split ({failed})")
        return {"by": next(iter(measured)), "reason": f"the other way failed: {failed}", "domain_auroc": measured}
    best = min(measured, key=lambda b: measured[b]["auroc"])
    return {"by": best, "reason": "its images are the harder to tell from test's (domain AUROC, test labels unread)",
            "domain_auroc": measured}


def _source_splits(gray: Path, present: list[str], labels: str) -> dict[str, Split]:
    """The source's splits, each a Split whose `images` are row numbers counted one after another (in SPLITS
    order), with the labels the run uses."""
    splits, start = {}, 0
    for s in present:
        data = load_split(gray, s, mmap=True)
        splits[s] = Split(np.arange(start, start + len(data.labels)), data.labels, data.meta)
        start += len(data.labels)
    return {s: three_class(d) for s, d in splits.items()} if labels == "three_class" else splits


def _carve_missing(splits: dict[str, Split], p: SplitParams, seed: int, val_by: str, report: dict[str, Any]) -> None:
    """Test, then validation, carved from train where the source has none (in place); the report says how."""
    for name, fraction in (("test", p.test_fraction), ("val", p.val_fraction)):
        if name in splits:
            continue
        if name == "val" and val_by == "acquisition":
            kept, carved, blocks = carve_blocks(splits["train"], fraction, seed, p.series, p.val_end)
            if not blocks["blocks"]:
                raise CxrError("split.val_by acquisition: no training file name matches a split.series pattern "
                               f"with a running number (e.g. {splits['train'].meta[0]['name']}); set "
                               f"split.series to patterns your names follow, or split.val_by: patient{STRICT_NAMES}")
            report["validation"] = {"by": val_by, "end": p.val_end, "share": fraction, "series": p.series, **blocks}
        else:
            kept, carved = carve(splits["train"], fraction, seed)
            if name == "val":
                report["validation"] = {"by": "patient", "share": fraction}
        splits[name], splits["train"] = splits["train"].take(carved), splits["train"].take(kept)
        report["carved"].append(name)


def _select(gray: Path, p: SplitParams, seed: int, labels: str, val_by: str,
            warn: bool = True) -> tuple[dict[str, Any], dict[str, Split]]:
    """The report, and per output split a Split whose `images` are row numbers in the source's splits, counted
    one after another (in SPLITS order). Every step reads labels and metadata only, so one selection serves
    every image size."""
    present = splits_in(gray)
    if "train" not in present:
        raise CxrError(f"the source has no train split (it has {', '.join(present) or 'none'}); "
                       "a source needs train/ images")
    names = CLASSES[labels]
    splits = _source_splits(gray, present, labels)
    report: dict[str, Any] = {"classes": list(names), "source_counts": {s: _counts(d, names) for s, d in
                                                                        splits.items()}, "carved": [],
                              "pooled": p.pool}
    crossing = duplicates(splits)["patient_ids_across_splits"]
    if crossing and not p.pool and warn:
        log.warning("%d patients have images in more than one of the source's splits (%s): scores on those "
                    "splits are optimistic, as the model has seen these patients; set split.pool: true to "
                    "re-split every image by patient", sum(crossing.values()),
                    ", ".join(f"{k}: {v}" for k, v in crossing.items()))
    report["source_patients_across_splits"] = crossing
    if p.pool:  # one pool, carved again below into test and val by patient
        splits = {"train": Split(np.concatenate([d.images for d in splits.values()]),
                                 np.concatenate([d.labels for d in splits.values()]),
                                 [m for d in splits.values() for m in d.meta])}
    report["validation"] = {"by": "source"}
    _carve_missing(splits, p, seed, val_by, report)
    if "val" in present and not p.pool and len(splits["val"].labels) < MIN_VAL and warn:
        log.warning("the source's val split has only %d images (Kaggle's val/ folder has 16): early stopping, the "
                    "threshold and the choice of model would rest on them; remove that folder (or move its images "
                    "to train/) so that split.val_fraction carves a validation split by patient",
                    len(splits["val"].labels))
    report["duplicates"] = duplicates(splits)
    report["dropped_duplicates"] = drop_duplicates(splits) if p.drop_duplicates else {}
    if p.balance == "downsample":
        splits["train"] = downsample(splits["train"], seed, len(names))
    report["counts"] = {s: _counts(splits[s], names) for s in SPLITS}
    _check_classes(report["counts"], report["carved"], val_by)
    return report, {s: splits[s] for s in SPLITS}
