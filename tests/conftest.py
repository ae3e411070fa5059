"""Shared fixtures: real images from ../shared/data (skip when absent), a per-session MLflow store."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
import yaml

if TYPE_CHECKING:
    from cxr.params import GrayParams

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))


# Files whose module fixtures and tests take minutes: collected first, so that `make test`'s two workers
# (`--dist loadfile`, which hands out files in collection order) each start on one while the other files fill
# the rest of both, rather than one waiting at the end for the last of them.
LONGEST = ("test_retrain.py", "test_pipeline.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST)  # stable: the order within each file stays


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


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's tracking URI set to `uri` for a block; set_tracking_uri also sets MLFLOW_TRACKING_URI, which
    would otherwise send every later test to this store (or to a server that has since stopped)."""
    before = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


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


def data_stages(tmp: Path, per_class: int, gray: GrayParams, seed: int = 0) -> Path:
    """The download, grayscale (with `gray`) and split stages, as functions, on make_imagefolder's
    `per_class` real images per class and split, without duplicates, in `tmp`; the split folder (tmp/split)."""
    from cxr.data.gray import grayscale
    from cxr.data.sources import download
    from cxr.data.split import split
    from cxr.params import DataParams, SplitParams

    folder = make_imagefolder(tmp / "src", per_class=per_class, with_duplicates=False)
    download(DataParams(source="imagefolder", path=str(folder)), tmp / "raw")
    grayscale(tmp / "raw", tmp / "gray", gray)
    split(tmp / "gray", tmp / "split", SplitParams(val_fraction=0.2), seed=seed)
    return tmp / "split"


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("xray224"), per_class=80)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """A real `mlflow server` on 127.0.0.1 over the SQLite store `store` (extra `args`, e.g. an auth app);
    yields its port once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *args],
                            env=env, cwd=store.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer on /health within 120 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def project_env() -> dict[str, str]:
    """This environment's tools (`python`, `dvc`, `cxr`) first on PATH, and MLflow at the project's own store
    (mlruns/ in the repo a command runs in)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def sh(repo: Path, *cmd: str, ok: bool = True, env: dict[str, str] | None = None, timeout: float = 1200) -> str:
    """Run a command in `repo` with project_env() (and `env`); assert its exit status; return its output. A
    command still running after `timeout` s fails the test with what it printed so far (a hang must not hold CI
    until its own limit)."""
    try:
        res = subprocess.run(cmd, cwd=repo, env=project_env() | (env or {}), text=True, capture_output=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        said = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        pytest.fail(f"{' '.join(cmd)} still ran after {timeout:.0f} s:\n{said[0][-3000:]}\n{said[1][-3000:]}")
    assert (res.returncode == 0) == ok, f"{' '.join(cmd)} gave {res.returncode}:\n{res.stdout[-3000:]}\n" \
                                        f"{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def ran(log: str) -> set[str]:
    """The DVC stages a `dvc repro` / `dvc exp run` log says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", log))


def make_project(repo: Path, models: dict[str, Any], root: Path = ROOT, **sections: dict[str, Any]) -> Path:
    """A git + DVC repo holding the project's pipeline and params.yaml (from the checkout at `root`), running
    just the variants `models` (merged into every definition), with the given sections merged in (as
    lightning-hydra-template's tests reuse the production config, shrunk)."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "stages", "src", "data/external/README.md"):
        src, dst = root / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
         if src.is_dir() else shutil.copy(src, dst))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["models"], raw["variants"] = {**raw["models"], **models}, list(models)
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (("git", "init", "-q"), ("git", "config", "user.email", "t@localhost"), ("git", "config", "user.name",
                "t"), ("dvc", "init", "-q"), ("dvc", "config", "core.analytics", "false")):
        sh(repo, *cmd)
    shutil.copytree(root / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates dvc.yaml names
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    return repo


def hub_export(dest: Path, per_class: dict[str, int]) -> Path:
    """The hub dataset's parquet export ({config}/{split}/0000.parquet, config `full`, its schema), built from
    the first real Kaggle train images of each class: per_class images of each class per split."""
    import datasets

    features = datasets.Features({"image_file_path": datasets.Value("string"), "image": datasets.Image(),
                                  "labels": datasets.ClassLabel(names=["NORMAL", "PNEUMONIA"])})
    root = shared("chest_xray_224")
    by_class = {c: [r for r in manifest("chest_xray_224") if r["split"] == "train" and r["label"] == c]
                for c in ("NORMAL", "PNEUMONIA")}
    start = 0
    for split, n in per_class.items():
        rows = [r for c in by_class for r in by_class[c][start:start + n]]
        start += n
        (dest / "full" / split).mkdir(parents=True)
        datasets.Dataset.from_dict({  # Roboflow's file names, as in the hub dataset
            "image_file_path": [f"/x/{Path(r['path']).stem}_jpeg.rf.0.jpg" for r in rows],
            "image": [str(root / r["path"]) for r in rows],
            "labels": [int(r["label"] == "PNEUMONIA") for r in rows]}, features=features,
        ).to_parquet(str(dest / "full" / split / "0000.parquet"))
    return dest
