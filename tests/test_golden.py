"""The reproducibility contract: a small golden run on real images (the data stages, cpu-best's recipe in
miniature, evaluation with TTA, temperature and bootstrap intervals) must give exactly the figures and weights
recorded in tests/golden.json. A change of code that moves them (a seeded stream drawn differently, an
operation reordered) fails here until golden.json is recorded again in the same commit, with the reason in
the commit message:

    CXR_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py

The record has two parts. What the data stages make (which images land in which split, the arrays' bytes, the
counts) depends on no CPU: it is asserted on every machine. What training makes is exact on one kind of CPU and
one torch build only (float32 kernels differ between instruction sets, and between vendors with the same one:
AVX512 on Intel and on AMD round differently in the last bits of the weights), so the file holds one record per
machine kind and path: float32, and the default path (bf16 autocast where the CPU has native bf16; where it has
none, the default path is float32 and runs once). On a kind with no record those tests skip and say so. The
thread count is pinned (TRAIN_THREADS), as a reduction's order, and so its last bits, follows it."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_stages
from cxr import params
from cxr.data.store import load_split
from cxr.evaluation.variant import evaluate_variant
from cxr.inference import load
from cxr.params import GrayParams
from cxr.training.precision import training_mode
from cxr.training.variant import train_variant

GOLDEN = Path(__file__).with_name("golden.json")
TRAIN_THREADS = 2  # what the records were made with (2-core machines); pinned, so a bigger machine gives the same
RECIPE = {"arch": "xrnet", "epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0005,
          "scheduler": "cosine", "warmup_epochs": 1, "patience": 0, "augment": True, "aug_rotation": 10.0,
          "aug_scale": 0.15, "aug_translate": 0.08, "aug_brightness": 0.1, "aug_contrast": 0.2, "aug_gamma": 0.3,
          "aug_noise": 0.03, "sampler": "balanced", "ema": 0.9, "label_smoothing": 0.1}
PATHS = {"float32": "off", "default": "auto"}  # train.cpu_bf16 of each recorded path


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")),
                  "unknown")
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "vendor": vendor}


def digest(*texts: str) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def read() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"everywhere": {}, "records": []}


def save(golden: dict) -> None:
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


def recording() -> bool:
    return os.environ.get("CXR_RECORD_GOLDEN") == "1"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The data stages on 400 real Kaggle images at 64 px, split by patient."""
    tmp = tmp_path_factory.mktemp("golden")
    data_stages(tmp, 100, GrayParams(image_size=64, workers=1), seed=42)
    return tmp


def data_figures(tmp: Path) -> dict:
    """What the data stages made: each split's members (names), its arrays' bytes, its class counts."""
    splits = {s: load_split(tmp / "split" / "64", s) for s in ("train", "val", "test")}
    return {"split": {s: digest(*(m["name"] for m in d.meta)) for s, d in splits.items()},
            "images": {s: hashlib.sha256(d.images.tobytes()).hexdigest()[:16] for s, d in splits.items()},
            "counts": {s: np.bincount(d.labels, minlength=2).tolist() for s, d in splits.items()}}


def golden_run(tmp: Path, cpu_bf16: str) -> dict:
    """Four epochs of the cpu-best recipe (EMA 0.9 for so few steps) on the prepared images, then evaluate (TTA 4,
    Youden threshold, temperature, intervals by patient). Returns every figure that a seeded stream or the
    arithmetic can move, rounded to what JSON keeps exactly."""
    p = params.parse({"seed": 42, "gray": {"image_size": 64}, "train": RECIPE | {"cpu_bf16": cpu_bf16},
                      "models": {"golden": {}}, "evaluate": {"threshold": "youden", "tta": 4, "calibrate": True}})
    out = tmp / cpu_bf16
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        train_variant(p, "golden", tmp / "split", out / "m", out / "r", out / "ck")
        ev = evaluate_variant(p, "golden", tmp / "split", out / "m", out / "r")
    finally:
        torch.set_num_threads(threads)
    model, _ = load(out / "m" / "model.pt")
    weights = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in model.state_dict().values()))
    history = [line.split(",")[:6] for line in (out / "r" / "history.csv").read_text().splitlines()]  # no timings
    return {"history": digest(*map(",".join, history)), "weights": weights.hexdigest()[:16],
            "threshold": ev["threshold"], "temperature": round(ev["calibration"]["temperature"], 6),
            "val_auroc": round(ev["val"]["auroc"], 6), "test_auroc": round(ev["test"]["auroc"], 6),
            "test_accuracy": round(ev["test"]["accuracy"], 6), "test_ci95": ev["test_ci95"],
            "test_interval_unit": ev["test_intervals"]["unit"]}


def test_the_data_stages_give_the_recorded_splits_and_arrays_on_every_machine(prepared):
    golden, got = read(), data_figures(prepared)
    if recording():
        save(golden | {"everywhere": got})
        return
    assert golden.get("everywhere"), f"{GOLDEN} has no machine-independent record: record it (CXR_RECORD_GOLDEN=1)"
    moved = {k: (v, got[k]) for k, v in golden["everywhere"].items() if got[k] != v}
    assert not moved, f"the data stages moved (recorded, now): {moved}"


@pytest.mark.parametrize("path", PATHS)
def test_the_golden_run_gives_the_recorded_figures(prepared, path):
    here, mode = machine(), training_mode(torch.device("cpu"), RECIPE["arch"], PATHS[path])
    if path == "default" and mode == training_mode(torch.device("cpu"), RECIPE["arch"], "off"):
        pytest.skip(f"the default path is {mode.name} on this CPU (no native bf16): the float32 test covers it")
    records = read()["records"]
    mine = next((r["figures"] for r in records if r["machine"] == here and r["path"] == path), None)
    if mine is None and not recording():
        pytest.skip(f"golden {path} figures were recorded on {[r['machine'] for r in records if r['path'] == path]}; "
                    f"this is {here}: exact figures differ between CPU kinds and torch builds (record this one with "
                    "CXR_RECORD_GOLDEN=1); the data stages' figures are asserted here all the same")
    got = golden_run(prepared, PATHS[path])
    if recording():  # this machine's record of this path added or replaced, the others kept
        golden = read()
        kept = [r for r in golden["records"] if (r["machine"], r["path"]) != (here, path)]
        save(golden | {"records": [*kept, {"machine": here, "path": path, "mode": mode.name, "figures": got}]})
        return
    moved = {k: (v, got[k]) for k, v in mine.items() if got.get(k) != v}
    assert not moved, (f"the golden run ({path}, {mode.name}) moved (recorded, now): {moved}. If the change is meant, "
                       "record it again on every machine kind in the file (CXR_RECORD_GOLDEN=1 python -m pytest "
                       "tests/test_golden.py) and commit tests/golden.json with the reason in the commit message")
