"""Shared fixtures: real images from ../shared/data (skip when absent), a per-session MLflow store."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent: put the shared data there or set CXR_SHARED_DATA")
    return path


def manifest(name: str) -> list[dict[str, str]]:
    with (shared(name) / "MANIFEST.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every test logs to a fresh SQLite store, never to the project's mlruns/."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def make_imagefolder(dest: Path, per_class: int, splits: tuple[str, ...] = ("train", "test"),
                     with_duplicates: bool = True) -> Path:
    """A Kaggle-style folder of symlinks to real 224 px images (class folders in odd case), with the
    first `per_class` files of each class and split, plus every byte-identical copy if asked."""
    rows = manifest("chest_xray_224")
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["sha256"]] = seen.get(r["sha256"], 0) + 1
    picked: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["split"], r["label"])
        dup = with_duplicates and seen[r["sha256"]] > 1
        if r["split"] in splits and (picked.get(key, 0) < per_class or dup):
            picked[key] = picked.get(key, 0) + 1
            cls = "normal" if r["label"] == "NORMAL" else "Pneumonia"
            link = dest / r["split"] / cls / Path(r["path"]).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(SHARED / "chest_xray_224" / r["path"])
    return dest


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("xray224"), per_class=80)
