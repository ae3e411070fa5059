"""The download stage: fetch the Hugging Face dataset, or record a local source with content hashes."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from cxr import LABELS, SPLITS
from cxr.data.dicom import is_dicom
from cxr.errors import CxrError
from cxr.io import atomic_path, progress, write_csv, write_json
from cxr.params import DataParams
from cxr.privacy import pseudonym, salt

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LOCAL = "a Kaggle-style {train,val,test}/{NORMAL,PNEUMONIA} folder or a MedMNIST .npz"


def offline_hint(cuda: bool | None = None) -> str:
    """How to go on without the hub, as a command that fits this machine: the full run on a GPU, the CPU
    profile without one."""
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if cuda:
        return (f"or use a local copy ({LOCAL}): cxr run -S data.source=imagefolder -S data.path=/abs/path "
                "(data.source=npz for a .npz)")
    return f"or use a local copy ({LOCAL}): make quick DATA=/abs/path (no GPU here: the CPU profile)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or a DICOM file by its content, whatever its name (PACS exports name files by
    their UIDs, 1.2.840....123, or give them no suffix at all)."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    with path.open("rb") as f:
        return is_dicom(f.read(132))


def list_imagefolder(root: Path) -> list[tuple[str, int, Path]]:
    """(split, label, file) per image of a Kaggle-style `{train,val,test}/{NORMAL,PNEUMONIA}/*` folder
    (any split may be absent; split and class names are case-insensitive)."""
    if not root.is_dir():
        raise CxrError(f"data.path {root} is not a folder; point it at {{train,val,test}}/{{NORMAL,PNEUMONIA}}")
    found: list[tuple[str, int, Path]] = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        if split is None:
            log.warning("skipping %s: not a split folder (train, val or test)", split_dir)
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name.upper() not in LABELS:
                raise CxrError(f"{class_dir}: unknown class folder; expected {' or '.join(LABELS)} "
                               "(any case); move it out of data.path")
            label = LABELS.index(class_dir.name.upper())
            files = [f for f in sorted(class_dir.iterdir()) if f.is_file() and is_image_file(f)]
            if not files:  # most likely a copy that failed; silently training without the class would be worse
                raise CxrError(f"{class_dir}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files, nor "
                               "DICOMs of another name); fill it or remove it")
            found += [(split, label, f) for f in files]
    if not found:
        raise CxrError(f"no images under {root}; expected {{train,val,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg (or .dcm)")
    return found


def scan_imagefolder(root: Path, key: bytes | None = None) -> list[dict[str, Any]]:
    """One row per image of `list_imagefolder(root)` with its size and sha256; its path relative to root, or with
    `key` (tracking.privacy: strict) the path's pseudonym, so that no file name is written."""
    return [{"path": pseudonym(rel, key) if key else rel, "split": split, "label": label, "bytes": f.stat().st_size,
             "sha256": sha256_file(f)}
            for split, label, f in progress(list_imagefolder(root), desc="hashing", unit="file")
            for rel in [f.relative_to(root).as_posix()]]


def check_npz(path: Path) -> dict[str, int]:
    """Check a MedMNIST-style npz and return the image count of each split it has."""
    if not path.is_file():
        raise CxrError(f"data.path {path} is not a file; point it at a MedMNIST .npz")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            counts = {}
            for split in SPLITS:
                if f"{split}_images" in keys:
                    if f"{split}_labels" not in keys:
                        raise CxrError(f"{path}: has {split}_images but no {split}_labels; save both")
                    counts[split] = _check_arrays(path, split, z[f"{split}_images"], z[f"{split}_labels"])
    except (OSError, ValueError) as e:
        raise CxrError(f"{path}: not a readable .npz ({e})") from e
    if not counts:
        raise CxrError(f"{path}: no {{train,val,test}}_images arrays (it has {', '.join(sorted(keys))})")
    return counts


def _check_arrays(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> int:
    """MedMNIST's layout: uint8 (N, H, W) or (N, H, W, 1|3) images, N labels of 0 or 1."""
    where = f"{path}: {split}_images"
    if images.dtype != np.uint8:
        raise CxrError(f"{where} are {images.dtype}, not uint8; save them as 8-bit (0-255) as MedMNIST does")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise CxrError(f"{where} has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3)")
    n = images.shape[0]
    if labels.shape not in ((n,), (n, 1)):
        raise CxrError(f"{where} has {n} images but {split}_labels has shape {labels.shape}; expected ({n}, 1)")
    odd = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if odd:
        raise CxrError(f"{path}: {split}_labels holds {odd}; expected 0 (NORMAL) or 1 (PNEUMONIA)")
    return n


def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, not after the datasets library's retries, when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return  # the user asked for the local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise CxrError(f"cannot reach the Hugging Face hub at {endpoint} ({e.__class__.__name__}: {e}); "
                       f"check the network, {offline_hint()}") from e


def download_hub(p: DataParams, out: Path) -> dict[str, int]:
    check_hub_reachable()
    import datasets  # heavy import, only for this source

    # The parquet export holds one folder per config ({config}/{split}/0000.parquet) and no dataset card to
    # declare them: the config is a data_dir there (name= would find only "default").
    where = {"data_dir": p.hub_config} if p.hub_revision.startswith("refs/convert/") else {"name": p.hub_config}
    try:
        ds = datasets.load_dataset(p.hub_repo, revision=p.hub_revision, **where)
    except ConnectionError as e:
        raise CxrError(f"download of {p.hub_repo} failed ({e}); {offline_hint()}") from e
    except FileNotFoundError as e:  # datasets' DatasetNotFoundError, or a config/revision it cannot find
        raise CxrError(f"data.hub_repo {p.hub_repo!r} (config {p.hub_config!r}, revision {p.hub_revision!r}) is not "
                       f"on the hub, or is private or gated ({' '.join(str(e).split())[:160]}); check the id, or "
                       "log in with `hf auth login`") from e
    ds.save_to_disk(str(out / "hub"))
    return {name: len(split) for name, split in ds.items()}


def download(p: DataParams, out: Path, strict: bool = False) -> dict[str, Any]:
    """Write `out`: source.json, plus hub/ (the dataset as it came) or manifest.csv (local files with
    sha256, so that a changed file changes this output and re-runs the stages after it; `strict`: pseudonyms for
    their paths)."""
    with atomic_path(out, is_dir=True) as tmp:
        info: dict[str, Any] = {"source": p.source}
        if p.source == "hub":
            info.update(repo=p.hub_repo, config=p.hub_config, revision=p.hub_revision)
            info["counts"] = download_hub(p, tmp)
        elif p.source == "imagefolder":
            root = Path(p.path).resolve()
            rows = scan_imagefolder(root, salt() if strict else None)
            write_csv(tmp / "manifest.csv", rows)
            info.update(path=str(root), counts={s: sum(r["split"] == s for r in rows) for s in SPLITS})
        else:
            path = Path(p.path).resolve()
            info.update(path=str(path), counts=check_npz(path), sha256=sha256_file(path))
        if strict:  # the grayscale stage names images by pseudonyms (for imagefolder, manifest.csv already does)
            info["privacy"] = "strict"
        write_json(tmp / "source.json", info)
    log.info("source %s: %s", p.source, info["counts"])
    return info
