"""Train one variant end to end: an MLflow run with params and per-epoch curves, a resumable state each
epoch, then the outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from cxr import tracking
from cxr.data.store import classes, load_split, size_dir
from cxr.evaluation.plots import history_figure
from cxr.io import atomic_path, atomic_paths, write_csv, write_json
from cxr.models import check_variants
from cxr.params import Params
from cxr.training.loop import build_classifier, fit, pick_device, save_checkpoint

log = logging.getLogger(__name__)


def _mlflow_params(p: Params, variant: str) -> dict[str, Any]:
    tp = p.variant(variant)
    flat = tracking.flatten({"train": dataclasses.asdict(tp), "data": dataclasses.asdict(p.data),
                             "gray": dataclasses.asdict(p.gray), "split": dataclasses.asdict(p.split)})
    return {"variant": variant, "seed": p.seed, **flat}


def _fingerprint(p: Params, variant: str, data: Path) -> str:
    """What a resume state must match: the variant's settings, the seed and the training data."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(p.variant(variant)), p.seed], sort_keys=True).encode())
    for name in ("classes.json", "train_meta.csv", "val_meta.csv"):
        h.update((data / name).read_bytes())
    return h.hexdigest()


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.info("%s is from other settings or data: starting afresh", path)
        return None
    return state


def train_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path,
                  checkpoints: Path) -> dict[str, Any]:
    """Train `variant` on data/<size>/{train,val}; write model_dir/{model.pt,run.json} and
    report_dir/{history.csv,train.json}. A state in `checkpoints` from an interrupted run of the same
    settings is resumed, into the same MLflow run. Returns the train summary."""
    tp = p.variant(variant)
    image_size = p.image_size(variant)
    data = size_dir(data, image_size)
    names = classes(data)
    train, val = load_split(data, "train"), load_split(data, "val")
    check_variants(p, [variant])  # bad settings or size fail before MLflow starts a run
    if tp.model.get("pretrained"):  # and missing ImageNet weights (offline): only a real build reads them
        build_classifier(tp, image_size, len(names), 0.0, 1.0)
    fingerprint = _fingerprint(p, variant, data)
    state_file = checkpoints / "state.pt"
    state = _load_state(state_file, fingerprint)
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    run_args = {"run_id": state["run_id"]} if state else {
        "experiment_id": experiment_id, "run_name": variant, "tags": tracking.run_tags(variant, root)}
    with mlflow.start_run(**run_args) as run:
        if not state:
            mlflow.log_params(_mlflow_params(p, variant))
            mlflow.log_params({"device": str(pick_device()), "train_images": len(train.labels),
                               "val_images": len(val.labels), "image_size": image_size, "classes": ",".join(names)})

        def on_epoch(row: dict[str, Any]) -> None:
            mlflow.log_metrics({f"{k.replace('_', '/', 1)}": v for k, v in row.items() if k != "epoch"},
                               step=row["epoch"])

        def save_state(s: dict[str, Any]) -> None:
            with atomic_path(state_file) as tmp:
                torch.save({**s, "fingerprint": fingerprint, "run_id": run.info.run_id}, tmp)

        if state:
            on_epoch(state["history"][-1])  # in case the stop came between the state and its metrics
        t0 = time.perf_counter()
        model, history = fit(train, val, tp, p.seed, len(names), variant, on_epoch, state, save_state)
        best = min(history, key=lambda r: r["val_loss"])
        summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "best_val_loss": best["val_loss"],
                   "best_val_auroc": best["val_auroc"], "train_seconds": round(time.perf_counter() - t0, 2),
                   "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1)}
        mlflow.log_metrics({f"train/{k}": v for k, v in summary.items()})
        mlflow.log_figure(history_figure(history, variant), "plots/history.png")
        with atomic_path(model_dir, is_dir=True) as tmp, \
                atomic_paths(report_dir / "history.csv", report_dir / "train.json") as (history_csv, train_json):
            save_checkpoint(tmp / "model.pt", model, tp, image_size, names, variant=variant)
            (tmp / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}))
            write_csv(history_csv, [{k: round(v, 6) for k, v in r.items()} for r in history])
            write_json(train_json, summary)
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: nothing to resume
    return summary
