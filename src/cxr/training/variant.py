"""Train one variant end to end: an MLflow run with params and per-epoch curves, a resumable state each
epoch, then the outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import mlflow

from cxr import inference, tracking
from cxr.data.store import classes, images_digest, load_split, preprocessing, size_dir
from cxr.io import atomic_path, atomic_paths, write_csv, write_json
from cxr.models import build_model, check_variants
from cxr.params import Params
from cxr.plots import history_figure
from cxr.task import n_logits
from cxr.training import ddp
from cxr.training.loop import fit, make_card
from cxr.training.precision import training_mode
from cxr.training.state import StateWriter, fingerprint, read_state

log = logging.getLogger(__name__)


# Per-epoch metric names where the first underscore is not a group: one name per quantity across the run.
EPOCH_METRICS = {"images_per_s": "train/images_per_s", "seconds": "train/epoch_seconds"}


def _mlflow_params(p: Params, variant: str) -> dict[str, Any]:
    tp = p.variant(variant)
    # The hub's settings only where the data came from it: as params of an imagefolder or npz run they would
    # say it did.
    data = {k: v for k, v in dataclasses.asdict(p.data).items() if p.data.source == "hub" or not k.startswith("hub_")}
    flat = tracking.flatten({"train": dataclasses.asdict(tp), "data": data,
                             "gray": dataclasses.asdict(p.gray), "split": dataclasses.asdict(p.split)})
    return {"variant": variant, "seed": p.seed, **flat}


def data_source(p: Params) -> tuple[str, str]:
    """Where the data came from (a URL or an absolute path) and a short name for it."""
    if p.data.source == "hub":
        return f"https://huggingface.co/datasets/{p.data.hub_repo}", p.data.hub_repo.split("/")[-1]
    path = Path(p.data.path).resolve()
    return str(path), path.name


def describe(p: Params, variant: str, n_train: int, n_val: int) -> str:
    """The run's description in the MLflow UI: what the variant is and what it was trained on (evaluate adds
    its scores)."""
    tp = p.variant(variant)
    weights = "ImageNet weights" if tp.model.get("pretrained") else "from scratch"
    aids = [name for name, on in (("augmentation", tp.augment), (f"EMA {tp.ema}", tp.ema), ("balanced sampling",
            tp.sampler == "balanced"), (f"label smoothing {tp.label_smoothing}", tp.label_smoothing)) if on]
    return (f"**{variant}**: `{tp.arch}` {weights}, {p.image_size(variant)} px, up to {tp.epochs} epochs, "
            f"{tp.optimizer} lr {tp.lr:g}{', ' + ', '.join(aids) if aids else ''}. Data: {data_source(p)[1]} "
            f"({p.data.source}), {n_train} train / {n_val} val images.")


def train_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path,
                  checkpoints: Path) -> dict[str, Any]:
    """Train `variant` on data/<size>/{train,val}; write model_dir/{model.pt,run.json} and
    report_dir/{history.csv,train.json}. A state in `checkpoints` from an interrupted run of the same
    settings and data is resumed, into the same MLflow run. Returns the train summary."""
    tp = p.variant(variant)
    data = size_dir(data, p.image_size(variant))
    names = classes(data)
    train, val = load_split(data, "train"), load_split(data, "val")
    check_variants(p, [variant])  # bad settings or size fail before MLflow starts a run
    card = dataclasses.replace(make_card(tp, train, names, variant, **preprocessing(data)), source=data_source(p)[0],
                               train_digest=images_digest(train.meta), val_digest=images_digest(val.meta))
    if tp.model.get("pretrained"):  # and missing ImageNet weights (offline): only a real build reads them
        build_model(tp.arch, num_classes=n_logits(len(names)), image_size=card.image_size, **tp.model)
    mode = training_mode(ddp.device(), tp.arch, tp.cpu_bf16)  # what `auto` means depends on the machine
    # how often states are written does not change what they hold, nor (batches being global) how many devices
    settings = dataclasses.asdict(tp) | {"seed": p.seed, "checkpoint_every": None, "devices": None,
                                         "precision": mode.name}
    state_file = checkpoints / "state.pt"
    state = read_state(state_file, fp := fingerprint(settings, data))
    if ddp.rank() > 0:  # under torchrun, rank 0 alone tracks, writes states and outputs
        fit(train, val, tp, card, p.seed + tp.seed_offset, state=state, mode=mode)
        return {}
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    run_args = {"run_id": state["run_id"]} if state else {
        "experiment_id": experiment_id, "run_name": variant, "tags": tracking.run_tags(variant, root)}
    with mlflow.start_run(**run_args) as run:
        if not state:
            mlflow.log_params(_mlflow_params(p, variant))
            device = ddp.device()
            mlflow.log_params({"device": f"{device.type} x{ddp.world_size()}" if ddp.world_size() > 1 else str(device),
                               "train_images": len(train.labels),
                               "val_images": len(val.labels), "image_size": card.image_size,
                               "classes": ",".join(names), "fit": card.fit, "draft": card.draft,
                               "precision": mode.name})
            source, name = data_source(p)
            tracking.log_dataset(source, f"{name} {card.image_size}px", tracking.data_digest(root), "training")
            mlflow.set_tag(tracking.NOTE, describe(p, variant, len(train.labels), len(val.labels)))

        def on_epoch(row: dict[str, Any]) -> None:  # train_loss -> train/loss, val_auroc -> val/auroc, ...
            mlflow.log_metrics({EPOCH_METRICS.get(k, k.replace("_", "/", 1)): v for k, v in row.items()
                                if k != "epoch" and v is not None}, step=row["epoch"])

        if state:
            on_epoch(state["history"][-1])  # in case the stop came between the state and its metrics
        writer = StateWriter(state_file, {"fingerprint": fp, "run_id": run.info.run_id})
        t0 = time.perf_counter()
        try:
            model, history = fit(train, val, tp, card, p.seed + tp.seed_offset, on_epoch, state, writer, mode)
        finally:
            writer.wait()  # a state being written is finished (or its error raised) before we go on
        best = min(history, key=lambda r: r["val_loss"])
        summary = {"precision": mode.name, "best_epoch": best["epoch"], "epochs_run": len(history),
                   "best_val_loss": best["val_loss"],
                   "best_val_auroc": best["val_auroc"], "train_seconds": round(time.perf_counter() - t0, 2),
                   "checkpoint_wait_seconds": round(writer.seconds, 2),
                   "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1)}
        mlflow.log_metrics({f"train/{k}": v for k, v in summary.items()  # the speed is a curve of its own
                            if isinstance(v, int | float) and k != "images_per_s"})
        mlflow.log_figure(history_figure(history, variant), "plots/history.png")
        with atomic_path(model_dir, is_dir=True) as tmp, \
                atomic_paths(report_dir / "history.csv", report_dir / "train.json") as (history_csv, train_json):
            inference.save(tmp / "model.pt", model, card)
            (tmp / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}))
            write_csv(history_csv, [{k: v if v is None else round(v, 6) for k, v in r.items()} for r in history])
            write_json(train_json, summary)
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: nothing to resume
    return summary
