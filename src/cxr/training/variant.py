"""Train one variant end to end: an MLflow run with params and per-epoch curves, a resumable state each
epoch, then the outputs. `prepare` and `train` compute (no MLflow); `train_variant` tracks them and writes."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow

from cxr import inference, tracking
from cxr.data.store import Split, classes, images_digest, load_split, preprocessing, size_dir
from cxr.io import atomic_path, atomic_paths, write_csv, write_json
from cxr.models import Classifier, build_model, check_variants
from cxr.params import Params, TrainParams
from cxr.plots import history_figure
from cxr.task import n_logits
from cxr.training import ddp
from cxr.training.loop import fit, make_card
from cxr.training.precision import Mode, training_mode
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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What training a variant reads, checked before MLflow starts a run."""
    tp: TrainParams
    seed: int  # the variant's: the project's seed plus its seed_offset
    data: Path  # data/<size>
    train: Split
    val: Split
    card: inference.ModelCard  # normalisation from train; the data's source and digests
    mode: Mode  # of the training steps: what `auto` means depends on the machine


def prepare(p: Params, variant: str, data: Path) -> Inputs:
    """Load data/<size>/{train,val} and the card of `variant`; bad settings, size or missing ImageNet weights
    (offline) fail here, before anything is trained or logged."""
    tp = p.variant(variant)
    data = size_dir(data, p.image_size(variant))
    names = classes(data)
    train, val = load_split(data, "train"), load_split(data, "val")
    check_variants(p, [variant])
    card = dataclasses.replace(make_card(tp, train, names, variant, **preprocessing(data)), source=data_source(p)[0],
                               train_digest=images_digest(train.meta), val_digest=images_digest(val.meta))
    if tp.model.get("pretrained"):  # only a real build reads the weights
        build_model(tp.arch, num_classes=n_logits(len(names)), image_size=card.image_size, **tp.model)
    mode = training_mode(ddp.device(), tp.arch, tp.cpu_bf16)
    return Inputs(tp, p.seed + tp.seed_offset, data, train, val, card, mode)


def resume_fingerprint(p: Params, inputs: Inputs) -> str:
    """What a resume state must match: how often states are written does not change what they hold, nor (batches
    being global) how many devices."""
    settings = dataclasses.asdict(inputs.tp) | {"seed": p.seed, "checkpoint_every": None, "devices": None,
                                                "precision": inputs.mode.name}
    return fingerprint(settings, inputs.data)


@dataclasses.dataclass(frozen=True)
class Trained:
    model: Classifier  # with the best epoch's weights
    history: list[dict[str, Any]]  # one row per epoch run
    summary: dict[str, Any]  # train.json


def summarize(history: list[dict[str, Any]], precision: str, train_seconds: float,
              wait_seconds: float) -> dict[str, Any]:
    """train.json: the best epoch (lowest val loss) and its scores, the epochs run, and the timings."""
    best = min(history, key=lambda r: r["val_loss"])
    return {"precision": precision, "best_epoch": best["epoch"], "epochs_run": len(history),
            "best_val_loss": best["val_loss"],
            "best_val_auroc": best["val_auroc"], "train_seconds": round(train_seconds, 2),
            "checkpoint_wait_seconds": round(wait_seconds, 2),
            "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1)}


def train(inputs: Inputs, on_epoch: Callable[[dict[str, Any]], None] = lambda row: None,
          state: dict[str, Any] | None = None, writer: StateWriter | None = None) -> Trained:
    """Fit the variant of `inputs` (from `state` where given; `writer` gets its resume states). The training time
    includes the wait for the last state's write."""
    t0 = time.perf_counter()
    try:
        model, history = fit(inputs.train, inputs.val, inputs.tp, inputs.card, inputs.seed, on_epoch, state, writer,
                             inputs.mode)
    finally:
        if writer is not None:
            writer.wait()  # a state being written is finished (or its error raised) before we go on
    seconds = time.perf_counter() - t0
    return Trained(model, history, summarize(history, inputs.mode.name, seconds, writer.seconds if writer else 0.0))


def _log_start(p: Params, variant: str, inputs: Inputs, root: Path) -> None:
    """A new run's params, dataset and description."""
    mlflow.log_params(_mlflow_params(p, variant))
    device, card = ddp.device(), inputs.card
    mlflow.log_params({"device": f"{device.type} x{ddp.world_size()}" if ddp.world_size() > 1 else str(device),
                       "train_images": len(inputs.train.labels),
                       "val_images": len(inputs.val.labels), "image_size": card.image_size,
                       "classes": ",".join(card.classes), "fit": card.fit, "draft": card.draft,
                       "precision": inputs.mode.name})
    source, name = data_source(p)
    tracking.log_dataset(source, f"{name} {card.image_size}px", tracking.data_digest(root), "training")
    mlflow.set_tag(tracking.NOTE, describe(p, variant, len(inputs.train.labels), len(inputs.val.labels)))


def _log_epoch_metrics(row: dict[str, Any]) -> None:
    """An epoch's history row as metrics at its step: train_loss -> train/loss, val_auroc -> val/auroc, ..."""
    mlflow.log_metrics({EPOCH_METRICS.get(k, k.replace("_", "/", 1)): v for k, v in row.items()
                        if k != "epoch" and v is not None}, step=row["epoch"])


def _save(trained: Trained, card: inference.ModelCard, run: dict[str, str], model_dir: Path,
          report_dir: Path) -> None:
    """model_dir/{model.pt,run.json} and report_dir/{history.csv,train.json}, each whole or not at all."""
    with atomic_path(model_dir, is_dir=True) as tmp, \
            atomic_paths(report_dir / "history.csv", report_dir / "train.json") as (history_csv, train_json):
        inference.save(tmp / "model.pt", trained.model, card)
        (tmp / "run.json").write_text(json.dumps(run))
        write_csv(history_csv, [{k: v if v is None else round(v, 6) for k, v in r.items()} for r in trained.history])
        write_json(train_json, trained.summary)


def train_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path,
                  checkpoints: Path) -> dict[str, Any]:
    """Train `variant` on data/<size>/{train,val}; write model_dir/{model.pt,run.json} and
    report_dir/{history.csv,train.json}. A state in `checkpoints` from an interrupted run of the same
    settings and data is resumed, into the same MLflow run. Returns the train summary."""
    inputs = prepare(p, variant, data)
    state_file = checkpoints / "state.pt"
    state = read_state(state_file, fp := resume_fingerprint(p, inputs))
    if ddp.rank() > 0:  # under torchrun, rank 0 alone tracks, writes states and outputs
        train(inputs, state=state)
        return {}
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    run_args = {"run_id": state["run_id"]} if state else {
        "experiment_id": experiment_id, "run_name": variant, "tags": tracking.run_tags(variant, root)}
    with mlflow.start_run(**run_args) as run:
        if not state:
            _log_start(p, variant, inputs, root)
        else:
            _log_epoch_metrics(state["history"][-1])  # in case the stop came between the state and its metrics
        trained = train(inputs, _log_epoch_metrics, state, StateWriter(state_file, {"fingerprint": fp,
                                                                            "run_id": run.info.run_id}))
        mlflow.log_metrics({f"train/{k}": v for k, v in trained.summary.items()  # the speed is a curve of its own
                            if isinstance(v, int | float) and k != "images_per_s"})
        mlflow.log_figure(history_figure(trained.history, variant), "plots/history.png")
        _save(trained, inputs.card, {"run_id": run.info.run_id, "experiment_id": experiment_id}, model_dir,
              report_dir)
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: nothing to resume
    return trained.summary
