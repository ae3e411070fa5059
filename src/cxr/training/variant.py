"""Train one variant end to end: an MLflow run with params and per-epoch curves, then the outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import mlflow

from cxr import tracking
from cxr.data.store import load_split
from cxr.evaluation.plots import history_figure
from cxr.io import atomic_path, write_csv, write_json
from cxr.models import build_model
from cxr.params import Params
from cxr.training.loop import fit, pick_device, save_checkpoint

log = logging.getLogger(__name__)


def _mlflow_params(p: Params, variant: str) -> dict[str, Any]:
    tp = p.variant(variant)
    flat = tracking.flatten({"train": dataclasses.asdict(tp), "data": dataclasses.asdict(p.data),
                             "gray": dataclasses.asdict(p.gray), "split": dataclasses.asdict(p.split)})
    return {"variant": variant, "seed": p.seed, **flat}


def train_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Train `variant` on data/{train,val}; write model_dir/{model.pt,run.json} and
    report_dir/{history.csv,train.json}. Returns the train summary."""
    tp = p.variant(variant)
    train, val = load_split(data, "train"), load_split(data, "val")
    image_size = int(train.images.shape[-1])
    build_model(tp.arch, image_size=image_size, **tp.model)  # fail on bad settings before MLflow starts a run
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    with mlflow.start_run(experiment_id=experiment_id, run_name=variant, tags=tracking.run_tags(variant, root)) as run:
        mlflow.log_params(_mlflow_params(p, variant))
        mlflow.log_params({"device": str(pick_device()), "train_images": len(train.labels),
                           "val_images": len(val.labels), "image_size": image_size})

        def on_epoch(row: dict[str, Any]) -> None:
            mlflow.log_metrics({f"{k.replace('_', '/', 1)}": v for k, v in row.items() if k != "epoch"},
                               step=row["epoch"])

        t0 = time.perf_counter()
        model, history = fit(train, val, tp, p.seed, on_epoch)
        best = min(history, key=lambda r: r["val_loss"])
        summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "best_val_loss": best["val_loss"],
                   "best_val_auroc": best["val_auroc"], "train_seconds": round(time.perf_counter() - t0, 2),
                   "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1)}
        mlflow.log_metrics({f"train/{k}": v for k, v in summary.items()})
        mlflow.log_figure(history_figure(history, variant), "plots/history.png")
        with atomic_path(model_dir, is_dir=True) as tmp:
            save_checkpoint(tmp / "model.pt", model, tp, image_size, variant=variant)
            (tmp / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}))
    write_csv(report_dir / "history.csv", [{k: round(v, 6) for k, v in r.items()} for r in history])
    write_json(report_dir / "train.json", summary)
    return summary
