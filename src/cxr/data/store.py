"""The on-disk format between data stages: per split one contiguous uint8 array, labels and metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr import LABELS, SPLITS
from cxr.errors import CxrError, run_pipeline
from cxr.io import read_csv, write_csv

# study_order: the rank of a DICOM's StudyDate among the source's (gray.study_order), "" for other files
META_FIELDS = ("name", "source_split", "patient_id", "sha256", "width", "height", "mode", "study_order")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64
    meta: list[dict[str, Any]]  # one row per image, META_FIELDS

    def take(self, idx: np.ndarray) -> Split:
        return Split(np.ascontiguousarray(self.images[idx]), self.labels[idx], [self.meta[i] for i in idx])


def images_digest(meta: list[dict[str, Any]]) -> str:
    """One sha256 for a set of images, from their source files' sha256s (the grayscale stage's), in no order:
    what a model card records of the images it trained and validated on."""
    return hashlib.sha256("\n".join(sorted(m["sha256"] for m in meta)).encode()).hexdigest()


def splits_in(folder: str | Path) -> list[str]:
    return [s for s in SPLITS if (Path(folder) / f"{s}_images.npy").exists()]


def load_split(folder: str | Path, split: str, mmap: bool = False) -> Split:
    folder = Path(folder)
    path = folder / f"{split}_images.npy"
    if not path.exists():
        raise CxrError(f"{path} is missing; run {run_pipeline()} to rebuild the data stages")
    images = np.load(path, mmap_mode="r" if mmap else None)
    labels = np.load(folder / f"{split}_labels.npy")
    return Split(images, labels.astype(np.int64), read_csv(folder / f"{split}_meta.csv"))


def save_split(folder: Path, split: str, data: Split) -> None:
    np.save(folder / f"{split}_images.npy", data.images)
    save_labels_meta(folder, split, data.labels, data.meta)


def save_labels_meta(folder: Path, split: str, labels: np.ndarray, meta: list[dict[str, Any]]) -> None:
    np.save(folder / f"{split}_labels.npy", labels.astype(np.int64))
    write_csv(folder / f"{split}_meta.csv", meta, META_FIELDS)


def sizes_in(folder: str | Path) -> list[int]:
    """The image sizes prepared under folder (one subfolder each)."""
    return sorted(int(p.name) for p in Path(folder).iterdir() if p.is_dir() and p.name.isdigit()) \
        if Path(folder).is_dir() else []


def size_dir(folder: str | Path, size: int) -> Path:
    path = Path(folder) / str(size)
    if not path.is_dir():
        raise CxrError(f"{path} is missing: image size {size} was not prepared; add it to gray.extra_sizes "
                       f"(prepared: {sizes_in(folder) or 'none'}) and run `dvc repro`")
    return path


def write_preprocessing(folder: Path, fit: str, draft: int, equalize: str) -> None:
    """Record how the arrays in `folder` were made, for the model card: what predict must repeat."""
    (folder / "preprocessing.json").write_text(json.dumps({"fit": fit, "draft": draft, "equalize": equalize}))


def preprocessing(folder: str | Path) -> dict[str, Any]:
    """{"fit", "draft", "equalize"} of the arrays in a size folder (see write_preprocessing)."""
    path = Path(folder) / "preprocessing.json"
    if not path.exists():
        raise CxrError(f"{path} is missing (data prepared by an older version); run `dvc repro` to rebuild it")
    return json.loads(path.read_text())


def classes(folder: str | Path) -> list[str]:
    """The class names of a split folder, index = label."""
    path = Path(folder) / "classes.json"
    return json.loads(path.read_text()) if path.exists() else list(LABELS)
